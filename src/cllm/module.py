"""`CLLMModule`: consistency + AR training of a causal LM on Jacobi trajectories (Kou et al. 2024).

    loss = consistency_weight * L_c + ar_weight * L_ar        (which passes and losses: `cllm.objective`)

The model is built in `configure_model` (so Lightning can shard it): under `ModelParallelStrategy` it is sharded
with FSDP2 (`cllm.models.shard_fsdp2`: each decoder layer, then the root) over the data-parallel mesh.

Precision: master weights are float32 by default (`dtype: auto` trains float32 weights, and the CLI picks the
Trainer precision that `cllm.hardware.auto_dtype` finds fast: bf16-mixed on CUDA and on AMX/AVX-512-BF16 CPUs, else
32-true). bf16 compute comes from the Trainer's `precision: bf16-mixed` (autocast; works on CPU and GPU, with or
without FSDP), or, under FSDP2, from `fsdp_param_dtype: bfloat16` (or `auto`; FSDP2 MixedPrecisionPolicy: bf16
all-gathers and compute, float32 gradient reduction; use it with Trainer precision `32-true`), which halves the
all-gather traffic on GPUs.
LoRA (`lora`): PEFT adapters on a frozen base (`cllm.lora`; the optimizer and checkpoints hold the adapters only).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from lightning.pytorch import LightningModule

from cllm import logit_table
from cllm.attention import attention_mask_for
from cllm.errors import UserError
from cllm.fingerprints import tokenizer_fingerprint
from cllm.hardware import auto_dtype
from cllm.logit_table import FusedAR, needed_positions, sliced_forward
from cllm.lora import CHECKPOINT_KEY, LoraSettings, check_checkpoint, settings_of, trainable_state
from cllm.models import resolve_attn_implementation
from cllm.objective import LossOptions, batch_losses
from cllm.sharded_load import build_for_training, data_parallel_mesh, fsdp_policy


class CLLMModule(LightningModule):
    """Fine-tunes `model` into a CLLM on batches of the TrajectoryDataModule.

    Args:
        model: model spec for `cllm.models.load_model` (`smollm2-135m`, a local HF folder, `tiny`, ...).
        dtype: dtype of the master weights; `auto`: float32 (the compute dtype is the Trainer precision's).
        attn_implementation: `auto` (on CUDA flash_attention_2 when available, flex_attention for packed and Jacobi
            Forcing batches; sdpa elsewhere), `sdpa`, `eager`, `flex_attention`, ...
        n: Jacobi block size: the data's (`cllm fit` links it here); None takes the data module's `n`.
        consistency: `global` (target: the model on context + fixed point) or `local` (target: next state).
        divergence: forward_kl, soft_ce or reverse_kl (see `cllm.losses.divergence`).
        mask_before_mismatch: score only block positions whose input prefix differs from the target's.
        consistency_weight: weight of L_c.
        ar_weight: weight of L_ar (official CLLM: 10).
        ar_target: `fixed_point` (NLL on context + y*, the model's own greedy output) or `labels` (ground truth;
            needs `use_labels` in the data module).
        ar_mask_prompt: exclude the prompt tokens from the AR loss.
        label_smoothing: ε of the AR loss.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: fraction of the total optimizer steps with linear warmup; cosine decay afterwards.
        min_lr_ratio: the cosine ends at lr * min_lr_ratio.
        gradient_clip: clip the global gradient norm to this value (None: only measure it).
        activation_checkpointing: recompute each decoder layer in backward (memory for compute).
        fsdp_param_dtype: under FSDP2, the dtype of all-gathered parameters and compute (e.g. bfloat16).
        sliced_logits: run the LM head only at the positions the losses read (`cllm.logit_table`); same losses.
        meta_init: under FSDP2, build the model on the meta device, shard it, and let each rank read only its
            shards from the safetensors (`cllm.sharded_load`): no rank holds the whole model. Model folders and
            `.gguf` specs only; `tiny` and hub ids load whole, then shard.
        lora: LoRA adapters (`cllm.lora.LoraSettings`: rank, alpha, dropout, target_modules, seed) on the frozen
            base; null: full fine-tuning. With `dtype: bfloat16` the frozen base is stored in bf16 (adapters float32).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "auto",
        attn_implementation: str = "auto",
        n: int | None = None,
        consistency: str = "global",
        divergence: str = "forward_kl",
        mask_before_mismatch: bool = False,
        consistency_weight: float = 1.0,
        ar_weight: float = 10.0,
        ar_target: str = "fixed_point",
        ar_mask_prompt: bool = False,
        label_smoothing: float = 0.0,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        gradient_clip: float | None = 1.0,
        activation_checkpointing: bool = False,
        fsdp_param_dtype: str | None = None,
        sliced_logits: bool = True,
        meta_init: bool = True,
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.loss_options = LossOptions(
            consistency=consistency,
            divergence=divergence,
            mask_before_mismatch=mask_before_mismatch,
            consistency_weight=consistency_weight,
            ar_weight=ar_weight,
            ar_target=ar_target,
            ar_mask_prompt=ar_mask_prompt,
            label_smoothing=label_smoothing,
        )
        self.lora, self.lora_identity = settings_of(lora), None
        lora = dataclasses.asdict(self.lora) if self.lora else None  # plain data in the hparams (weights_only loads)
        # `n` stays out of the hparams: Lightning refuses module and data hparams that share a key with different
        # values. It is the data's: `cllm fit` links it here; None reads the data module's in `setup`.
        self.save_hyperparameters(ignore=["n"])
        if self.lora:  # checkpoints hold the adapters; the base comes from its spec, checked by fingerprint
            self.register_state_dict_post_hook(trainable_state)
            self.strict_loading = False
        self.model, self.tokenizer, self.n = None, None, n
        self._masked_batches = False  # the data's batches carry 4D masks (read in `setup`)

    # ---------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:  # called again for validate/test after fit, or after a restore
            return
        hp = self.hparams
        mesh = getattr(self, "_device_mesh", None)
        model, tokenizer, self.lora_identity = build_for_training(
            hp.model,
            data_parallel_mesh(mesh) if mesh is not None else None,
            dtype=master_dtype(hp.dtype),
            attn_implementation=self._attn_implementation(),
            mp_policy=self._fsdp_policy,
            meta_init=hp.meta_init,
            lora=self.lora,
        )
        self._check_tokenizer(tokenizer)
        model.config.use_cache = False  # training never needs the KV cache; saves memory
        model.train()  # load_model returns eval mode; Lightning keeps submodule modes as they are
        if hp.activation_checkpointing:
            # Non-reentrant checkpointing composes with FSDP2 (the all-gather is redone inside the recompute).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model, self.tokenizer = model, tokenizer
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        fused = hp.sliced_logits and logit_table.fused_ce_available(device)  # Liger-Kernel on CUDA
        self.loss_options = dataclasses.replace(self.loss_options, fused_ar=fused)

    @property
    def _fsdp_policy(self):
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        return fsdp_policy(self.hparams.fsdp_param_dtype, device)

    def _check_tokenizer(self, tokenizer) -> None:
        """Refuse trajectories tokenized by another tokenizer: their ids would mean different text."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_tokenizer = getattr(datamodule, "tokenizer", None)
        if data_tokenizer is None:
            return
        ours, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(data_tokenizer)
        if ours != theirs:
            where = getattr(datamodule, "path", "the data module")
            raise UserError(
                f"the trajectories in {where} were tokenized with tokenizer {theirs}, but model.model "
                f"{self.hparams.model!r} has tokenizer {ours}; collect trajectories with this model or set "
                "model.init_args.model to the model they were collected with"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.lora_identity is not None:
            checkpoint[CHECKPOINT_KEY] = self.lora_identity

    def on_load_checkpoint(self, checkpoint: dict) -> None:  # a sharded one is checked before it is read too
        where = str(getattr(self._trainer, "ckpt_path", None) or "the checkpoint")
        check_checkpoint(checkpoint, self.lora_identity, where, expected=set(self.state_dict()) if self.lora else None)

    def setup(self, stage: str) -> None:
        data_n = getattr(getattr(self.trainer, "datamodule", None), "n", None)
        if self.n is not None and data_n is not None and self.n != data_n:
            raise UserError(f"model.init_args.n={self.n} but the data module's block size is n={data_n}; drop model.n")
        self.n = self.n or data_n
        # packed / Jacobi Forcing rows carry 4D masks: `attn_implementation: auto` then avoids flash-attn
        self._masked_batches = bool(getattr(getattr(self.trainer, "datamodule", None), "masked_batches", False))
        if self.n is None:
            raise UserError("model.init_args.n is not set and the data module has no block size `n`")
        self._log_precision()

    def _log_precision(self) -> None:
        """Record what `dtype: auto` chose, and why, with the run's hyperparameters (CSV hparams.yaml, W&B config)."""
        if self.hparams.dtype != "auto" or self.logger is None:
            return
        choice = auto_dtype(self.trainer.strategy.root_device.type)
        self.logger.log_hyperparams(
            {"dtype_auto": choice.name, "dtype_auto_reason": choice.reason, "precision": str(self.trainer.precision)}
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, L, V]; takes a 2D padding mask [B, L] or a 4D boolean may-attend mask [B, 1, L, L] (packed)."""
        if attention_mask.ndim == 4:
            implementation = self.model.config._attn_implementation
            attention_mask = attention_mask_for(implementation, attention_mask, self.model.dtype)
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        reads: list[tuple[torch.Tensor, torch.Tensor]],
        fused: FusedAR | None = None,
    ):
        """Logits of a batch for the losses: a `LogitTable` at the (rows, positions) they `reads`, or, without
        `sliced_logits`, all of them [B, L, V]. A `fused` AR term gets its loss computed in the same forward."""
        needed = needed_positions(input_ids.shape, *reads) if self.hparams.sliced_logits else None
        return sliced_forward(lambda: self(input_ids, attention_mask, position_ids), self.model, needed, fused)

    def _attn_implementation(self) -> str:
        return resolve_attn_implementation(self.hparams.attn_implementation, masked=self._masked_batches)

    # ---------------------------------------------------------------- losses
    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss parts of one batch (`cllm.objective.batch_losses` over this module's `logits`)."""
        return batch_losses(self.logits, batch, self.loss_options, self.n)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        parts = self.compute_losses(batch)
        self._stop_if_not_finite(parts["loss"], batch_idx)
        rows = batch["input_ids"].shape[0]
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", sync_dist=True, batch_size=rows)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=rows)
        return parts["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        parts = self.compute_losses(batch)
        rows = batch["input_ids"].shape[0]
        for name, value in parts.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=True, batch_size=rows)

    def _stop_if_not_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        # Every rank must take the same decision, or the finite ranks would hang in the next collective.
        finite = bool(torch.isfinite(loss.detach()).item())
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        where = f"value {loss.item()}" if not finite else f"on another rank (this rank: {loss.item():.4g})"
        raise UserError(
            f"training loss is not finite ({where}) at global step {self.global_step}, batch index {batch_idx} "
            f"(rank {self.global_rank}); lower model.init_args.lr, check the data, or use bf16-mixed not fp16"
        )

    # ---------------------------------------------------------------- optimization
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        max_norm = self.hparams.gradient_clip if self.hparams.gradient_clip is not None else math.inf
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the partial norms of the shards
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm.float())

    def configure_optimizers(self):
        hp = self.hparams
        trained = [parameter for parameter in self.parameters() if parameter.requires_grad]  # LoRA: the adapters
        optimizer = torch.optim.AdamW(trained, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise UserError(
                "cannot size the cosine schedule: the number of training steps is unknown; set trainer.max_steps"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, int(total), hp.warmup_ratio, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def master_dtype(dtype: str) -> str:
    """The dtype the weights are trained in: `auto` means float32 masters (bf16 comes from autocast or FSDP2)."""
    return "float32" if dtype == "auto" else dtype


def real_tokens(batch: dict[str, torch.Tensor], n: int) -> int:
    """Real (not padding) tokens of the student input: ctx + s per row, or the whole packed row ctx + y* + k states."""
    if "row_length" in batch:  # Jacobi Forcing rows
        return int(batch["row_length"].sum().item())
    if "segment_starts" in batch:
        segments = 1 + (batch["segment_starts"] >= 0).sum(1)
        return int((batch["block_start"] + n * segments).sum().item())
    return int(batch["attention_mask"].sum().item())


def warmup_cosine(step: int, total_steps: int, warmup_ratio: float, min_ratio: float = 0.0) -> float:
    """LR factor: linear warmup over ceil(warmup_ratio * total) steps, then cosine from 1 to `min_ratio` at total."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
