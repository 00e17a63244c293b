"""DP-SGD at the privacy unit: the clipped, noised unit average, its accounting, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from tests.train.helpers import tiny_config_dict, write_toml


def _lora_model(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    model.eval()  # no dropout: gradients are deterministic
    return model, [p for p in model.parameters() if p.requires_grad]


def _unit_grads(model, params, units):
    from pmixed.models.lm import lm_loss

    out = []
    for batch in units:
        model.zero_grad(set_to_none=True)
        lm_loss(model, batch).backward()
        out.append([p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    return out


def _norm(tensors):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def test_without_noise_or_clipping_it_is_the_average_of_unit_gradients(tiny_base):
    from pmixed.train.dpsgd_unit import unit_dp_gradient

    model, params = _lora_model(tiny_base)
    g = torch.Generator().manual_seed(0)
    units = [torch.randint(0, 300, (k, 16), generator=g) for k in (3, 1, 2)]
    expected = _unit_grads(model, params, units)
    step = unit_dp_gradient(model, params, units + [torch.zeros((0, 16), dtype=torch.long)],
                            max_grad_norm=1e9, noise_std=0.0, denominator=2.5, generator=None)
    assert step.drawn == 4 and len(step.losses) == 3  # the unit without a block adds nothing
    for j, p in enumerate(params):
        torch.testing.assert_close(p.grad, sum(e[j] for e in expected) / 2.5, rtol=1e-5, atol=1e-7)
    assert step.norms == pytest.approx([_norm(e) for e in expected], rel=1e-5)


def test_each_unit_contributes_at_most_the_clip_norm(tiny_base):
    from pmixed.train.dpsgd_unit import unit_dp_gradient

    model, params = _lora_model(tiny_base)
    g = torch.Generator().manual_seed(1)
    units = [torch.randint(0, 300, (2, 16), generator=g) for _ in range(3)]
    expected = _unit_grads(model, params, units)
    C = 0.1 * min(_norm(e) for e in expected)  # every unit is clipped
    for one in units:  # a single unit's contribution has norm exactly C after clipping
        unit_dp_gradient(model, params, [one], max_grad_norm=C, noise_std=0.0, denominator=1.0,
                         generator=None)
        assert _norm([p.grad for p in params]) == pytest.approx(C, rel=1e-4)
    # the sum over units: each clipped gradient is the unit's direction scaled to C
    unit_dp_gradient(model, params, units, max_grad_norm=C, noise_std=0.0, denominator=1.0, generator=None)
    for j, p in enumerate(params):
        want = sum(e[j] * (C / (_norm(e) + 1e-6)) for e in expected)
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-8)


def test_an_empty_draw_releases_noise_of_the_calibrated_scale(tiny_base):
    from pmixed.train.dpsgd_unit import unit_dp_gradient

    model, params = _lora_model(tiny_base)
    step = unit_dp_gradient(model, params, [], max_grad_norm=1.0, noise_std=0.5, denominator=4.0,
                            generator=torch.Generator().manual_seed(3))
    assert step.drawn == 0
    flat = torch.cat([p.grad.flatten() for p in params])
    assert flat.numel() >= 500
    assert float(flat.std()) == pytest.approx(0.5 / 4.0, rel=0.1)
    assert abs(float(flat.mean())) < 0.03  # 5 standard errors


def _subsampled_gaussian_rdp(q: float, sigma: float, order: int) -> float:
    """Exact RDP of one Poisson-subsampled Gaussian step at an integer order (add/remove;
    Mironov, Talwar, Zhang 2019, eq. for integer alpha): log(sum_k C(a,k) (1-q)^(a-k) q^k
    exp((k^2-k) / (2 sigma^2))) / (a-1)."""
    if q == 1.0:
        return order / (2 * sigma ** 2)
    logs = [math.log(math.comb(order, k)) + (order - k) * math.log1p(-q) + k * math.log(q)
            + (k * k - k) / (2 * sigma ** 2) for k in range(order + 1)]
    top = max(logs)
    return (top + math.log(sum(math.exp(v - top) for v in logs))) / (order - 1)


def test_accounting_matches_the_exact_rdp_of_the_subsampled_gaussian():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    from pmixed.privacy.conversion import rdp_to_epsilon
    from pmixed.train.dpsgd_unit import unit_epsilon

    orders = list(range(2, 40))
    for q, sigma, steps in ((0.04, 0.9, 10), (0.2, 1.5, 30), (1.0, 2.0, 5)):
        exact = [steps * _subsampled_gaussian_rdp(q, sigma, a) for a in orders]
        assert list(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)) == pytest.approx(
            exact, rel=1e-9)
        # unit_epsilon = the RDP -> (eps, delta) conversion (Balle et al. 2020) over Opacus' orders
        alphas = RDPAccountant.DEFAULT_ALPHAS
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=alphas)
        assert unit_epsilon(sigma, q, steps, 1e-5, "rdp") == pytest.approx(
            rdp_to_epsilon(alphas, rdp, 1e-5)[0], rel=1e-12)
    # no subsampling: RDP of the Gaussian is exactly steps * a / (2 sigma^2)
    alphas = RDPAccountant.DEFAULT_ALPHAS
    assert unit_epsilon(2.0, 1.0, 5, 1e-5, "rdp") == pytest.approx(
        rdp_to_epsilon(alphas, [5 * a / 8 for a in alphas], 1e-5)[0], rel=1e-12)


def test_calibration_reaches_but_never_exceeds_the_target(tiny_base, tiny_records, tmp_path):
    from pmixed.config import config_from_dict
    from pmixed.train.dpsgd_unit import noise_multiplier, unit_epsilon

    for eps, q, steps in ((8.0, 0.05, 10), (2.0, 0.3, 40)):
        cfg = config_from_dict(tiny_config_dict(tiny_base, tiny_records, tmp_path, dpsgd_unit__epsilon=eps,
                                                dpsgd_unit__steps=steps))
        sigma = noise_multiplier(cfg, q)
        got = unit_epsilon(sigma, q, steps, 1e-5, "rdp")
        assert eps - 0.02 <= got <= eps
        assert unit_epsilon(sigma, q, steps + 1, 1e-5, "rdp") > got  # more steps cost more


def _cli(args):
    from pmixed.cli import app

    result = CliRunner().invoke(app, args)
    return result


def test_cli_trains_the_unit_level_baseline(tiny_base, tiny_records, tmp_path):
    from safetensors.torch import load_file

    from pmixed.errors import ConfigError

    out = tmp_path / "run"
    settings = dict(dpsgd_unit__enabled=True, dpsgd_unit__units_per_step=3.0, dpsgd_unit__steps=4,
                    dpsgd_unit__blocks_per_unit=2)
    cfg = write_toml(tiny_config_dict(tiny_base, tiny_records, out, **settings), tmp_path / "c.toml")
    result = _cli(["train", "dpsgd-unit", "--config", str(cfg), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    rec = json.loads((out / "dpsgd_unit" / "dpsgd_unit.json").read_text())
    partition = json.loads((out / "partition.json").read_text())
    n_train_units = sum(len(p["units"]) for p in partition["parts"])
    assert rec["n_units"] == n_train_units and rec["sample_rate"] == pytest.approx(3.0 / n_train_units)
    assert rec["steps"] == 4 and len(rec["units_drawn_per_step"]) == 4
    assert rec["epsilon"] <= rec["target_epsilon"] and rec["noise_multiplier"] > 0
    assert rec["privacy_unit"].startswith("user")
    assert rec["eval_ppl_before"] > 0 and rec["eval_ppl_after"] > 0
    weights = load_file(out / "dpsgd_unit" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)  # it moved

    too_many = write_toml(tiny_config_dict(tiny_base, tiny_records, out, **(settings | {
        "dpsgd_unit__units_per_step": 1000.0})), tmp_path / "bad.toml")
    result = _cli(["train", "dpsgd-unit", "--config", str(too_many), "--quiet"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError) or "units_per_step" in result.output
