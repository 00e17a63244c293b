"""Two `pmixed serve` processes share one PostgreSQL budget (issue 13): 16 concurrent streams at
each against a budget that runs out part-way. The total charged never exceeds the budget, every
token sent was charged, and every stream ends with a finish reason that says why."""

from __future__ import annotations

import json
import threading
import tomllib

import pytest

httpx = pytest.importorskip("httpx")

from pmixed.privacy.ledger import Ledger, net_count  # noqa: E402
from tests.privacy.pg import budget_url  # noqa: E402
from tests.serve.conftest import start_serve  # noqa: E402
from tests.train.helpers import write_toml  # noqa: E402

BUDGET = 60  # queries the config's mechanism affords at its epsilon
STREAMS = 16


def test_two_server_processes_share_one_postgresql_budget(serve_run, tmp_path):
    from pmixed.serve.keys import KeyStore

    _, cfg_path = serve_run
    data = tomllib.loads(cfg_path.read_text())
    data["privacy"]["queries"] = BUDGET  # calibrated so that the ledger's epsilon buys 60 tokens
    small = write_toml(data, tmp_path / "small.toml")
    url = budget_url()
    keys = tmp_path / "keys.db"
    _, key = KeyStore(keys).create("c")
    procs = [start_serve(small, keys, url) for _ in range(2)]
    results: list[tuple[str | None, int]] = []
    lock = threading.Lock()

    def stream(base: str, i: int) -> None:
        body = {"model": "tiny", "prompt": f"the harbor {i}", "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        finish, tokens = None, 0
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status_code == 429:  # budget spent before its first token
                finish = "refused"
            else:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        ch = json.loads(line[6:])
                        for c in ch.get("choices", []):
                            finish = c.get("finish_reason") or finish
                        if ch.get("usage"):
                            tokens = ch["usage"]["completion_tokens"]
        with lock:
            results.append((finish, tokens))

    try:
        threads = [threading.Thread(target=stream, args=(u, i)) for _, u in procs for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert len(results) == 2 * STREAMS
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait(timeout=30)
    assert {f for f, _ in results} <= {"length", "budget", "stop", "refused"}
    assert any(f in ("budget", "refused") for f, _ in results)  # it ran out part-way
    sent = sum(t for _, t in results)
    with Ledger.open(url) as led:
        assert net_count(led.history()) == sent <= BUDGET  # every sent token charged, never over
        assert led.epsilon_spent() <= led.epsilon
