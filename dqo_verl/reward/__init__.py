"""Rewards: answer formats of every data source, outcome grading, and the one definition of a reasoning step."""
