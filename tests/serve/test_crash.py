"""The server SIGKILLed mid-stream, then restarted on the same ledger: the spent budget covers at
least every token that was sent before the kill, and the restarted server keeps spending from it."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

httpx = pytest.importorskip("httpx")

from tests.serve.conftest import start_serve  # noqa: E402


def test_sigkill_mid_stream_then_restart_keeps_every_sent_token_charged(serve_run, tmp_path):
    from pmixed.mechanism.pmixed import PMixED
    from pmixed.privacy.ledger import Ledger, record_count
    from pmixed.serve.keys import KeyStore

    cfg, cfg_path = serve_run
    keys, ledger = tmp_path / "keys.db", tmp_path / "crash.ledger"
    _, key = KeyStore(keys).create("c")
    proc, url = start_serve(cfg_path, keys, ledger)
    received = 0
    try:
        body = {"model": "tiny", "prompt": "apple", "max_tokens": 200, "stream": True,
                "ignore_eos": True}  # the stream must still run when it is killed
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text"' in line:
                    received += 1  # one SSE chunk per released token (at least one token each)
                if received >= 5:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)
    assert received >= 5
    mech = PMixED.from_config(cfg.privacy, cfg.data.n_parts)
    with Ledger(ledger) as led:
        spent_queries = sum(record_count(rec) for rec in led.history())
        assert spent_queries >= received  # charge before send survived the kill
        spent = led.epsilon_spent()
        assert spent >= mech.epsilon_after(received) * (1 - 1e-12)
    proc, url = start_serve(cfg_path, keys, ledger)  # the restart resumes the budget
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "apple", "max_tokens": 3},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200
        n = r.json()["usage"]["completion_tokens"]
        p = httpx.get(url + "/v1/privacy", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        assert p["epsilon_spent"] >= spent
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    with Ledger(ledger) as led:
        assert sum(record_count(rec) for rec in led.history()) >= spent_queries + n
