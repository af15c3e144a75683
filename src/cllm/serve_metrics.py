"""`GET /metrics` of `cllm serve`: counters and histograms in the Prometheus text format (version 0.0.4).

Kept in the HTTP process (one per server), fed by every answer the worker sends: requests by route and status,
prompt and completion tokens, decode passes (accepted tokens per pass = completion tokens / passes, prefill excluded,
AR = 1.0), latency and time to first token.
"""

from __future__ import annotations

import bisect
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        total, out = 0, []
        for bound, count in zip(self.buckets, self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """The server's running totals; `text()` renders them."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, HTTP status) -> count
        self.prompt_tokens = self.completion_tokens = self.decode_passes = self.recycled_passes = 0
        self.in_flight = self.batch_rows = 0
        self.latency, self.first_token = Histogram(), Histogram()

    def request_done(self, route: str, status: int, seconds: float | None = None) -> None:
        self.requests[(route, status)] += 1
        if seconds is not None:
            self.latency.observe(seconds)

    def choice_done(self, message: dict) -> None:
        """A choice's last message from the worker (its totals)."""
        self.completion_tokens += message["completion_tokens"]
        self.decode_passes += message["decode_passes"]
        self.recycled_passes += message["recycled_passes"]

    def text(self) -> str:
        per_pass = self.completion_tokens / self.decode_passes if self.decode_passes else 0.0
        lines = [
            "# HELP cllm_requests_total Requests answered, by route and HTTP status.",
            "# TYPE cllm_requests_total counter",
        ]
        lines += [f'cllm_requests_total{{route="{r}",status="{s}"}} {c}' for (r, s), c in sorted(self.requests.items())]
        for name, kind, value, text in (
            ("cllm_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens of finished requests."),
            ("cllm_completion_tokens_total", "counter", self.completion_tokens, "Completion tokens returned."),
            ("cllm_decode_passes_total", "counter", self.decode_passes, "Decoding forward passes (prefill excluded)."),
            ("cllm_recycled_passes_total", "counter", self.recycled_passes, "Passes won by a recycled n-gram."),
            ("cllm_accepted_tokens_per_pass", "gauge", per_pass, "Completion tokens / decode passes (AR = 1.0)."),
            ("cllm_requests_in_flight", "gauge", self.in_flight, "Requests being decoded or queued now."),
            ("cllm_batch_rows", "gauge", self.batch_rows, "Rows in the latest decoding pass."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        for name, histogram, text in (
            ("cllm_request_latency_seconds", self.latency, "Time from request to last byte."),
            ("cllm_time_to_first_token_seconds", self.first_token, "Time from request to the first decoded text."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *histogram.lines(name)]
        return "\n".join(lines) + "\n"
