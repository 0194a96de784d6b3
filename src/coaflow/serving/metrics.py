"""Prometheus text exposition for ``/metrics``, written by hand: four counters and a histogram do
not need a client library.

    coaflow_requests_total{endpoint="chat",status="200"} 12
    coaflow_request_seconds_bucket{endpoint="chat",le="0.5"} 9
    coaflow_prompt_tokens_total 1450 / coaflow_completion_tokens_total 980
    coaflow_batches_total 7 / coaflow_batched_sequences_total 12 / coaflow_queue_depth 0
"""

from __future__ import annotations

import threading
from collections import Counter

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine=None):
        self.engine = engine
        self.lock = threading.Lock()
        self.requests: Counter = Counter()
        self.buckets: Counter = Counter()
        self.latency_sum: Counter = Counter()
        self.latency_count: Counter = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def request(self, endpoint: str, status: int, seconds: float, prompt_tokens: int = 0,
                completion_tokens: int = 0) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            self.latency_sum[endpoint] += seconds
            self.latency_count[endpoint] += 1
            for b in BUCKETS:
                if seconds <= b:
                    self.buckets[(endpoint, b)] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4).

        >>> m = Metrics(); m.request("chat", 200, 0.2, 10, 5)
        >>> [l for l in m.render().splitlines() if l.startswith(("coaflow_requests_total{", "coaflow_request_seconds_bucket{endpoint=\\"chat\\",le=\\"0.25"))]
        ['coaflow_requests_total{endpoint="chat",status="200"} 1', 'coaflow_request_seconds_bucket{endpoint="chat",le="0.25"} 1']
        """
        with self.lock:
            out = ["# HELP coaflow_requests_total Chat requests by endpoint and HTTP status.",
                   "# TYPE coaflow_requests_total counter"]
            out += [f'coaflow_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP coaflow_request_seconds Request latency (to the last token).",
                    "# TYPE coaflow_request_seconds histogram"]
            for e in sorted(self.latency_count):
                out += [f'coaflow_request_seconds_bucket{{endpoint="{e}",le="{b}"}} '
                        f'{self.buckets[(e, b)]}' for b in BUCKETS]
                out += [f'coaflow_request_seconds_bucket{{endpoint="{e}",le="+Inf"}} '
                        f'{self.latency_count[e]}',
                        f'coaflow_request_seconds_sum{{endpoint="{e}"}} {self.latency_sum[e]:.6f}',
                        f'coaflow_request_seconds_count{{endpoint="{e}"}} {self.latency_count[e]}']
            for name, value, text in (
                    ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens read."),
                    ("completion_tokens_total", self.completion_tokens, "Tokens generated.")):
                out += [f"# HELP coaflow_{name} {text}", f"# TYPE coaflow_{name} counter",
                        f"coaflow_{name} {value}"]
        stats = getattr(self.engine, "stats", None)
        if stats is not None:
            out += ["# HELP coaflow_batches_total Generate calls (each one batch).",
                    "# TYPE coaflow_batches_total counter", f"coaflow_batches_total {stats['batches']}",
                    "# HELP coaflow_batched_sequences_total Sequences generated in batches.",
                    "# TYPE coaflow_batched_sequences_total counter",
                    f"coaflow_batched_sequences_total {stats['batched_sequences']}",
                    "# HELP coaflow_decode_steps_total Decode steps of the engine (one token "
                    "per row of the batch).",
                    "# TYPE coaflow_decode_steps_total counter",
                    f"coaflow_decode_steps_total {stats.get('decode_steps', 0)}",
                    "# HELP coaflow_preemptions_total Batches stopped early to let a waiting "
                    "request in.",
                    "# TYPE coaflow_preemptions_total counter",
                    f"coaflow_preemptions_total {stats.get('preemptions', 0)}",
                    "# HELP coaflow_queue_depth Sequences waiting for a batch.",
                    "# TYPE coaflow_queue_depth gauge",
                    f"coaflow_queue_depth {self.engine.pending.qsize()}"]
        return "\n".join(out) + "\n"
