"""The engine and training on ``[run] device``: the same numbers as on the CPU.

Every test runs on the CPU (CI: the device path against a separate CPU runtime, equal to the
last bit) and, where CUDA is available, on the GPU (equal within float32 rounding). The CUDA
cases are how a machine with a GPU checks the GPU path: ``pytest tests/eval/test_engine_device.py``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pmixed.eval.block_stats import block_stats
from pmixed.eval.scoring import score_block
from pmixed.mechanism.pmixed import PMixED
from pmixed.mechanism.teacher_forcing import released_target_probs
from pmixed.privacy.ledger import Ledger

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
# float32 forwards on another device differ by rounding; on the same device not at all
RTOL = {"cpu": 0.0, "cuda": 1e-4}


def on(cfg, device: str, **run):
    return cfg.replace(run=dataclasses.replace(cfg.run, device=device, **run))


@pytest.fixture(scope="module")
def cpu_runtime(trained_run):
    from pmixed.eval.runner import load_runtime

    cfg, _ = trained_run
    return load_runtime(on(cfg, "cpu"), progress=False)[1]


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    a, b = a.nan_to_num(-1.0), b.nan_to_num(-1.0)  # nan (pairs not computed) must match too
    return bool(torch.equal(a, b)) if rtol == 0 else bool(torch.allclose(a, b, rtol=rtol, atol=1e-10))


@pytest.mark.parametrize("device", DEVICES)
def test_block_statistics_on_the_device_equal_the_cpus(trained_run, cpu_runtime, device):
    from pmixed.eval.runner import load_runtime

    cfg, _ = trained_run
    _, rt = load_runtime(on(cfg, device), progress=False)
    assert rt.device.type == device
    block = torch.randint(0, 300, (33,), generator=torch.Generator().manual_seed(11))
    needed = torch.rand(32, rt.n_members, generator=torch.Generator().manual_seed(12)) < 0.4
    needed[25:, 0] = False
    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=32, ensemble_size=rt.n_members, sample_rate=0.4, alpha=3)
    extras = tuple(rt.extra_index)
    for average in (True, False):
        for chunk in (1, rt.n_members):
            got, got_x, got_avg = block_stats(rt, block, max_order=3, needed=needed, extras=extras,
                                                 chunk=chunk, average=average)
            want, want_x, want_avg = block_stats(cpu_runtime, block, max_order=3, needed=needed, extras=extras,
                                                             chunk=chunk, average=average)
            for g, w in ((got.moments, want.moments), (got.member_target, want.member_target),
                         (got.public_target, want.public_target), *((got_x[e], want_x[e]) for e in extras)):
                assert g.device.type == "cpu" and g.dtype == torch.float64  # handed back on the CPU
                assert close(g, w, RTOL[device]), (average, chunk)
            assert (got_avg is None) == (want_avg is None) == (not average)
            released, _ = released_target_probs(got, needed, mech.params)
            ref, _ = released_target_probs(want, needed, mech.params)
            assert close(released, ref, RTOL[device])


@pytest.mark.parametrize("device", DEVICES)
def test_generation_and_scoring_on_the_device(trained_run, cpu_runtime, device, tmp_path):
    from pmixed.engine import PrivatePredictor
    from pmixed.eval.runner import load_runtime

    cfg, _ = trained_run
    _, rt = load_runtime(on(cfg, device), progress=False)
    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=40, ensemble_size=rt.n_members, sample_rate=0.5)
    block = torch.randint(0, 300, (21,), generator=torch.Generator().manual_seed(13))
    out = {}
    for name, runtime in (("dev", rt), ("cpu", cpu_runtime)):
        with Ledger(tmp_path / f"{name}.ledger", epsilon=8.0, delta=1e-5) as led:
            pred = PrivatePredictor(runtime, mech, led, generator=torch.Generator().manual_seed(14))
            probs = score_block(pred, block)
            gen = pred.generate("apple banana", max_new_tokens=8, stop_at_eos=False)
            out[name] = (probs, gen, led.charges())
    (p_dev, g_dev, n_dev), (p_cpu, g_cpu, n_cpu) = out["dev"], out["cpu"]
    assert p_dev.device.type == "cpu" and close(p_dev, p_cpu, RTOL[device])
    assert n_dev == n_cpu == 1 + len(g_dev.token_ids) and len(g_dev.token_ids) == 8
    if device == "cpu":  # same draws, same distributions: the same tokens
        assert g_dev.token_ids == g_cpu.token_ids
    assert all(0 <= t < len(rt.tokenizer) for t in g_dev.token_ids)


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_the_device_matches_the_cpu(trained_run, device, tmp_path):
    """The ensemble and the fine-tune baseline trained on the device: the same losses (dropout
    is off in this config, so only float rounding can differ)."""
    from pmixed.train.ensemble import MEMBER_RECORD, member_name, train_ensemble
    from pmixed.train.finetune import train_finetune

    cfg, _ = trained_run
    dev_cfg = on(cfg, device, output_dir=str(tmp_path / "run"))
    train_ensemble(dev_cfg, progress=False)
    rec = train_finetune(dev_cfg, progress=False)
    for i in range(cfg.data.n_parts):
        name = member_name(i)
        mine = json.loads((tmp_path / "run" / "members" / name / MEMBER_RECORD).read_text())
        ref = json.loads((cfg.output_dir / "members" / name / MEMBER_RECORD).read_text())
        assert mine["steps"] == ref["steps"]
        for key in ("first_train_loss", "final_train_loss"):
            assert mine[key] == pytest.approx(ref[key], rel=RTOL[device] * 10 or 1e-12), (name, key)
    ref = json.loads((cfg.output_dir / "finetune" / "finetune.json").read_text())
    assert rec["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=RTOL[device] * 10 or 1e-12)
