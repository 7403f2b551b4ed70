"""Scenario kinds: how a stream is cut and evaluated (class/task/domain-incremental, FSCIL, TTA, union-label, forgetting, text)."""
