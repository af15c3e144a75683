"""The 4D may-attend mask of packed and Jacobi Forcing rows, in the form each attention implementation takes it."""

from __future__ import annotations

import torch

from cllm.errors import UserError
from cllm.models import flex_block_mask


def attention_mask_for(implementation: str, may_attend: torch.Tensor, dtype: torch.dtype):
    """A boolean may-attend mask [B, 1, L, L] as `implementation` takes it: boolean for sdpa, additive (0 / -inf in
    `dtype`) for eager, a `BlockMask` for flex_attention."""
    if implementation == "sdpa":
        return may_attend
    if implementation == "eager":  # eager adds the mask to the scores: a boolean would add 1 and 0
        blocked = torch.full(may_attend.shape, torch.finfo(dtype).min, dtype=dtype, device=may_attend.device)
        return blocked.masked_fill(may_attend, 0.0)
    if implementation == "flex_attention":
        return flex_block_mask(may_attend)
    raise UserError(
        "packed and Jacobi Forcing batches (data.init_args.state_strategy: pack, jacobi_forcing) need a 4D attention "
        f"mask, which attn_implementation {implementation!r} does not take; set model.init_args.attn_implementation: "
        "auto (flex_attention on CUDA, sdpa elsewhere), flex_attention or sdpa"
    )
