"""Two decode engines in two processes share one PostgreSQL budget (issue 13, item 4): 16
concurrent requests each against a budget that runs out part-way. The total charged never
exceeds the budget and every token sent was charged (whether the Decoder charges per step or
through reservations: charges are counted net of refunds)."""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")

from pmixed.privacy.ledger import Ledger, net_count  # noqa: E402
from tests.privacy.pg import budget_url  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

N = 3
REQUESTS = 16
QUERIES = 120  # what the budget affords; the requests want 2 x 104 tokens


def max_tokens(i: int) -> int:
    return 2 + (i % 4) * 3  # 2, 5, 8, 11: short requests finish, long ones meet the empty budget
EPSILON, DELTA = 8.0, 1e-5


def mech():
    from pmixed.mechanism.pmixed import PMixED

    return PMixED(epsilon=EPSILON, delta=DELTA, query_budget=QUERIES, ensemble_size=N, sample_rate=0.5,
                  lam_max=0.9)


def _serve(url: str, seed: int, barrier, out) -> None:
    """One server process: its own runtime, Decoder and ledger connection."""
    try:
        import torch

        from pmixed.models.runtime import EnsembleRuntime
        from pmixed.serve.scheduler import Decoder
        from pmixed.serve.stream import SamplingParams
        from tests.models.test_stacked_lora import ARCHS, save_adapters

        torch.set_num_threads(1)
        make, targets, fifo = ARCHS["gpt2"]
        base = make()
        with tempfile.TemporaryDirectory() as tmp:
            runtime = EnsembleRuntime(base, None, save_adapters(base, targets, fifo, Path(tmp), n=N, seed=seed))
            with Ledger.open(url) as led, Decoder(runtime, mech(), led, max_active=REQUESTS, max_queue=REQUESTS) as dec:
                barrier.wait(120)  # both engines start on the shared budget together
                streams = [dec.submit([1 + (i + seed) % 7, 2, 3],
                                      SamplingParams(max_tokens=max_tokens(i), stop_at_eos=False))
                           for i in range(REQUESTS)]
                sent = [0] * REQUESTS
                public = [0] * REQUESTS

                def read(i):
                    for tok in streams[i]:
                        sent[i] += 1
                        public[i] += bool(getattr(tok, "public_only", False))

                threads = [threading.Thread(target=read, args=(i,)) for i in range(REQUESTS)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=300)
                out.put(("ok", sent, public, [s.finish_reason for s in streams]))
    except BaseException as e:  # reported to the parent
        out.put(("error", repr(e)))


def test_two_server_processes_share_one_postgres_budget():
    url = budget_url()
    Ledger(url, epsilon=EPSILON, delta=DELTA).close()
    with Ledger.open(url) as led:
        budget_tokens = led.queries_left(mech().query_rdp(led.orders))
    assert budget_tokens == QUERIES < 2 * sum(max_tokens(i) for i in range(REQUESTS))  # runs out part-way

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(url, seed, barrier, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=400) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert all(r[0] == "ok" for r in results), results

    sent = [sum(r[1]) for r in results]
    public = sum(sum(r[2]) for r in results)
    reasons = [reason for r in results for reason in r[3]]
    with Ledger.open(url) as led:  # replays every charge (and refund) on open
        charged = net_count(led.history())
        assert led.epsilon_spent() <= led.epsilon
        assert led.queries_left(mech().query_rdp(led.orders)) >= 0
    print("shared budget:", budget_tokens, "tokens; sent", sent, "charged", charged, "reasons", sorted(set(reasons)))
    assert public == 0  # public continuation is off: every token sent was private
    assert sum(sent) <= charged <= budget_tokens  # every token sent was charged; never over budget
    assert all(s > 0 for s in sent), sent  # both processes spent from the one budget
    assert set(reasons) == {"length", "budget"}
    for r in results:
        for i, (n, reason) in enumerate(zip(r[1], r[3])):
            assert (reason == "length") == (n == max_tokens(i)) and n <= max_tokens(i)
