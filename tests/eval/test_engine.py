"""The engine: batched members equal separate per-adapter forwards; charge before release;
generation with per-member KV caches equals recomputing every prefix."""

import pytest
import torch

from pmixed.errors import BudgetExhausted
from pmixed.eval.block_stats import block_stats
from pmixed.eval.scoring import score_block
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
    stats, extras, ens_avg = block_stats(rt, block, max_order=3, extras=tuple(rt.extra_index))
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
        monkeypatch.setattr(rt, "split_head", lambda: None)
    block = torch.randint(0, len(ens.tokenizer), (30,), generator=torch.Generator().manual_seed(3))
    n = rt.n_members
    needed = torch.rand(29, n, generator=torch.Generator().manual_seed(4)) < 0.3  # [T, N]
    needed[20:, 0] = False  # member 0 stops early: its forward is cut at its last draw
    needed[:, 1] = False  # member 1 is never drawn: it does not run at all
    full, _, avg = block_stats(rt, block, max_order=3, needed=needed, chunk=2)
    drawn, _, none = block_stats(rt, block, max_order=3, needed=needed, chunk=2, average=False)
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
        block_stats(rt, block, max_order=3, average=False)


@pytest.mark.parametrize("average", [True, False])
def test_members_per_forward_change_no_statistic(runtime, average):
    """``[eval] member_chunk`` (1 on the CPU, 16 on a GPU) is speed only: one member per forward
    and all of them batched give the same statistics, on the CPU, as the runtime's device."""
    cfg, ens, rt = runtime
    assert rt.device == torch.device("cpu")
    block = torch.randint(0, len(ens.tokenizer), (25,), generator=torch.Generator().manual_seed(5))
    needed = torch.rand(24, rt.n_members, generator=torch.Generator().manual_seed(6)) < 0.4
    one, ex1, avg1 = block_stats(rt, block, max_order=3, needed=needed, extras=("finetune",), chunk=1, average=average)
    alls, ex2, avg2 = block_stats(rt, block, max_order=3, needed=needed, extras=("finetune",),
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
        probs = score_block(pred, block)
        assert probs.shape == (19,) and (probs > 0).all() and (probs <= 1).all()
        # the block's 19 queries are charged as one record, at the epsilon the calibration gives
        # for T = 19 queries (<= 8 by construction, and more than 18 queries' worth)
        assert led.charges() == 1
        assert led.epsilon_spent() == pytest.approx(mech.epsilon_after(19), rel=1e-9)
        assert mech.epsilon_after(18) < led.epsilon_spent() <= 8.0
        with pytest.raises(BudgetExhausted) as err:
            score_block(pred, block)
        assert "spent" in str(err.value) and "limit" in str(err.value)
        assert led.charges() == 1  # the refused block recorded nothing
    with Ledger(tmp_path / "l.ledger") as again:  # a restart resumes the spent budget
        assert again.charges() == 1


def test_generation_caches_equal_recompute_and_stop_at_budget(runtime, tmp_path):
    from pmixed.engine import PrivatePredictor
    from pmixed.models.runtime import PUBLIC

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


# ----------------------------------------------------------------------------- generation: what
# a client can observe is the tokens and the budget, never which members were drawn


def _predictor(rt, led, *, budget=64, q=0.6, seed=5):
    from pmixed.engine import PrivatePredictor

    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=budget, ensemble_size=rt.n_members, sample_rate=q)
    return PrivatePredictor(rt, mech, led, generator=torch.Generator().manual_seed(seed))


def test_generation_returns_nothing_about_the_draw(runtime):
    """Issue 11 defect 2: on 92fb559 Generation.members_drawn exposed S. Nothing a caller can
    serialise may depend on the draw except through the released tokens."""
    import dataclasses

    from pmixed.engine import Generation

    _, _, rt = runtime
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        out = _predictor(rt, led).generate("apple", max_new_tokens=3, stop_at_eos=False)
    names = {f.name for f in dataclasses.fields(Generation)}
    assert names == {"prompt", "text", "token_ids", "epsilon_spent", "stopped", "epsilon_limit",
                     "queries_left", "prompt_tokens"}
    assert set(dataclasses.asdict(out)) == names


def test_an_invalid_member_row_is_answered_by_the_public_model_and_charged(runtime, monkeypatch):
    """Issue 11 defect 1: a NaN member row raised inside release before the charge on 92fb559
    (whether a query failed depended on the member drawn, uncharged). Now every token is charged
    and released, and the release equals the one with that member's lam = 0."""
    _, _, rt = runtime
    real = type(rt).decode
    released = []

    def poisoned(self, rows):
        out = real(self, rows)
        for j, row in enumerate(rows):
            if row.adapters == [0]:
                out[j] = torch.full_like(out[j], float("nan"))  # member 0 is broken
        return out

    monkeypatch.setattr(type(rt), "decode", poisoned)
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        pred = _predictor(rt, led, q=0.9)
        orig_release = pred.mechanism.release
        monkeypatch.setattr(pred.mechanism, "release", lambda p, m: released.append((p, m)) or orig_release(p, m))
        out = pred.generate("apple", max_new_tokens=8, stop_at_eos=False)
        assert len(out.token_ids) == 8 and led.charges() == 8
    assert any(torch.isnan(m).any() for _, m in released)  # member 0 was drawn and broken
    for p, m in released:
        ok = ~torch.isnan(m).any(dim=1)
        dist = orig_release(p, m)
        if (~ok).any():  # == the release where the broken member answers with p_0
            fixed = m.clone()
            fixed[~ok] = p
            torch.testing.assert_close(dist, orig_release(p, fixed), rtol=1e-12, atol=1e-15)


