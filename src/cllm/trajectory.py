"""Collecting Jacobi trajectories: every state of the full-block iteration, block by block, batched.

Full-block iteration for a committed context c and an n-token window (one forward pass per iteration):

    state_{t+1}[0] = argmax p(. | c)        state_{t+1}[i] = argmax p(. | c, state_t[:i])   (i = 1..n-1)

until the state repeats; that state is the fixed point y* (= the next n tokens of greedy AR decoding), the
next block's context is c + y*, and a prompt stops at EOS or after `max_new_tokens` generated tokens.
After iteration t the first t tokens are final, so a block needs at most n + 1 passes.

Every row draws its initial guesses from its own seeded generator, so its records depend neither on the batch,
nor the rank, nor an interruption. This module is the algorithm only (it imports only the decoder); running a
collection (`python -m cllm trajectories`: settings, shards, resume, distribution, manifest) is `cllm.collection`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from cllm.jacobi import INIT_STRATEGIES, Prompts, cache_argument, initial_guess, prefill


@torch.no_grad()
def collect_trajectories(
    model: torch.nn.Module,
    prompts: Prompts,
    *,
    n: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int = 0,
    init: str = "context",
    seeds: Sequence[int] | None = None,
) -> list[list[tuple[list[int], list[list[int]]]]]:
    """Full-block Jacobi trajectories of a batch of prompts.

    Returns, per prompt, one `(prefix_ids, states)` pair per block: `prefix_ids` are the fixed points of the
    earlier blocks, `states` run from the initial guess to the fixed point (recorded once). `seeds[row]` seeds
    that row's initial guesses, so a row's trajectory does not depend on its batch.
    """
    if init not in INIT_STRATEGIES:
        raise ValueError(f"unknown init strategy {init!r}; choose one of {INIT_STRATEGIES}")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1 (got n={n}, max_new_tokens={max_new_tokens})")
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    device = next(model.parameters()).device
    batch = len(prompts)
    seeds = list(seeds) if seeds is not None else list(range(batch))
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    prompt_tensors = [torch.as_tensor(list(p), dtype=torch.long) for p in prompts]
    blocks: list[list[tuple[list[int], list[list[int]]]]] = [[] for _ in range(batch)]
    generated: list[list[int]] = [[] for _ in range(batch)]
    if batch == 0:
        return blocks

    # Prefill the prompts once; the cache then grows by one fixed point per block.
    # known = argmax p(. | context): state[0] of every later iteration.
    cache, attention_mask, next_position, known = prefill(model, prompt_tensors, pad_token_id)
    rows = list(range(batch))
    offsets = torch.arange(n)

    while rows:
        state = _block_guess(known, n, [prompt_tensors[r] for r in rows], [generators[r] for r in rows], init)
        states = [[state[i].tolist()] for i in range(len(rows))]
        converged = torch.zeros(len(rows), dtype=torch.bool)
        step_mask = torch.cat([attention_mask, torch.ones((len(rows), n), dtype=torch.long)], dim=1).to(device)
        positions = (next_position[:, None] + offsets).to(device)
        for _ in range(2 * n + 2):  # n + 1 passes suffice in exact arithmetic; the rest is a guard
            out = model(
                input_ids=state.to(device),
                attention_mask=step_mask,
                position_ids=positions,
                use_cache=True,
                **cache_argument(model, cache),
            )
            predictions = out.logits.argmax(-1).cpu()
            new_state = torch.cat([known[:, None], predictions[:, :-1]], dim=1)
            repeated = (new_state == state).all(-1)
            for i in torch.nonzero(~converged & ~repeated).flatten().tolist():
                states[i].append(new_state[i].tolist())
            converged |= repeated
            # A converged row keeps its fixed point as input, so its cache slots stay right.
            state = torch.where(converged[:, None], state, new_state)
            if bool(converged.all()):
                break
            cache.crop(-n)  # drop the block's slots; the next pass rewrites them
        else:
            raise RuntimeError("full-block Jacobi iteration did not converge in 2n+2 passes (non-deterministic model?)")
        known = predictions[:, -1]  # argmax p(. | context + fixed point): first token of the next block

        finished = []
        for i, row in enumerate(rows):
            blocks[row].append((list(generated[row]), states[i]))
            generated[row].extend(states[i][-1])
            if eos_ids & set(states[i][-1]) or len(generated[row]) >= max_new_tokens:
                finished.append(i)
        attention_mask = torch.cat([attention_mask, torch.ones((len(rows), n), dtype=torch.long)], dim=1)
        next_position = next_position + n
        if finished:
            keep = torch.tensor([i for i in range(len(rows)) if i not in set(finished)], dtype=torch.long)
            rows = [rows[i] for i in keep.tolist()]
            if rows:
                cache.batch_select_indices(keep.to(device))
                attention_mask, next_position, known = attention_mask[keep], next_position[keep], known[keep]
    return blocks


def _block_guess(
    known: torch.Tensor, n: int, prompts: list[torch.Tensor], generators: list[torch.Generator], init: str
) -> torch.Tensor:
    """Initial state of a block, [rows, n]: n guesses per row from the init strategy (`repeat`: the known token)."""
    if init == "repeat":
        return known[:, None].expand(-1, n).clone()
    return torch.cat([initial_guess([p], n, init, 0, g) for p, g in zip(prompts, generators)], dim=0)


def augment_states(states: list[list[int]], rng: random.Random) -> list[list[int]]:
    """Official CLLM augmentation: for each intermediate state with k > 1 wrong tokens, a copy with a random
    number (1..k-1) of its wrong tokens set to the fixed point's — states closer to y* than the trajectory had."""
    fixed_point = states[-1]
    augmented = []
    for state in states[1:-1]:
        wrong = [i for i, (a, b) in enumerate(zip(state, fixed_point)) if a != b]
        if len(wrong) < 2:
            continue
        copy = list(state)
        for i in rng.sample(wrong, rng.randint(1, len(wrong) - 1)):
            copy[i] = fixed_point[i]
        augmented.append(copy)
    return augmented
