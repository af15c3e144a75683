"""A row's text as its tokens arrive, for `cllm serve`: deltas that join to the whole text, cut at a stop string.

Each pass's delta is the newly decoded text minus a held-back tail: a dangling partial UTF-8 character (decoded as
U+FFFD until its last byte comes) and any ending that could still grow into a stop string. Held text goes out with a
later pass or the last one, so the deltas of a stream always join to the text a non-streamed request returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Tokens in, text deltas out; `finish_reason` "stop" at EOS or a stop string, "length" at the budget."""

    def __init__(self, tokenizer, stops: Sequence[str], eos_ids: Iterable[int]) -> None:
        self.tokenizer, self.stops, self.eos_ids = tokenizer, list(stops), set(eos_ids)
        self.tokens: list[int] = []  # the completion's tokens (after a stop string: up to the one completing it)
        self.sent = ""  # the deltas so far, joined

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def push(self, new_tokens: Sequence[int], done: bool) -> tuple[str, list[int], str | None]:
        """Take a pass's committed tokens (`done`: the decoder finished the row); return the text delta, the tokens
        that count toward the completion, and the finish reason (None while the row goes on)."""
        before = len(self.tokens)
        self.tokens += list(new_tokens)
        text, finish = self.decode(self.tokens), None
        if self.first_stop(text) is not None:
            for count in range(before + 1, len(self.tokens) + 1):  # the fewest tokens whose text holds the stop
                text = self.decode(self.tokens[:count])
                cut = self.first_stop(text)
                if cut is not None:
                    self.tokens, text, finish = self.tokens[:count], text[:cut], "stop"
                    break
        elif done:
            finish = "stop" if self.tokens and self.tokens[-1] in self.eos_ids else "length"
        visible = text if finish else text[: self.safe_length(text)]
        delta = visible[len(self.sent) :]
        self.sent += delta
        return delta, self.tokens[before:], finish

    def first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in `text`, None if none occurs."""
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        return min(found) if found else None

    def safe_length(self, text: str) -> int:
        """How much of `text` can go out now: without a trailing partial character or a stop string's beginning."""
        end = len(text)
        while end and text[end - 1] == REPLACEMENT:
            end -= 1
        held = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, end), held, -1):
                if text.endswith(stop[:length], 0, end):
                    held = length
                    break
        return end - held
