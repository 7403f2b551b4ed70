"""The application layer: command line, one run's orchestration, loggers, leaderboards, Slurm submission, and the registries that wire scenarios, strategies and backbones together.

The only layer that imports both `scenarios` and `strategies`."""
