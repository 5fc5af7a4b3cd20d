"""Configuration: Hydra composition of the base config and recipes, method settings, the stage contract, errors."""
