"""`AcceptedTokensCallback`: Jacobi-decode held-out prompts during validation and log what training bought.

Logged (values reduced across ranks through torchmetrics):
- `val/accepted_tokens_per_step`: generated tokens / decode forward passes per sequence, averaged (AR = 1.0);
- `val/jacobi_tokens_per_s`: generated tokens of all ranks / decode wall time;
- `val/base_agreement`: mean common-prefix fraction of the output vs the base model's greedy output
  (greedy Jacobi = greedy AR, so the base output is the Jacobi output before training);
- `val/degenerate_rate`: fraction of outputs with a run of >= `degenerate_run` identical tokens.
The base model's values are measured once when training starts and logged at step 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics import MaxMetric, MeanMetric, SumMetric

from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.decoders import decode_batched
from cllm.errors import UserError
from cllm.models import eos_ids
from cllm.scoring import common_prefix_fraction, has_repeated_run

SAMPLE_COLUMNS = ["prompt", "base_output", "jacobi_output", "accepted_tokens_per_step"]


@dataclass
class Decoded:
    """One rank's decode of its prompt shard: outputs and statistics per prompt (global prompt index)."""

    indices: list[int]
    tokens: list[list[int]]
    accepted_tokens_per_step: list[float]
    seconds: float


def decode_shard(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    all_done=None,
    **decode_kwargs,
) -> Decoded:
    """Jacobi-decode this rank's shard `prompt_ids[rank::world_size]` in batches.

    `decode_kwargs` go to `cllm.decoders.decode_batched` (decoder, decoder_options, and `DecodeOptions` fields).

    Every rank walks the same number of batches (padded with empty ones) and, through `all_done`, makes the same
    number of forward passes per batch, so FSDP's per-layer all-gathers line up across ranks.
    """
    indices = list(range(rank, len(prompt_ids), world_size))
    per_rank = math.ceil(len(prompt_ids) / world_size)
    start = time.perf_counter()
    result = decode_batched(
        model,
        [prompt_ids[i] for i in indices],
        batch_size=batch_size,
        min_batches=math.ceil(per_rank / batch_size),
        all_done=all_done,
        **decode_kwargs,
    )
    return Decoded(indices, result.tokens, result.accepted_tokens_per_step, time.perf_counter() - start)


