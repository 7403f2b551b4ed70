"""clbench: `cl.engine` (records, contract, trainer, metrics, results), `cl.models` (backbones, PEFT, heads) and
`cl.app` (command line, runs, leaderboards, Slurm; the only layer that wires scenarios and strategies together).
The layer rules are import-linter contracts in pyproject.toml."""

__version__ = "0.1.0"
