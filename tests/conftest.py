import os

import pytest
import torch

# Two cores on CI: one intra-op thread per test process keeps multi-process tests from fighting.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never use the hub; fail fast instead of retrying


@pytest.fixture(scope="session")
def tiny_float64():
    from cllm.models import load_model

    return load_model("tiny:seed=1", dtype="float64")
