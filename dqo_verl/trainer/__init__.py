"""Training: DQO maths, batches, verl losses, the Trainer base and its method family, reference cache, checkpoints."""
