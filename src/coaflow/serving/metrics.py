"""Prometheus text exposition for ``/metrics``, written by hand: four counters and a histogram do
not need a client library.

    coaflow_requests_total{endpoint="chat",status="200"} 12
    coaflow_request_seconds_bucket{endpoint="chat",le="0.5"} 9
    coaflow_prompt_tokens_total 1450 / coaflow_completion_tokens_total 980
    coaflow_decode_steps_total 310 / coaflow_decode_rows_total 1240 / coaflow_queue_depth 0
    coaflow_prefill_tokens_total 5200 / coaflow_prefix_cache_tokens_total 3900
"""

from __future__ import annotations

import threading
from collections import Counter

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENGINE_SERIES = (  # (name, type, help) of the engine's counters (engine.stats, less "_total")
    ("decode_steps_total", "counter", "Decode steps (one token for every row in the batch)."),
    ("decode_rows_total", "counter", "Rows summed over decode steps (/ steps: the mean batch)."),
    ("decode_seconds_total", "counter", "Seconds spent in decode steps."),
    ("prefill_tokens_total", "counter", "Prompt tokens encoded."),
    ("prefill_chunks_total", "counter", "Prompt chunks encoded (one between two decode steps)."),
    ("prefill_seconds_total", "counter", "Seconds spent encoding prompts."),
    ("prefix_cache_tokens_total", "counter", "Prompt tokens whose keys and values were reused "
     "from an earlier request instead of encoded."),
    ("preemptions_total", "counter", "Rows set aside (keys and values kept) to give another "
     "request its share of the batch."),
)


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
            for name, kind, text in ENGINE_SERIES:
                out += [f"# HELP coaflow_{name} {text}", f"# TYPE coaflow_{name} {kind}",
                        f"coaflow_{name} {stats[name.removesuffix('_total')]}"]
            out += ["# HELP coaflow_queue_depth Sequences waiting to be encoded or for a place.",
                    "# TYPE coaflow_queue_depth gauge",
                    f"coaflow_queue_depth {self.engine.queue_depth()}",
                    "# HELP coaflow_running_sequences Sequences in the decode batch.",
                    "# TYPE coaflow_running_sequences gauge",
                    f"coaflow_running_sequences {len(self.engine.running)}"]
        return "\n".join(out) + "\n"
