"""The engine: batched members equal separate per-adapter forwards; charge before release;
generation with per-member KV caches equals recomputing every prefix."""

import pytest
import torch

from pmixed.errors import BudgetExhausted
from pmixed.mechanism.divergence import as_distribution
from pmixed.mechanism.pmixed import PMixED
from pmixed.mechanism.subsample import sample_token
from pmixed.privacy.ledger import Ledger


@pytest.fixture(scope="module")
def runtime(trained_run):
    from pmixed.eval.runner import load_runtime

    cfg, _ = trained_run
    ens, rt = load_runtime(cfg, progress=False)
    return cfg, ens, rt


def test_batched_members_equal_separate_peft_forwards(runtime):
    cfg, ens, rt = runtime
    from pmixed.models.ensemble import load_ensemble

    sep = load_ensemble(cfg.output_dir).peft_model()  # a second base copy, PEFT adapters
    block = torch.randint(0, len(ens.tokenizer), (20,), generator=torch.Generator().manual_seed(0))
    stats, extras, ens_avg = rt.block_stats(block, max_order=3, extras=tuple(rt.extra_index))
    inputs, targets = block[None, :-1], block[1:]
    with torch.no_grad():
        with sep.disable_adapter():
            p0 = as_distribution(torch.softmax(sep(inputs).logits[0].float(), -1))
        assert torch.allclose(stats.public_target, p0.gather(1, targets[:, None]).squeeze(1), rtol=1e-5)
        for i, name in enumerate(ens.member_names):
            sep.set_adapter(name)
            pi = as_distribution(torch.softmax(sep(inputs).logits[0].float(), -1))
            assert torch.allclose(stats.member_target[:, i], pi.gather(1, targets[:, None]).squeeze(1),
                                  rtol=1e-5, atol=1e-9)
    assert stats.moments.shape == (19, ens.n_members, 2)
    assert (stats.member_target != stats.public_target[:, None]).any()  # members really differ
    assert set(extras) == {"finetune", "dpsgd"}


@pytest.mark.parametrize("split_head", [True, False])
def test_drawn_only_stats_equal_the_full_ones_at_the_drawn_pairs(runtime, monkeypatch, split_head):
    from pmixed.mechanism.teacher_forcing import released_target_probs

    cfg, ens, rt = runtime
    if not split_head:  # models whose logits are not head(backbone(x)): the whole forward
        monkeypatch.setattr(rt, "_split_head", lambda: None)
    block = torch.randint(0, len(ens.tokenizer), (30,), generator=torch.Generator().manual_seed(3))
    n = rt.n_members
    needed = torch.rand(29, n, generator=torch.Generator().manual_seed(4)) < 0.3  # [T, N]
    needed[20:, 0] = False  # member 0 stops early: its forward is cut at its last draw
    needed[:, 1] = False  # member 1 is never drawn: it does not run at all
    full, _, avg = rt.block_stats(block, max_order=3, needed=needed, chunk=2)
    drawn, _, none = rt.block_stats(block, max_order=3, needed=needed, chunk=2, average=False)
    assert avg is not None and none is None
    assert torch.equal(drawn.public_target, full.public_target)
    assert torch.allclose(drawn.moments[needed], full.moments[needed], rtol=1e-6)
    assert torch.allclose(drawn.member_target[needed], full.member_target[needed], rtol=1e-6, atol=1e-12)
    assert drawn.member_target[~needed].isnan().all() and drawn.moments[~needed].isnan().all()
    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=29, ensemble_size=n, sample_rate=0.3, alpha=3)
    released_full, lam_full = released_target_probs(full, needed, mech.params)
    released_drawn, lam_drawn = released_target_probs(drawn, needed, mech.params)
    assert torch.allclose(released_drawn, released_full, rtol=1e-6)
    with pytest.raises(ValueError, match="needed"):
        rt.block_stats(block, max_order=3, average=False)


