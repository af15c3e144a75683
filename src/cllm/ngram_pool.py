"""The n-gram pool of rejection recycling (`recycle` in `cllm.decoders`): one per row, bounded, most recent first."""

from __future__ import annotations

from collections.abc import Sequence


class NGramPool:
    """Bounded n-gram pool of one row: up to `per_key` distinct n-grams per first token, most recent first."""

    def __init__(self, length: int, per_key: int) -> None:
        self.length, self.per_key = length, per_key
        self.grams: dict[int, list[tuple[int, ...]]] = {}

    def add(self, gram: Sequence[int]) -> None:
        gram = tuple(gram)
        if len(gram) < 2:
            return
        bucket = self.grams.setdefault(gram[0], [])
        if gram in bucket:
            bucket.remove(gram)
        bucket.insert(0, gram)
        del bucket[self.per_key :]

    def add_all(self, tokens: Sequence[int], starts: range | None = None) -> None:
        """Add the n-grams of `tokens` starting at `starts` (default: every start with a full n-gram)."""
        tokens = list(tokens)
        for start in starts if starts is not None else range(len(tokens) - self.length + 1):
            self.add(tokens[start : start + self.length])

    def candidates(self, first: int, count: int, exclude: Sequence[int]) -> list[tuple[int, ...]]:
        """Up to `count` n-grams starting with `first`, skipping those that are a prefix of `exclude`."""
        exclude = tuple(exclude)
        picked = [g for g in self.grams.get(first, []) if exclude[: len(g)] != g]
        return picked[:count]


def seeded_pools(
    prompts: Sequence[Sequence[int]], length: int, per_key: int, planted: Sequence[Sequence[int]] = ()
) -> list[NGramPool]:
    """One pool per row holding its prompt's n-grams, then the `planted` ones (most recent first, so those lead)."""
    pools = [NGramPool(length, per_key) for _ in prompts]
    for pool, prompt in zip(pools, prompts):
        pool.add_all(prompt)
        for gram in planted:
            pool.add(gram)
    return pools
