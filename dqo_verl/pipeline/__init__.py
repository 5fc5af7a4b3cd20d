"""Composite commands: the stage runner, `compare` (every method on one corpus) and `iterate` (rounds of DQO)."""
