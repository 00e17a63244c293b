"""Prometheus metrics of the server, in a registry of its own (never the process-global one).

Counted by the app: requests by route and status, tokens released (private / public-only),
prompt tokens, request duration, time to the first token, and the time between two tokens of a
stream (a histogram of the decode step time as clients see it). Read from the engine at scrape time:
the budget (``Decoder.privacy()``: epsilon spent / left / limit, queries left; screened PMixED:
units left and the Renyi filter's order) and the decode loop's counters (``Decoder.stats()``:
steps, tokens, step seconds, batch rows, a step-time histogram where the engine keeps one;
screened PMixED: units taken and the tokens its screen answered from the public model).

/metrics needs an admin key: in drawn mode the batch rows and step times of single steps depend on
how many members were drawn, which the guarantee needs hidden (docs/privacy.md); aggregates over
many steps say little, but the operator decides who sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


_ENGINE_COUNTERS = {
    "steps": "Decode steps run.",
    "tokens_private": "Tokens released by the mechanism (each charged before it was sent).",
    "tokens_public": "Tokens sampled from the public model alone (public continuation).",
    "requests": "Requests the engine admitted.",
    "step_seconds_total": "Seconds spent in decode steps.",
    "charges": "Durable ledger transactions.",
    "batch_rows": "Rows run in decode forwards (constant mode: does not depend on the draw).",
    "units": "Screened PMixED: screen rounds opened, each paid by one unit taken before it opened.",
    "tokens_screened_public": "Screened PMixED: tokens the screen answered from the public model "
                              "(covered by their round's unit; also counted in tokens_private).",
}
_ENGINE_GAUGES = {
    "active": "Requests being decoded.",
    "queued": "Requests waiting for a slot.",
    "last_step_seconds": "Duration of the last decode step.",
    "cache_bytes_per_request": "Upper bound of one request's KV caches, bytes.",
}


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class _EngineCollector(Collector):
    """The engine's figures at scrape time; a failing read reports nothing rather than failing."""

    def __init__(self, privacy: Callable[[], Mapping[str, Any]], stats: Callable[[], Mapping[str, Any]]):
        self._privacy, self._stats = privacy, stats

    def describe(self) -> Iterable:
        return []  # unchecked collector: the engine decides which counters it has

    def collect(self) -> Iterable:
        try:
            priv = dict(self._privacy())
        except Exception:  # noqa: BLE001 - a scrape never breaks the server
            priv = {}
        for key, help_ in (("epsilon_spent", "Privacy budget spent (epsilon at the ledger's delta)."),
                           ("epsilon_left", "Privacy budget left (epsilon)."),
                           ("epsilon_limit", "The deployment's epsilon limit."),
                           ("queries_left", "Tokens (screened PMixED: units) the budget still affords."),
                           ("delta", "The guarantee's delta."),
                           ("filter_order", "Screened PMixED: the Renyi filter's order.")):
            v = _num(priv.get(key))
            if v is not None:
                yield GaugeMetricFamily(f"pmixed_budget_{key}", help_, value=v)
        try:
            stats = dict(self._stats())
        except Exception:  # noqa: BLE001
            stats = {}
        for key, value in sorted(stats.items()):
            name = "pmixed_engine_" + "".join(c if c.isalnum() else "_" for c in key)
            if isinstance(value, Mapping) and "buckets" in value:  # {"buckets": {le: count}, "sum": s}
                buckets = sorted(((float(le), int(c)) for le, c in dict(value["buckets"]).items()))
                cum, out = 0, []
                for le, c in buckets:
                    cum += c
                    out.append(("+Inf" if math.isinf(le) else repr(le), cum))
                if not out or out[-1][0] != "+Inf":
                    out.append(("+Inf", cum + int(value.get("overflow", 0))))
                yield HistogramMetricFamily(name, f"engine {key}", buckets=out,
                                            sum_value=float(value.get("sum", 0.0)))
                continue
            v = _num(value)
            if v is None:
                continue
            if key in _ENGINE_COUNTERS or key.endswith("_total"):
                base = name[: -len("_total")] if name.endswith("_total") else name
                yield CounterMetricFamily(base, _ENGINE_COUNTERS.get(key, f"engine counter {key}"), value=v)
            else:
                yield GaugeMetricFamily(name, _ENGINE_GAUGES.get(key, f"engine gauge {key}"), value=v)


class Metrics:
    """The server's metrics. ``bind(decoder)`` adds the engine's figures to the registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pmixed_http_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=r)
        self.tokens = Counter("pmixed_tokens_released", "Completion tokens sent to clients "
                              "(kind: private = charged to the ledger, public = public model alone).",
                              ["kind"], registry=r)
        self.prompt_tokens = Counter("pmixed_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.duration = Histogram("pmixed_request_duration_seconds", "Completion request duration.",
                                  ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pmixed_time_to_first_token_seconds", "Time to the first token.",
                              ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("pmixed_inter_token_seconds", "Time between two tokens of a stream "
                                     "(one decode step as a client sees it).", buckets=_STEP_BUCKETS,
                                     registry=r)
        self.finish = Counter("pmixed_finish_reasons", "Choices by finish reason.", ["reason"], registry=r)
        self._bound = False

    def bind(self, decoder: Any) -> None:
        if not self._bound:
            self.registry.register(_EngineCollector(decoder.privacy, getattr(decoder, "stats", dict)))
            self._bound = True

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