@pytest.mark.parametrize("average", [True, False])
def test_members_per_forward_change_no_statistic(runtime, average):
    """``[eval] member_chunk`` (1 on the CPU, 16 on a GPU) is speed only: one member per forward
    and all of them batched give the same statistics, on the CPU, as the runtime's device."""
    cfg, ens, rt = runtime
    assert rt.device == torch.device("cpu")
    block = torch.randint(0, len(ens.tokenizer), (25,), generator=torch.Generator().manual_seed(5))
    needed = torch.rand(24, rt.n_members, generator=torch.Generator().manual_seed(6)) < 0.4
    one, ex1, avg1 = rt.block_stats(block, max_order=3, needed=needed, extras=("finetune",), chunk=1, average=average)
    alls, ex2, avg2 = rt.block_stats(block, max_order=3, needed=needed, extras=("finetune",),
                                     chunk=rt.n_members, average=average)
    for a, b in ((one.moments, alls.moments), (one.member_target, alls.member_target)):
        assert a.device.type == "cpu" and a.dtype == torch.float64
        assert torch.allclose(a.nan_to_num(-1.0), b.nan_to_num(-1.0), rtol=1e-5, atol=1e-12)
    assert torch.equal(one.public_target, alls.public_target)
    assert torch.equal(ex1["finetune"], ex2["finetune"])
    assert (avg1 is None) == (avg2 is None) == (not average)


def test_score_block_charges_before_release(runtime, tmp_path):
    from pmixed.engine import PrivatePredictor

    cfg, ens, rt = runtime
    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=19, ensemble_size=rt.n_members, sample_rate=0.5)
    block = torch.randint(0, len(ens.tokenizer), (20,), generator=torch.Generator().manual_seed(1))
    with Ledger(tmp_path / "l.ledger", epsilon=8.0, delta=1e-5) as led:
        pred = PrivatePredictor(rt, mech, led, generator=torch.Generator().manual_seed(2))
        probs = pred.score_block(block)
        assert probs.shape == (19,) and (probs > 0).all() and (probs <= 1).all()
        assert led.charges() == 1 and 7.9 < led.epsilon_spent() <= 8.0
        with pytest.raises(BudgetExhausted) as err:
            pred.score_block(block)
        assert "spent" in str(err.value) and "limit" in str(err.value)
        assert led.charges() == 1  # the refused block recorded nothing
    with Ledger(tmp_path / "l.ledger") as again:  # a restart resumes the spent budget
        assert again.charges() == 1


def test_generation_caches_equal_recompute_and_stop_at_budget(runtime, tmp_path):
    from pmixed.engine import PUBLIC, PrivatePredictor

    cfg, ens, rt = runtime
    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=6, ensemble_size=rt.n_members, sample_rate=0.6)
    with Ledger(tmp_path / "g.ledger", epsilon=8.0, delta=1e-5) as led:
        pred = PrivatePredictor(rt, mech, led, generator=torch.Generator().manual_seed(5))
        out = pred.generate("apple banana", max_new_tokens=20, stop_at_eos=False)
        assert out.stopped == "budget" and len(out.token_ids) == 6 and led.charges() == 6

    # reference: recompute every prefix from scratch, same random stream
    gen = torch.Generator().manual_seed(5)
    seq = ens.tokenizer("apple banana", add_special_tokens=False)["input_ids"]
    want = []
    for _ in range(6):
        drawn = mech.draw(gen)
        ids = torch.tensor([seq])
        pub = rt.probs(ids, [PUBLIC])[0, -1].double()
        mem = torch.stack([rt.probs(ids, [int(i)])[0, -1].double() for i in drawn]) if len(drawn) else pub.new_zeros(0, pub.shape[0])
        tok = sample_token(mech.release(pub, mem), gen)
        seq.append(tok)
        want.append(tok)
    assert out.token_ids == want
    assert out.members_drawn and all(len(set(d)) == len(d) for d in out.members_drawn)
