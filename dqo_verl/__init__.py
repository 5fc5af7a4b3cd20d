"""dqo_verl: Direct Q-function Optimization (DQO) on verl."""

__version__ = "0.1.0"
