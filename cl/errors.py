"""Errors a user can fix. `run.py` prints them as one `error: ...` line (plus a tree, for data) and no traceback."""


class ClbenchError(Exception):
    """Base class: the message names the fix."""


class ConfigError(ClbenchError):
    """Unknown name, unsupported combination, invalid value."""


class DatasetError(ClbenchError):
    """A dataset is missing or incomplete; the message shows the expected layout and where the data comes from."""


class BackboneError(ClbenchError):
    """Weights missing or not matching the architecture."""


class MissingExtraError(ClbenchError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"this feature needs '{package}': install it with  pip install -e .[{extra}]")
