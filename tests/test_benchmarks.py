"""Smoke test of benchmarks/mechanism.py and benchmarks/naive_reference.py at a tiny size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import mechanism as bench  # noqa: E402
from naive_reference import NaiveConfig, naive_block, naive_release  # noqa: E402
from pmixed.mechanism.pmixed import PMixED  # noqa: E402

V, N, P = 1000, 8, 16


def _is_distribution(d: torch.Tensor) -> bool:
    return (
        d.dtype == torch.float64
        and bool(torch.isfinite(d).all())
        and bool((d >= 0).all())
        and abs(float(d.sum()) - 1.0) < 1e-9
    )


@pytest.fixture(scope="module")
def mech():
    return PMixED(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=N, sample_rate=0.3)


@pytest.mark.parametrize("regime", ["near", "far"])
def test_releases_are_distributions(mech, regime):
    gen = torch.Generator().manual_seed(1)
    cfg = NaiveConfig(sample_rate=0.3)
    public, members = bench.make_query(V, N, regime, gen)
    assert public.dtype == torch.float32 and members.shape == (N, V)
    for m in (0, 1, 3):
        ours = mech.release(public, members[:m])
        naive = naive_release(public, members[:m], cfg)
        assert ours.shape == naive.shape == (V,)
        assert _is_distribution(ours) and _is_distribution(naive)
    # the naive projection lands near the ball's edge: never further from p_0 than the member
    assert (
        float((naive - public.double()).abs().sum())
        <= float((members[:3].double().mean(0) - public.double()).abs().sum()) + 1e-9
    )

    bpub, rows, row_position, _row_member, targets = bench.make_block(mech, V, P, regime, gen)
    assert bpub.shape == (P, V) and rows.shape[0] == row_position.shape[0]
    full, lam = mech.release_rows(bpub, rows, row_position)
    assert all(_is_distribution(full[p]) for p in range(P))
    assert bool(((lam >= 0) & (lam <= mech.params.lam_max)).all())
    picked, _ = mech.release_rows(bpub, rows, row_position, targets=targets)
    assert torch.allclose(picked, full.gather(1, targets[:, None]).squeeze(1), rtol=1e-12, atol=0.0)
    nb = naive_block(bpub, rows, row_position, cfg)
    assert nb.shape == (P, V) and all(_is_distribution(nb[p]) for p in range(P))
    nbt = naive_block(bpub, rows, row_position, cfg, targets=targets, positions=range(4))
    assert torch.allclose(nbt, nb[:4].gather(1, targets[:4, None]).squeeze(1))


def test_main_runs_tiny(capsys):
    threads = torch.get_num_threads()
    try:
        out = _run_main()
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide
    text = capsys.readouterr().out
    assert "per-token speedup (naive/ours)" in text and "block speedup" in text
    assert text.strip().splitlines()[-1].startswith('{"benchmark": "mechanism"')
    for r in out["results"]:
        assert r["speedup_token"] > 0 and r["speedup_block"] > 0
        assert r["naive_block_scaled"] is True
        assert r["checks"]["block_matches_per_token"]
        assert abs(r["checks"]["ours_sum"] - 1) < 1e-9 and abs(r["checks"]["naive_sum"] - 1) < 1e-9


def _run_main():
    return bench.main([
        "--vocab", str(V), "--members", str(N), "--rate", "0.3", "--positions", str(P),
        "--repeats", "1", "--block-repeats", "1", "--warmup", "1", "--draws", "2",
        "--naive-positions", "4", "--threads", "1", "--json",
    ])  # fmt: skip
