"""Prompt sources, trajectory records and the TrajectoryDataModule (installed as `cllm.data_modules`)."""
