"""Training-time measurements (installed as `cllm.callbacks`)."""
