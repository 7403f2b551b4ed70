"""A test plugin for clbench (tests/test_plugins.py). Importing it imports nothing heavy: its parts load on use."""
