"""Evaluation: the harness, its decodings, metrics, verifier metrics, value inspection, the report and plots."""
