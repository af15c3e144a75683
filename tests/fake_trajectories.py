"""A hand-built stand-in for the TrajectoryDataModule (same batch contract), for fast deterministic tests.

Every row has the same length (prompt of `prompt_length` tokens + one n-token block, no padding), so a global batch
split over ranks has the same number of scored tokens on each rank: the 2-process mean loss equals the 1-process one.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler

from cllm.data_modules.jacobi_forcing import ForcingPair, ForcingRow, collate_forcing
from cllm.data_modules.prompts import Prompt
from cllm.models import build_tiny_tokenizer


class FakeTrajectoryData(LightningDataModule):
    def __init__(
        self,
        n: int = 4,
        rows: int = 16,
        prompt_length: int = 6,
        batch_size: int = 4,
        seed: int = 0,
        val_prompts: int = 3,
        val_rows: int = 4,
        forcing: bool = False,
    ) -> None:
        super().__init__()
        self.n, self.batch_size, self.num_val_prompts = n, batch_size, val_prompts
        self.tokenizer = build_tiny_tokenizer()
        self.chat_template = False
        generator = torch.Generator().manual_seed(seed)
        make = self._forcing_row if forcing else self._record
        self.records = [make(prompt_length, generator) for _ in range(rows)]
        self.val_records = [make(prompt_length, generator) for _ in range(val_rows)]
        self.collate_fn = partial(collate_forcing, pad_id=0, n=n) if forcing else None

    def _forcing_row(self, prompt_length: int, generator: torch.Generator) -> dict:
        """A Jacobi Forcing row of 3 blocks in one noise window, every row with the same shape and the same scored
        offsets (noisy_j first differs from fixed_j at offset j), so ranks score equally many tokens."""
        prompt = torch.randint(3, 200, (prompt_length,), generator=generator).tolist()
        pairs = []
        for j in range(3):
            fixed = torch.randint(3, 200, (self.n,), generator=generator).tolist()
            noisy = fixed[:j] + [token + 1 for token in fixed[j:]]
            pairs.append(ForcingPair(noisy, fixed, self.n, window=0))
        return {"row": ForcingRow(prompt, prompt_length, continues=False, pairs=pairs)}

    def _record(self, prompt_length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        prompt = torch.randint(3, 200, (prompt_length,), generator=generator)
        fixed_point = torch.randint(3, 200, (self.n,), generator=generator)
        state = fixed_point.clone()
        state[2:] = torch.randint(3, 200, (self.n - 2,), generator=generator)  # first tokens already right
        next_state = torch.where(torch.rand(self.n, generator=generator) < 0.5, fixed_point, state)
        return {
            "input_ids": torch.cat([prompt, state]),
            "fixed_point_ids": torch.cat([prompt, fixed_point]),
            "next_state_ids": torch.cat([prompt, next_state]),
            "attention_mask": torch.ones(prompt_length + self.n, dtype=torch.long),
            "block_start": torch.tensor(prompt_length),
            "prompt_length": torch.tensor(prompt_length),
        }

    def validation_prompts(self) -> list[Prompt]:
        texts = ["def add(a, b):", "import os\n", "for i in range(10):", "class A:", "x = [1, 2"]
        return [Prompt(f"p{i}", texts[i % len(texts)]) for i in range(self.num_val_prompts)]

    def train_dataloader(self) -> DataLoader:
        # In order on every rank (Lightning's own distributed sampler would shuffle): global batch k is
        # records [k*B*W, (k+1)*B*W) split over ranks, the same rows the 1-process run sees at step k.
        world = self.trainer.world_size if self.trainer else 1
        sampler = None
        if world > 1:
            sampler = DistributedSampler(self.records, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(
            self.records, batch_size=self.batch_size, sampler=sampler, shuffle=False, collate_fn=self.collate_fn
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_records, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn)
