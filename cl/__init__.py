"""clbench engine: stream records, trainer, metrics, backbones, results."""

__version__ = "0.1.0"
