"""Stacked-LoRA multi-adapter forward against PEFT's own forward, on tiny random models."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from pmixed.errors import EnsembleMismatch  # noqa: E402
from pmixed.models.hf_compat import output_cache  # noqa: E402
from pmixed.models.lm import iter_log_probs, log_probs  # noqa: E402
from pmixed.models.stacked_lora import StackedLoRA, StackedLoRALinear  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

VOCAB = 100
ATOL = 1e-5
MIXED_IDS = [-1, 0, 2, 1, 2, -1]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


ARCHS = {
    "gpt2": (tiny_gpt2, ["c_attn"], True),
    "llama": (tiny_llama, ["q_proj", "v_proj"], False),
}


def save_adapters(base, targets, fan_in_fan_out, root, n, *, r=4, seed=0, ranks=None, **cfg_kw):
    """n PEFT LoRA adapters with random non-zero A and B, saved with save_pretrained."""
    dirs = []
    for i in range(n):
        cfg = LoraConfig(
            r=ranks[i] if ranks else r,
            lora_alpha=8,
            lora_dropout=0.1,  # must be inactive at inference
            target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,
            **cfg_kw,
        )
        pm = get_peft_model(copy.deepcopy(base), cfg)
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:  # peft initialises B to zero
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                elif "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        d = root / f"member_{i:03d}"
        pm.save_pretrained(str(d))
        dirs.append(d)
    return dirs


def peft_reference(base, dirs):
    ref = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="m0")
    for i, d in enumerate(dirs[1:], start=1):
        ref.load_adapter(str(d), adapter_name=f"m{i}")
    return ref.eval()


@pytest.fixture(params=list(ARCHS))
def setup(request, tmp_path):
    make, targets, fifo = ARCHS[request.param]
    base = make()
    pristine = copy.deepcopy(base)
    dirs = save_adapters(base, targets, fifo, tmp_path, n=4)
    ref = peft_reference(pristine, dirs)
    stacked = StackedLoRA.from_peft_dirs(base, dirs)
    return dict(
        base=base, pristine=pristine, dirs=dirs, ref=ref, stacked=stacked, arch=request.param
    )


def inputs(bsz, seq=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (bsz, seq), generator=gen)


@torch.no_grad()
def test_mixed_batch_matches_base_and_peft_row_by_row(setup):
    stacked, ref, pristine = setup["stacked"], setup["ref"], setup["pristine"]
    x = inputs(len(MIXED_IDS))
    out = stacked(x, torch.tensor(MIXED_IDS)).logits  # [6, T, V]
    assert out.shape == (6, 10, VOCAB)
    for row, m in enumerate(MIXED_IDS):
        if m < 0:
            expect = pristine(x[row : row + 1]).logits[0]
        else:
            ref.set_adapter(f"m{m}")
            expect = ref(x[row : row + 1]).logits[0]
        torch.testing.assert_close(out[row], expect, atol=ATOL, rtol=0)
    # the members really differ from the public model and from each other
    assert (out[1] - pristine(x[1:2]).logits[0]).abs().max() > 1e-2
    ref.set_adapter("m0")
    assert (ref(x[2:3]).logits[0] - out[2]).abs().max() > 1e-2  # row 2 uses member 2, not 0


@torch.no_grad()
def test_mixed_batch_matches_peft_adapter_names(setup):
    stacked, ref = setup["stacked"], setup["ref"]
    x = inputs(len(MIXED_IDS), seed=2)
    names = ["__base__" if m < 0 else f"m{m}" for m in MIXED_IDS]
    expect = ref(input_ids=x, adapter_names=names).logits
    out = stacked(x, MIXED_IDS).logits
    torch.testing.assert_close(out, expect, atol=ATOL, rtol=0)


@torch.no_grad()
def test_all_member_and_all_public_batches(setup):
    stacked, ref, pristine = setup["stacked"], setup["ref"], setup["pristine"]
    x = inputs(3, seed=3)
    ids = [3, 1, 3]
    out = stacked(x, ids).logits
    names = [f"m{m}" for m in ids]
    torch.testing.assert_close(out, ref(input_ids=x, adapter_names=names).logits, atol=ATOL, rtol=0)
    pub = stacked(x, [-1, -1, -1]).logits
    torch.testing.assert_close(pub, pristine(x).logits, atol=ATOL, rtol=0)
    # outside a selection the patched model is the public model
    torch.testing.assert_close(setup["base"](x).logits, pristine(x).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(stacked(x).logits, pristine(x).logits, atol=ATOL, rtol=0)


def test_one_copy_of_base_weights(tmp_path):
    base = tiny_gpt2()
    before = {id(p): (p.data_ptr(), p.detach().clone()) for p in base.parameters()}
    n_params = sum(p.numel() for p in base.parameters())
    dirs = save_adapters(base, ["c_attn"], True, tmp_path, n=3)
    stacked = StackedLoRA.from_peft_dirs(base, dirs)
    assert stacked.model is base
    after = list(base.parameters())
    # same parameter objects, same storage, same values; adapters add no parameters
    assert {id(p) for p in after} == set(before)
    for p in after:
        ptr, val = before[id(p)]
        assert p.data_ptr() == ptr
        assert torch.equal(p.detach(), val)
    assert sum(p.numel() for p in after) == n_params
    wrappers = [m for m in base.modules() if isinstance(m, StackedLoRALinear)]
    assert len(wrappers) == 2
    for w in wrappers:
        assert w.lora_A.shape == (3, 4, 32)  # [N, r, in]
        assert w.lora_B.shape == (3, 96, 4)  # [N, out, r]
        torch.testing.assert_close(w.scaling, torch.full((3,), 2.0))  # alpha 8 / r 4
    # base state_dict carries no adapter tensors (buffers are non-persistent)
    assert not any("lora" in k for k in base.state_dict())
    assert stacked.adapter_bytes() == 2 * 3 * (4 * 32 + 96 * 4 + 1) * 4
    assert stacked.base_bytes() == sum(
        p.numel() * p.element_size() for p in {p.data_ptr(): p for p in base.parameters()}.values()
    ) + sum(b.numel() * b.element_size() for b in base.buffers() if b.dim() and b.shape[0] != 3)
    # running a member leaves the base weights untouched (adapters are not merged)
    with torch.no_grad():
        stacked(inputs(2), [0, 2])
    for p in base.parameters():
        assert torch.equal(p.detach(), before[id(p)][1])
    # unpatch restores the original layers
    stacked.unpatch()
    assert not any(isinstance(m, StackedLoRALinear) for m in base.modules())
    assert type(base.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


@torch.no_grad()
def test_kv_cache_incremental_equals_full(setup):
    stacked = setup["stacked"]
    ids = torch.tensor([-1, 1, 0, 3])
    x = inputs(4, seq=12, seed=4)
    full = stacked(x, ids, use_cache=False).logits  # [4, 12, V]
    out = stacked(x[:, :5], ids, use_cache=True)
    steps, cache = [out.logits], output_cache(out)
    assert cache is not None
    for t in range(5, 12):
        out = stacked(x[:, t : t + 1], ids, past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = output_cache(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    # the same through the context manager and the plain patched model
    cache = output_cache(stacked(x[:, :8], ids, use_cache=True))
    out = stacked(x[:, 8:10], ids, cache=cache, use_cache=True)  # the new keyword works too
    with stacked.rows(ids):
        last = setup["base"](
            x[:, 10:], **{_cache_name(setup["base"]): output_cache(out)}, use_cache=True
        ).logits
    torch.testing.assert_close(last, full[:, 10:], atol=ATOL, rtol=0)


def _cache_name(model):
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def test_log_probs_and_chunked(setup):
    stacked, ref = setup["stacked"], setup["ref"]
    x = inputs(len(MIXED_IDS), seed=5)
    lp = log_probs(stacked, x, torch.tensor(MIXED_IDS))
    assert lp.dtype == torch.float32 and lp.shape == (6, 10, VOCAB)
    names = ["__base__" if m < 0 else f"m{m}" for m in MIXED_IDS]
    expect = torch.log_softmax(ref(input_ids=x, adapter_names=names).logits.float(), -1)
    torch.testing.assert_close(lp, expect, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(6, 10), atol=1e-5, rtol=0)
    # the patched model itself also routes member rows
    torch.testing.assert_close(log_probs(setup["base"], x, MIXED_IDS), lp, atol=ATOL, rtol=0)
    # public model through the plain (unpatched) model
    torch.testing.assert_close(log_probs(setup["pristine"], x[:1]), lp[:1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        log_probs(setup["pristine"], x[:2], [0, -1])
    mask = torch.ones_like(x)
    chunks = list(iter_log_probs(stacked, x, MIXED_IDS, chunk_rows=4, attention_mask=mask))
    assert [c[0] for c in chunks] == [slice(0, 4), slice(4, 6)]
    torch.testing.assert_close(torch.cat([c[1] for c in chunks]), lp, atol=ATOL, rtol=0)
    last = log_probs(stacked, x, MIXED_IDS, logits_to_keep=1)
    torch.testing.assert_close(last[:, 0], lp[:, -1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_rslora_and_per_member_scaling(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    d0 = save_adapters(base, ["q_proj", "v_proj"], False, tmp_path / "a", n=2, use_rslora=True)
    d1 = save_adapters(base, ["q_proj", "v_proj"], False, tmp_path / "b", n=1, seed=7)
    dirs = d0 + d1
    ref = peft_reference(pristine, dirs)
    stacked = StackedLoRA.from_peft_dirs(base, dirs, names=["a0", "a1", "b0"])
    assert stacked.member_index("b0") == 2
    w = base.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(w.scaling, torch.tensor([4.0, 4.0, 2.0]))  # 8/sqrt(4), 8/4
    x = inputs(4, seed=6)
    ids = [2, -1, 0, 1]
    names = ["__base__" if m < 0 else f"m{m}" for m in ids]
    torch.testing.assert_close(
        stacked(x, ids).logits, ref(input_ids=x, adapter_names=names).logits, atol=ATOL, rtol=0
    )


def test_adapter_ids_validation(setup):
    stacked = setup["stacked"]
    x = inputs(2)
    with pytest.raises(ValueError):
        stacked(x, [0, 4])  # only 4 members: 0..3
    with pytest.raises(ValueError):
        stacked(x, [-2, 0])
    with pytest.raises(ValueError):
        stacked(x, [0, 1, 2])  # 3 ids for 2 rows
    with pytest.raises(ValueError):
        StackedLoRA.from_peft_dirs(setup["base"], setup["dirs"])  # already patched


def test_corrupt_adapter_file_names_folder(tmp_path):
    base = tiny_gpt2()
    dirs = save_adapters(base, ["c_attn"], True, tmp_path, n=3)
    (dirs[1] / "adapter_model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(EnsembleMismatch, match="member_001"):
        StackedLoRA.from_peft_dirs(base, dirs)
    # nothing was patched on failure
    assert not any(isinstance(m, StackedLoRALinear) for m in base.modules())


def test_truncated_and_missing_files(tmp_path):
    base = tiny_gpt2()
    dirs = save_adapters(base, ["c_attn"], True, tmp_path, n=3)
    st = dirs[2] / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(EnsembleMismatch, match="member_002"):
        StackedLoRA.from_peft_dirs(base, dirs)
    with pytest.raises(EnsembleMismatch, match="member_009"):
        StackedLoRA.from_peft_dirs(base, dirs[:2] + [tmp_path / "member_009"])
    (dirs[0] / "adapter_config.json").write_text("{not json")
    with pytest.raises(EnsembleMismatch, match="member_000"):
        StackedLoRA.from_peft_dirs(base, dirs[:2])


def test_mismatched_rank_raises(tmp_path):
    base = tiny_gpt2()
    dirs = save_adapters(base, ["c_attn"], True, tmp_path, n=3, ranks=[4, 4, 8])
    with pytest.raises(EnsembleMismatch, match="member_002"):
        StackedLoRA.from_peft_dirs(base, dirs)


def test_mismatched_targets_and_unsupported_variants(tmp_path):
    base = tiny_llama()
    a = save_adapters(base, ["q_proj", "v_proj"], False, tmp_path / "a", n=1)
    b = save_adapters(base, ["q_proj"], False, tmp_path / "b", n=1)
    with pytest.raises(EnsembleMismatch, match="target modules differ"):
        StackedLoRA.from_peft_dirs(base, a + b)
    # a config whose rank disagrees with its tensors is corrupt
    cfg_path = b[0] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(EnsembleMismatch, match="config rank"):
        StackedLoRA.from_peft_dirs(base, b)
    cfg["r"], cfg["use_dora"] = 4, True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(EnsembleMismatch, match="use_dora"):
        StackedLoRA.from_peft_dirs(base, b)
    # an adapter trained for another architecture
    with pytest.raises(EnsembleMismatch, match="lacks"):
        StackedLoRA.from_peft_dirs(tiny_gpt2(), a)


@torch.no_grad()
def test_from_state_dicts(tmp_path):
    from safetensors.torch import load_file

    base = tiny_gpt2()
    pristine = copy.deepcopy(base)
    dirs = save_adapters(base, ["c_attn"], True, tmp_path, n=2)
    sds = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    cfgs = [json.loads((d / "adapter_config.json").read_text()) for d in dirs]
    stacked = StackedLoRA.from_state_dicts(base, sds, cfgs)
    ref = peft_reference(pristine, dirs)
    x = inputs(3, seed=8)
    names = ["m1", "__base__", "m0"]
    torch.testing.assert_close(
        stacked(x, [1, -1, 0]).logits,
        ref(input_ids=x, adapter_names=names).logits,
        atol=ATOL,
        rtol=0,
    )


def test_concurrent_member_forwards_never_reach_the_public_row(tmp_path):
    """Defect 3 (issue 11): the row selection must be per thread, not object-wide.

    Several threads run member forwards (both call forms: ``stacked(x, ids)`` and
    ``with stacked.rows(ids): base(...)``) while another thread runs public-row forwards on the
    same StackedLoRA. Every public distribution must be bit-identical to the plain base model's,
    and every member distribution bit-identical to its single-threaded value. With the old
    object-wide ``_selection`` this fails: a member thread's selection reaches the public
    thread's layers (and vice versa).
    """
    import sys
    import threading

    from pmixed.models.stacked_lora import PUBLIC

    base = tiny_gpt2()
    pristine = copy.deepcopy(base)
    dirs = save_adapters(base, ["c_attn"], True, tmp_path, n=4)
    stacked = StackedLoRA.from_peft_dirs(base, dirs)
    x = inputs(2, seq=16, seed=11)
    with torch.no_grad():
        public_ref = torch.softmax(pristine(input_ids=x).logits.float(), dim=-1)  # [2, T, V]
        member_ids = [[0, 1], [2, 3], [3, 0]]
        member_ref = [torch.softmax(stacked(x, ids).logits.float(), dim=-1) for ids in member_ids]
    for ref in member_ref:  # the members really move the distribution
        assert (ref - public_ref).abs().max() > 1e-3

    stop = threading.Event()
    failures: list[str] = []
    counts = [0] * len(member_ids)

    def member_worker(k: int) -> None:
        ids = member_ids[k]
        try:
            with torch.no_grad():
                while not stop.is_set():
                    if counts[k] % 2:
                        out = stacked(x, ids).logits
                    else:
                        with stacked.rows(ids):
                            out = base(input_ids=x).logits
                    if not torch.equal(torch.softmax(out.float(), dim=-1), member_ref[k]):
                        failures.append(f"member rows {ids} got another selection")
                    counts[k] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"member thread {ids}: {exc!r}")

    public_runs = 0

    def public_worker() -> None:
        nonlocal public_runs
        try:
            with torch.no_grad():
                for i in range(150):
                    if i % 2:
                        out = stacked(x, [PUBLIC, PUBLIC]).logits
                    else:
                        out = base(input_ids=x).logits  # outside any rows() block: public
                    if not torch.equal(torch.softmax(out.float(), dim=-1), public_ref):
                        failures.append(f"public forward {i} differs from the base model")
                    public_runs += 1
        except Exception as exc:  # noqa: BLE001
            failures.append(f"public thread: {exc!r}")
        finally:
            stop.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: inside forwards, between layers
    try:
        threads = [threading.Thread(target=member_worker, args=(k,)) for k in range(len(member_ids))]
        threads.append(threading.Thread(target=public_worker))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        stop.set()
        sys.setswitchinterval(old_interval)
    assert public_runs == 150 and all(c > 0 for c in counts)
    assert not failures, f"{len(failures)} wrong forwards, e.g. {failures[:3]}"