class AcceptedTokensCallback(Callback):
    """Measures Jacobi acceptance of the model being trained on held-out prompts.

    Args:
        prompts: prompt source (`load_prompts` syntax); None takes `trainer.datamodule.validation_prompts()`.
        num_prompts: how many prompts to decode (the first ones).
        n: Jacobi block size; `cllm fit` links the data's n into it; None takes the trained module's `n`.
        max_new_tokens: generation budget per prompt (default: the data's, as the trajectories were collected;
            `cllm fit` links it).
        every_k_validations: measure at every k-th validation (the base model is measured once at train start).
        batch_size: prompts per Jacobi batch on each rank.
        chat_template: encode through the chat template; None takes the data module's setting (default True).
        degenerate_run: a run of this many identical tokens marks an output degenerate.
        samples: how many (prompt, base, current) samples to keep for the W&B table.
        decoder: which decoder measures acceptance (a name in `cllm.decoders.DECODERS`; default jacobi).
        decoder_options: its settings (blocks, threshold, candidates, pool_size, ngram; see `cllm.decoders`).
    """

    def __init__(
        self,
        prompts: str | None = None,
        num_prompts: int = 16,
        n: int | None = None,
        max_new_tokens: int | None = None,
        every_k_validations: int = 1,
        batch_size: int = 8,
        chat_template: bool | None = None,
        degenerate_run: int = 10,
        samples: int = 4,
        decoder: str = "jacobi",
        decoder_options: dict | None = None,
    ) -> None:
        self.prompts, self.num_prompts, self.n = prompts, num_prompts, n
        self.max_new_tokens, self.every_k_validations, self.batch_size = max_new_tokens, every_k_validations, batch_size
        self.chat_template, self.degenerate_run, self.samples = chat_template, degenerate_run, samples
        self.decoder, self.decoder_options = decoder, decoder_options
        self.validations = 0
        self.base: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.last_step: int | None = None
        self.last_samples: list[list] = []
        self._texts: list[str] = []
        self._prompt_ids: list[list[int]] = []
        self._base_tokens: dict[int, list[int]] = {}

    # ---------------------------------------------------------------- hooks
    def state_dict(self) -> dict:
        # A resumed run keeps the base model's reference instead of measuring the restored weights as "base".
        return {"base": self.base, "base_tokens": self._base_tokens, "validations": self.validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base = dict(state_dict.get("base", {}))
        self._base_tokens = {int(k): list(v) for k, v in state_dict.get("base_tokens", {}).items()}
        self.validations = int(state_dict.get("validations", 0))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prepare(trainer, pl_module)
        if self.base and self._base_tokens:  # restored from a checkpoint
            return
        self.base = self.measure(trainer, pl_module, record_base=True)
        # self.log is not allowed to pick the step here; write the reference values at step 0 directly
        for logger in trainer.loggers:
            logger.log_metrics(self.base, step=trainer.global_step)
        self._log_samples(trainer)
        if trainer.is_global_zero:
            print(f"base model: {self._summary(self.base)}", flush=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._prompt_ids:
            return
        self.validations += 1
        if self.validations % self.every_k_validations:
            return
        self.last = self.measure(trainer, pl_module)
        for name, value in self.last.items():
            # already reduced across ranks by torchmetrics: no second sync
            pl_module.log(name, value, on_step=False, on_epoch=True)
        self._log_samples(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._prompt_ids:
            return
        if self.last_step != trainer.global_step:  # the last validation did not see the final weights
            self.last = self.measure(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(self.last, step=trainer.global_step)
        if not trainer.is_global_zero:
            return
        print(
            f"accepted tokens per step (n={self.block_size(pl_module)}, generated tokens / decode passes, AR = 1.0): "
            f"base {self.base['val/accepted_tokens_per_step']:.3f} -> trained "
            f"{self.last['val/accepted_tokens_per_step']:.3f} at step {trainer.global_step}\n"
            f"  base:    {self._summary(self.base)}\n  trained: {self._summary(self.last)}",
            flush=True,
        )

    # ---------------------------------------------------------------- measuring
    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if self.prompts is not None:
            prompts = load_prompts(self.prompts, limit=self.num_prompts)
        elif datamodule is not None and hasattr(datamodule, "validation_prompts"):
            prompts = list(datamodule.validation_prompts())[: self.num_prompts]
        else:
            prompts = []
        chat_template = self.chat_template
        if chat_template is None:
            chat_template = getattr(datamodule, "chat_template", True)
        tokenizer = pl_module.tokenizer
        self._texts = [prompt.text for prompt in prompts]
        self._prompt_ids = encode_prompts(tokenizer, prompts, chat_template) if prompts else []

    def block_size(self, pl_module: LightningModule) -> int:
        """The n decoded with: the linked one, else the trained module's (no silent default)."""
        n = self.n or getattr(pl_module, "n", None)
        if n is None:
            raise UserError("AcceptedTokensCallback: no block size n (set data.init_args.n; `cllm fit` links it here)")
        return n

    def budget(self, trainer: Trainer) -> int:
        """The generation budget: the linked or given one, else the data module's (no silent default)."""
        hparams = getattr(getattr(trainer, "datamodule", None), "hparams", {})
        budget = self.max_new_tokens or hparams.get("max_new_tokens")
        if budget is None:
            raise UserError("AcceptedTokensCallback: no max_new_tokens (set data.init_args.max_new_tokens)")
        return budget

    def measure(self, trainer: Trainer, pl_module: LightningModule, record_base: bool = False) -> dict[str, float]:
        """Decode the prompts with the current weights on every rank (lockstep) and return the reduced metrics."""
        strategy = trainer.strategy
        tokenizer = pl_module.tokenizer
        was_training = pl_module.training
        pl_module.eval()
        # Lightning validates under inference_mode on some backends; FSDP2 must not create inference tensors.
        # Decode at training's compute precision (bf16-mixed: autocast), as validation_step runs.
        with torch.inference_mode(False), trainer.precision_plugin.forward_context():
            decoded = decode_shard(
                pl_module.model,
                self._prompt_ids,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                batch_size=self.batch_size,
                all_done=(lambda done: strategy.reduce_boolean_decision(done, all=True))
                if trainer.world_size > 1
                else None,
                n=self.block_size(pl_module),
                decoder=self.decoder,
                decoder_options=self.decoder_options,
                max_new_tokens=self.budget(trainer),
                eos_token_id=eos_ids(pl_module.model, tokenizer),
                pad_token_id=tokenizer.pad_token_id or 0,
            )
        pl_module.train(was_training)
        if record_base:
            self._base_tokens = dict(zip(decoded.indices, decoded.tokens))
            if trainer.world_size > 1:  # every rank keeps all base outputs (checkpoints hold rank 0's state)
                shards: list = [None] * trainer.world_size
                torch.distributed.all_gather_object(shards, self._base_tokens)
                self._base_tokens = {index: tokens for shard in shards for index, tokens in shard.items()}
        self.last_step = trainer.global_step
        values = self.reduce(decoded, pl_module.device)
        self.last_samples = [
            [self._texts[i], tokenizer.decode(self._base_tokens.get(i, [])), tokenizer.decode(out), rate]
            for i, out, rate in list(zip(decoded.indices, decoded.tokens, decoded.accepted_tokens_per_step))[
                : self.samples
            ]
        ]
        return values

    def reduce(self, decoded: Decoded, device: torch.device) -> dict[str, float]:
        """Per-sequence values into torchmetrics (synced across ranks on compute)."""
        accepted, agreement, degenerate = (MeanMetric().to(device) for _ in range(3))
        tokens, seconds = SumMetric().to(device), MaxMetric().to(device)
        for index, out, rate in zip(decoded.indices, decoded.tokens, decoded.accepted_tokens_per_step):
            accepted.update(rate)
            agreement.update(common_prefix_fraction(out, self._base_tokens.get(index, [])))
            degenerate.update(float(has_repeated_run(out, self.degenerate_run)))
        tokens.update(float(sum(len(out) for out in decoded.tokens)))
        seconds.update(decoded.seconds)
        return {
            "val/accepted_tokens_per_step": float(accepted.compute()),
            "val/jacobi_tokens_per_s": float(tokens.compute()) / max(float(seconds.compute()), 1e-9),
            "val/base_agreement": float(agreement.compute()),
            "val/degenerate_rate": float(degenerate.compute()),
        }

    def _log_samples(self, trainer: Trainer) -> None:
        for logger in trainer.loggers:
            if hasattr(logger, "log_table") and self.last_samples:
                logger.log_table(key="val/samples", columns=SAMPLE_COLUMNS, data=self.last_samples)

    @staticmethod
    def _summary(values: dict[str, float]) -> str:
        return ", ".join(f"{name.removeprefix('val/')} {value:.3f}" for name, value in values.items())
