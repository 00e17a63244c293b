"""Smoke tests of benchmarks/mechanism.py, naive_reference.py, eval_speed.py, serve_speed.py and
sampling_speed.py at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pmixed.mechanism.pmixed import PMixED  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_module(name: str):
    """benchmarks/<name>.py loaded from its file (the folder is no package, and a third-party
    distribution installs a top-level ``benchmarks`` package, so it cannot be imported by name)."""
    spec = importlib.util.spec_from_file_location(f"_pmixed_benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _bench_module("mechanism")
_naive = _bench_module("naive_reference")
naive_block, naive_release, rd_sym = _naive.naive_block, _naive.naive_release, _naive.rd_sym
rdp_budget, solve_beta = _naive.rdp_budget, _naive.solve_beta

V, N, P = 1000, 8, 16


@pytest.fixture
def keep_threads():
    """The benchmarks' ``--threads`` is process-wide: restore torch's thread count after a test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _is_distribution(d: torch.Tensor, dtype=torch.float64, tol=1e-9) -> bool:
    return (
        d.dtype == dtype
        and bool(torch.isfinite(d).all())
        and bool((d >= 0).all())
        and abs(float(d.sum()) - 1.0) < tol
    )


def _naive_ok(d: torch.Tensor) -> bool:  # the original's style: float32 throughout
    return _is_distribution(d, torch.float32, 1e-5)


NV = {"alpha": 3, "q": 0.3, "eps": rdp_budget(8.0, 1e-5, 3), "T": 1024}


def test_naive_beta_matches_reference_table():
    """REFERENCE.md s.2: beta for n = 1, 2, 3, 5, 10 is about 0.565, 0.194, 0.224, 0.258, 0.300."""
    eps = rdp_budget(8.0, 1e-5, 3)
    betas = [solve_beta(3, 0.03, n, eps, 1024) for n in (1, 2, 3, 5, 10)]
    for b, ref in zip(betas, (0.565, 0.194, 0.224, 0.258, 0.300), strict=True):
        assert abs(b - ref) < 2e-3


def test_naive_lambda_lands_near_the_ball_edge():
    gen = torch.Generator().manual_seed(3)
    public, members = bench.make_query(V, 2, "far", gen)
    out = naive_release(public, members[:1], **NV)
    beta = solve_beta(3, NV["q"], 1, NV["eps"], NV["T"])
    # far member: bisection (20 steps from [0, 1]) ends within 2^-20 of the edge, either side
    assert abs(rd_sym(out, public, 3) - 3 * beta) < 1e-2 * 3 * beta


@pytest.fixture(scope="module")
def mech():
    return PMixED(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=N, sample_rate=0.3)


@pytest.mark.parametrize("regime", ["near", "far", "mixed"])
def test_releases_are_distributions(mech, regime):
    gen = torch.Generator().manual_seed(1)
    public, members = bench.make_query(V, N, regime, gen)
    assert public.dtype == torch.float32 and members.shape == (N, V)
    for m in (0, 1, 3):
        ours = mech.release(public, members[:m])
        naive = naive_release(public, members[:m], **NV)
        assert ours.shape == naive.shape == (V,)
        assert _is_distribution(ours) and _naive_ok(naive)
    # the naive projection moves towards p_0: never further from p_0 than the members' mean
    assert (
        float((naive.double() - public.double()).abs().sum())
        <= float((members[:3].double().mean(0) - public.double()).abs().sum()) + 1e-6
    )

    bpub, rows, row_position, _row_member, targets, extra = bench.make_block(
        mech, V, P, regime, gen, chunk=4
    )
    assert extra["mask"].shape == (P, N) and int(extra["mask"].sum()) == rows.shape[0]
    probs, _ = bench.eval_path(mech, bpub, extra["template"], targets, extra["mask"])
    assert probs.shape == (P,) and bool(((probs >= 0) & (probs <= 1)).all())
    assert bpub.shape == (P, V) and rows.shape[0] == row_position.shape[0]
    full, lam = mech.release_rows(bpub, rows, row_position)
    assert all(_is_distribution(full[p]) for p in range(P))
    assert bool(((lam >= 0) & (lam <= mech.params.lam_max)).all())
    picked, _ = mech.release_rows(bpub, rows, row_position, targets=targets)
    assert torch.allclose(picked, full.gather(1, targets[:, None]).squeeze(1), rtol=1e-12, atol=0.0)
    nb = naive_block(bpub, rows, row_position, **NV)
    assert nb.shape == (P, V) and all(_naive_ok(nb[p]) for p in range(P))
    nbt = naive_block(bpub, rows, row_position, **NV, targets=targets, positions=range(4))
    assert torch.allclose(nbt, nb[:4].gather(1, targets[:4, None]).squeeze(1))


