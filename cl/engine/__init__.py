"""The engine: stream records, the strategy contract, the trainer, metrics, results and data plumbing.

It imports no model building block, scenario, strategy or application module (import-linter contracts in pyproject.toml)."""
