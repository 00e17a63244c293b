"""The server SIGKILLed mid-stream, then restarted on the same ledger: the spent budget covers at
least every token that was sent before the kill, and the restarted server keeps spending from it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cfg_path, keys, ledger, port):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pmixed", "serve", "--config", str(cfg_path), "--host", "127.0.0.1",
         "--port", str(port), "--keys", str(keys), "--ledger", str(ledger), "--model-name", "tiny"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):  # bounded: 60 s
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.25)
    proc.kill()
    raise AssertionError("pmixed serve did not come up")


def test_sigkill_mid_stream_then_restart_keeps_every_sent_token_charged(serve_run, tmp_path):
    from pmixed.mechanism.pmixed import PMixED
    from pmixed.privacy.ledger import Ledger, record_count
    from pmixed.serve.keys import KeyStore

    cfg, cfg_path = serve_run
    keys, ledger = tmp_path / "keys.db", tmp_path / "crash.ledger"
    _, key = KeyStore(keys).create("c")
    proc, url = _start(cfg_path, keys, ledger, _free_port())
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
    proc, url = _start(cfg_path, keys, ledger, _free_port())  # the restart resumes the budget
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