def test_main_runs_tiny(capsys, keep_threads):
    out = _run_main()
    text = capsys.readouterr().out
    assert "per-token speedup (naive/ours)" in text and "block speedup" in text
    assert text.strip().splitlines()[-1].startswith('{"benchmark": "mechanism"')
    for r in out["results"]:
        assert r["speedup_token"] > 0 and r["speedup_block"] > 0
        assert r["naive_block_scaled"] is True
        assert r["checks"]["block_matches_per_token"]
        assert abs(r["checks"]["ours_sum"] - 1) < 1e-9 and abs(r["checks"]["naive_sum"] - 1) < 1e-5
        assert r["speedup_block_eval_path"] > 0 and r["checks"]["eval_path_probs_in_0_1"]
    assert [r["regime"] for r in out["results"]] == ["near", "far", "mixed"]
    assert "PUBLISHED figure" in text and "NOT measured here" in text


def _run_main():
    return bench.main([
        "--vocab", str(V), "--members", str(N), "--rate", "0.3", "--positions", str(P),
        "--repeats", "1", "--block-repeats", "1", "--warmup", "1", "--draws", "2",
        "--naive-positions", "4", "--threads", "1", "--json",
    ])  # fmt: skip


def test_eval_speed_runs_tiny(capsys, keep_threads):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("scipy")
    eval_speed = _bench_module("eval_speed")

    out = eval_speed.main([
        "--model", "micro", "--members", "3", "--seq", "16", "--blocks", "1",
        "--repeats", "1", "--warmup", "1", "--naive-positions", "4", "--threads", "1",
        "--measure-memory", "--json",
    ])  # fmt: skip
    text = capsys.readouterr().out
    assert "P/F (PMixED / floor)" in text and "R/P (reference-style / PMixED)" in text
    assert "memory ratio (stacked / public, peak RSS)" in text
    assert "timed on 4/15 positions per block, scaled" in text
    assert out["P_over_F"] > 0 and out["R_over_P"] > 0 and out["mem_ratio"] > 0
    assert out["naive_mix_scaled"] is True
    assert out["max_abs_diff_engine_vs_peft"] < 1e-5  # the engine's members are PEFT's members
    assert out["P_vs_PA_max_rel_diff"] < 1e-6  # drawn pairs only = every pair, on the released probs
    assert out["R_over_PA"] > 0 and "(PA) PMixED + ensemble average" in text


def test_serve_speed_runs_micro_in_bf16(capsys, keep_threads):
    """Every timed path of the serving benchmark and one load run (a fresh subprocess), with the
    forwards in bf16 as ``--dtype bfloat16`` asks: the numbers are positive and the run says its
    precision."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    serve_speed = _bench_module("serve_speed")

    out = serve_speed.main([
        "--model", "micro", "--members", "3", "--tokens", "6", "--recompute-tokens", "2", "--prompt", "4",
        "--streams", "2", "--modes", "drawn", "--load-tokens", "3", "--dtype", "bfloat16", "--device", "cpu",
        "--json",
    ])  # fmt: skip
    assert out["dtype"] == "bfloat16" and out["device"] == "cpu"
    assert out["load"][0]["peak_gpu_mib"] is None  # a CPU run reports no GPU memory
    for key in ("D", "C", "Fd", "Fc", "Fw", "R", "S", "AD", "AC", "APD"):
        assert out[key] > 0, key
    assert all(v > 0 for v in out["ratios"].values())
    (load,) = out["load"]
    assert (load["mode"], load["streams"], load["tokens"]) == ("drawn", 2, 6) and load["tokens_per_s"] > 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    # the load part alone, two interleaved rounds: the median run, with both rates; staggered arrivals
    out = serve_speed.main(["--model", "micro", "--members", "3", "--prompt", "4", "--streams", "1,2",
                            "--modes", "drawn", "--load-tokens", "2", "--load-only", "--load-repeats", "2",
                            "--arrival-gap", "300"])
    text = capsys.readouterr().out
    assert "D" not in out and "2 interleaved round(s)" in text and "(runs: " in text
    assert "arriving 300 ms apart" in text and out["arrival_gap_ms"] == 300
    assert out["load"][1]["wall_s"] >= 0.3  # the second stream was submitted 300 ms after the first
    assert [len(r["tokens_per_s_runs"]) for r in out["load"]] == [2, 2]
    for r in out["load"]:
        assert r["tokens_per_s"] == min(r["tokens_per_s_runs"])  # the lower median of two


def test_sampling_speed_runs_tiny(capsys, keep_threads):
    out = _bench_module("sampling_speed").main(["--vocab", "256", "--rounds", "2", "--reps", "1", "--threads", "1"])
    text = capsys.readouterr().out
    assert "constant-time ms | sort-based ms" in text and len(out) == 5
    assert all(r["constant_ms"] > 0 and r["sort_based_ms"] > 0 for r in out.values())
