"""Fixtures of the server tests: a tiny trained ensemble, and a real uvicorn server on loopback
(127.0.0.1, a free port) over the real decode engine and a real SQLite ledger."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory):
    """A tiny base and a 3-member ensemble (no baselines: the server needs none), with its config
    file. The mechanism is calibrated for 2000 queries at epsilon 8."""
    from pmixed.config import load_config
    from pmixed.train.ensemble import train_ensemble
    from tests.train.helpers import build_tiny_base, tiny_config_dict, write_records, write_toml

    root = tmp_path_factory.mktemp("serverun")
    base = build_tiny_base(root / "base")
    records = write_records(root / "records.jsonl", n_units=9, per_unit=4)
    data = tiny_config_dict(base, records, root / "out", n_parts=3, train__max_steps=4)
    data["privacy"] = {"epsilon": 8.0, "delta": 1e-5, "queries": 2000, "sample_rate": 0.5}
    cfg_path = write_toml(data, root / "serve.toml")
    cfg = load_config(cfg_path)
    train_ensemble(cfg, progress=False)
    return cfg, cfg_path


@pytest.fixture(scope="session")
def serve_runtime(serve_run):
    from pmixed.eval.runner import load_runtime

    return load_runtime(serve_run[0], progress=False)[1]


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    decoder: Any
    ledger: Any
    keys: Any
    user_key: str
    admin_key: str
    app: Any

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def charged(self) -> int:
        """Tokens charged to the ledger so far (the sum of the charges' counts)."""
        from pmixed.privacy.ledger import record_count

        return sum(record_count(r) for r in self.ledger.history())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(cfg_path, keys, ledger, *extra: str, port: int | None = None):
    """``pmixed serve`` in a subprocess on 127.0.0.1 (``extra``: more CLI arguments); waits,
    bounded (60 s), until /healthz answers. Returns (process, base URL)."""
    import httpx

    port = free_port() if port is None else port
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pmixed", "serve", "--config", str(cfg_path), "--host", "127.0.0.1",
         "--port", str(port), "--keys", str(keys), "--ledger", str(ledger), "--model-name", "tiny", *extra],
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


def stop_serve(proc) -> str:
    """SIGTERM (a graceful shutdown), bounded; returns what the server wrote to stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerFactory:
    """Starts servers (each its own decoder, ledger and key file); stops them all at the end."""

    def __init__(self, cfg, runtime, tmp: Path):
        self.cfg, self.runtime, self.tmp = cfg, runtime, tmp
        self._live: list[tuple[Any, threading.Thread, Served]] = []
        self._started = 0

    def start(self, *, ledger_epsilon: float | None = None, quota: int | None = None,
              public_continuation: bool = False, mode: str = "constant", max_active: int = 8,
              max_queue: int = 32, log_text: bool = False, limits=None, mechanism=None) -> Served:
        """``mechanism``: the engine's (default: plain PMixED from the config); its ledger is
        created under the mechanism's acceptance rule (screened PMixED: its Renyi filter)."""
        import uvicorn

        from pmixed.mechanism.pmixed import PMixED
        from pmixed.privacy.ledger import Ledger
        from pmixed.serve.app import create_app
        from pmixed.serve.keys import KeyStore
        from pmixed.serve.scheduler import Decoder

        n, self._started = self._started, self._started + 1
        folder = self.tmp / f"server{n}"
        folder.mkdir(parents=True)
        p = self.cfg.privacy
        mech = PMixED.from_config(p, self.runtime.n_members) if mechanism is None else mechanism
        led = Ledger(folder / "serve.ledger", epsilon=ledger_epsilon or p.epsilon, delta=p.delta,
                     rule=getattr(mech, "rule", None))
        keys = KeyStore(folder / "keys.db")
        _, user = keys.create("user", quota=quota)
        _, admin = keys.create("admin", admin=True, quota=None)
        dec = Decoder(self.runtime, mech, led, mode=mode, max_active=max_active, max_queue=max_queue,
                      public_continuation=public_continuation).start()
        app = create_app(dec, keys=keys, model_name="tiny", log_text=log_text, limits=limits)
        sock = _free_socket()
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                               timeout_graceful_shutdown=2))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        for _ in range(200):  # bounded: 10 s
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "the test server did not start"
        s = Served(f"http://127.0.0.1:{port}", dec, led, keys, user, admin, app)
        self._live.append((server, thread, s))
        return s

    def stop(self, s: Served) -> None:
        for i, (server, thread, live) in enumerate(self._live):
            if live is s:
                server.should_exit = True
                thread.join(timeout=10)
                live.decoder.close()
                live.ledger.close()
                live.keys.close()
                del self._live[i]
                return

    def close(self) -> None:
        for _, _, s in list(self._live):
            self.stop(s)


@pytest.fixture(scope="module")
def servers(serve_run, serve_runtime, tmp_path_factory):
    f = ServerFactory(serve_run[0], serve_runtime, tmp_path_factory.mktemp("servers"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def server(servers) -> Served:
    """The module's main server: a large budget, no quota on the user key."""
    return servers.start()


def epsilon_for_queries(cfg, runtime, k: int) -> float:
    """The ledger limit that pays for exactly ``k`` tokens of ``cfg``'s mechanism (and not k + 1)."""
    from pmixed.mechanism.pmixed import PMixED
    from pmixed.privacy.accountant import RdpCharge
    from pmixed.privacy.ledger import MEMORY, Ledger

    mech = PMixED.from_config(cfg.privacy, runtime.n_members)
    eps = []
    for count in (k, k + 1):
        with Ledger(MEMORY, epsilon=1e6, delta=cfg.privacy.delta) as led:
            led.charge(RdpCharge(led.orders, mech.query_rdp(led.orders), count=count))
            eps.append(led.epsilon_spent())
    return (eps[0] + eps[1]) / 2
