"""Ray workers: connection and pools, fail-fast calls, the training worker, rollout engines, value workers, LoRA."""