def test_an_invalid_public_row_refuses_before_the_draw(runtime, monkeypatch):
    _, _, rt = runtime
    real = type(rt).decode

    def broken_public(self, rows):
        out = real(self, rows)
        return [torch.full_like(o, float("nan")) for o in out] if rows[0].adapters == [-1] else out

    monkeypatch.setattr(type(rt), "decode", broken_public)
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        pred = _predictor(rt, led)
        monkeypatch.setattr(pred.mechanism, "draw", lambda g=None: pytest.fail("drew members"))
        with pytest.raises(ValueError, match="public"):
            pred.generate("apple", max_new_tokens=2)
        assert led.charges() == 0


def test_a_charge_refused_after_a_successful_check_releases_nothing(runtime, monkeypatch):
    """Another process may spend between the read-only check and the charge: the computed
    distribution is discarded and generation stops with "budget"."""
    _, _, rt = runtime
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        pred = _predictor(rt, led)
        calls = []
        real = led.charge

        def racing(charge):
            calls.append(charge)
            if len(calls) == 3:
                raise BudgetExhausted(1.0, 9.0, 8.0)
            return real(charge)

        monkeypatch.setattr(led, "charge", racing)
        monkeypatch.setattr("pmixed.engine.sample_token", lambda d, g=None: 7)
        out = pred.generate("apple", max_new_tokens=10, stop_at_eos=False)
    assert out.stopped == "budget" and out.token_ids == [7, 7] and len(calls) == 3


def test_temperature_is_applied_to_the_released_distribution(runtime, monkeypatch):
    _, _, rt = runtime
    seen = {}
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        pred = _predictor(rt, led)
        orig = pred.mechanism.release
        monkeypatch.setattr(pred.mechanism, "release", lambda p, m: seen.setdefault("released", orig(p, m)))

        def capture(dist, g=None):
            seen["sampled"] = dist
            return 3

        monkeypatch.setattr("pmixed.engine.sample_token", capture)
        pred.generate("apple", max_new_tokens=1, temperature=0.5)
    want = torch.softmax(torch.log(seen["released"]) / 0.5, dim=-1)
    torch.testing.assert_close(seen["sampled"], want, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(seen["sampled"], seen["released"])


def test_prompt_past_the_context_is_refused_before_any_charge(runtime, monkeypatch):
    """Issue 12 item 1: on 92fb559 a long generation ended in IndexError after 254 charged tokens
    and printed nothing. A prompt that cannot fit is refused (or left-truncated on request) and
    generation stops at the context with "length"."""
    from pmixed.errors import PromptTooLong

    _, ens, rt = runtime
    monkeypatch.setattr(type(rt), "context_length", property(lambda self: 6))
    ids = ens.tokenizer("apple banana cherry apple banana cherry apple", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 6
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        pred = _predictor(rt, led)
        with pytest.raises(PromptTooLong, match="context is 6 tokens"):
            pred.generate("apple banana cherry apple banana cherry apple", max_new_tokens=3)
        assert led.charges() == 0
        out = pred.generate("apple banana cherry apple banana cherry apple", max_new_tokens=3,
                            truncate_prompt=True, stop_at_eos=False)
        assert out.prompt_tokens == 5 and len(out.token_ids) == 1 and out.stopped == "length"
        out = pred.generate("apple", max_new_tokens=50, stop_at_eos=False)
        assert out.prompt_tokens + len(out.token_ids) == 6 and out.stopped == "length"
        assert led.charges() == 1 + len(out.token_ids)


def test_an_error_after_a_release_keeps_the_released_tokens(runtime, monkeypatch):
    from pmixed.errors import GenerationInterrupted

    _, _, rt = runtime
    n = []

    def flaky(dist, g=None):
        n.append(1)
        if len(n) == 3:
            raise RuntimeError("device lost")
        return 11

    monkeypatch.setattr("pmixed.engine.sample_token", flaky)
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        with pytest.raises(GenerationInterrupted, match="device lost") as err:
            _predictor(rt, led).generate("apple", max_new_tokens=5, stop_at_eos=False)
        assert err.value.partial.token_ids == [11, 11] and led.charges() == 3
        assert isinstance(err.value.__cause__, RuntimeError)


def test_concurrent_generations_leave_the_public_row_the_base_model(runtime):
    """Issue 11 defect 3 at the engine level: threads decoding member rows while another decodes
    the public row; the public row's distribution is bit-identical to the base model's."""
    import threading

    from pmixed.models.runtime import PUBLIC, RowGroup

    _, ens, rt = runtime
    ids = ens.tokenizer("apple banana cherry", add_special_tokens=False)["input_ids"]
    ref = rt.decode([RowGroup([PUBLIC], list(ids))])[0]
    stop = threading.Event()
    errors = []

    def members():
        try:
            while not stop.is_set():
                rt.decode([RowGroup([i % rt.n_members], list(ids)) for i in range(2)])
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=members) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            assert torch.equal(rt.decode([RowGroup([PUBLIC], list(ids))])[0], ref)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors


def test_a_temperature_other_than_1_is_refused_outside_an_experiment(runtime):
    """Temperature acts on each draw's mixture, which the guarantee does not cover
    (tests/exact/test_exact_sampling.py): serving mode (the OS CSPRNG) refuses it before any charge."""
    from pmixed.engine import PrivatePredictor

    _, _, rt = runtime
    with Ledger(":memory:", epsilon=8.0, delta=1e-5) as led:
        mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=64, ensemble_size=rt.n_members, sample_rate=0.6)
        pred = PrivatePredictor(rt, mech, led)
        with pytest.raises(ValueError, match="not covered by the privacy guarantee"):
            pred.generate("apple", max_new_tokens=2, temperature=0.5)
        assert led.charges() == 0
        assert len(pred.generate("apple", max_new_tokens=2, stop_at_eos=False).token_ids) == 2  # temperature 1
