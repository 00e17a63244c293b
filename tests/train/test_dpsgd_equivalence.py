"""Opacus + PEFT hazard (Opacus issue 820): a DP-SGD step with zero noise and a clip norm that
never binds must equal a plain SGD step on the same batch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from pmixed.models.lm import lm_loss


def _lora_model(tiny_base, seed=0):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pmixed.config import config_from_dict
    from pmixed.train.common import make_lora_config

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    cfg = config_from_dict({"lora": {"r": 2, "alpha": 8, "dropout": 0.0}})
    torch.manual_seed(seed)
    model = get_peft_model(base, make_lora_config(cfg, base))
    # B starts at zero in PEFT, which would make A's gradient zero: randomise it so that both
    # LoRA matrices get a non-trivial update.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def _lora_params(model):
    return {
        n.replace("_module.", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" in n
    }


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_zero_noise_dp_step_equals_plain_sgd_step(tiny_base, mode):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from pmixed.train.dpsgd import dp_step

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 300, (4, 16), generator=g)

    plain = _lora_model(tiny_base)
    dp_model = copy.deepcopy(plain)
    before = _lora_params(plain)

    # plain SGD step on the mean loss
    plain.train()
    opt = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.5)
    loss = lm_loss(plain, batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    expected = _lora_params(plain)

    # DP-SGD step: no noise, clip never binds, the same fixed batch (no Poisson sampling)
    dp_model.train()
    dp_opt = torch.optim.SGD([p for p in dp_model.parameters() if p.requires_grad], lr=0.5)
    loader = DataLoader(TensorDataset(batch), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_model, dp_opt, loader = PrivacyEngine().make_private(
            module=dp_model,
            optimizer=dp_opt,
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=1e8,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
    (got_batch,) = next(iter(loader))
    assert torch.equal(got_batch, batch)
    dp_step(dp_model, dp_opt, got_batch)
    got = _lora_params(dp_model)

    assert set(got) == set(expected)
    moved = 0
    for name in expected:
        assert not torch.equal(expected[name], before[name]) or "lora_A" in name
        moved += int(not torch.equal(expected[name], before[name]))
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert moved == len(expected)  # every LoRA matrix actually changed
