"""PMixED teacher-forced evaluation speed and memory vs its floor and vs a reference-style loop.

Issue: "PMixED evaluation within 1.25x of the floor (the forward passes of N+1 models over the same
blocks, batched) and at least 5x faster than a reference-style loop (one adapter at a time,
per-token scalar mixing) on the same blocks, measured in one run; peak memory with N=80 adapters at
most 1.15x the public model's alone".

A synthetic ensemble: a randomly initialised GPT-2 (``--model tiny``: 4 layers, 192 wide, vocab
4096, like configs/quick.toml's public model; ``gpt2-small-random``: 124M, vocab 50257; ``micro``:
2 layers, 32 wide, vocab 512, for tests) and N PEFT LoRA adapters (r=4, lora_alpha=32, c_attn,
random non-zero lora_A/lora_B from a seeded generator) written with ``PeftModel.save_pretrained``
into a temporary directory. Blocks are random token ids of ``--seq`` tokens (T = seq - 1 queries).
``--lora-b-std`` (0.3) sets how far the members sit from the public model: at 0.3 PMixED's mean
lambda on GPT-2 small (0.71) is that of a trained ensemble (0.71, SmolLM2 mail N = 160) and the
original's mixing must bisect for most drawn members (564 of 624; all of them on the tiny model), as
it must for trained members; at 0.02 (the
value before) every member sat inside the original's ball and its mixing cost almost nothing.

Timed in ONE run, the three variants interleaved round by round (rotating order), medians:

    (F) floor:  the N+1 rows (public + every member) through ``EnsembleRuntime.probs`` in chunks of
                ``--chunk`` rows (the engine's chunk, 4): the forwards and the softmax only;
    (P) PMixED: ``block_stats(runtime, block, max_order=K, needed=mask, average=False)`` +
                ``released_target_probs(stats, mask, params)``, mask = ``PMixED.draw_block(T)``:
                only the drawn members, up to their last drawn position, LM head at drawn pairs;
    (PA) the same with ``average=True``, what ``pmixed eval`` runs: every member over every
                position, because the table's non-private ensemble average needs them all;
    (R) reference-style: a PeftModel holding all N adapters on a deep copy of the base; per block,
                ``set_adapter`` one member at a time and forward the whole block, plus the public
                forward (adapters disabled), keeping all N+1 [T, V] float32 distributions; then per
                position the original's per-token mixing (benchmarks/naive_reference.py: beta by
                scipy bisect per query, lam by scipy bisect per drawn member) on the same draws.
                The mixing may be timed on the first ``--naive-positions`` positions of each block
                and scaled linearly to T (the output says so).

Memory (``--measure-memory``): peak RSS (VmHWM) of two fresh subprocesses on the same block,
    (i) ``--only public``:  the base model alone, forward + softmax over the block;
    (ii) ``--only stacked``: EnsembleRuntime with the N adapters, PMixED evaluation of the block
         on the all-pairs path (PA, what ``pmixed eval`` runs; the drawn-pairs path holds less).
    On a GPU (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated`` instead.

``--dtype bfloat16`` runs the engine's forwards (F, P, PA and the memory children) in bf16, as
``[eval] dtype = "bfloat16"`` does; (R) stays in ``--reference-dtype`` (float32, the original's).

``--device cuda`` (or ``auto``) runs the models on the GPU; every timed call ends with
``torch.cuda.synchronize()``. The mechanism's per-pair statistics come back to the CPU, as in
``pmixed eval``.

    python benchmarks/eval_speed.py --model tiny --measure-memory
    python benchmarks/eval_speed.py --model gpt2-small-random --members 80 --seq 256 --blocks 1 --measure-memory
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

try:  # the installed package (or PYTHONPATH) first; the checkout's src/ otherwise
    import pmixed  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import naive_reference as nr  # noqa: E402
from pmixed.eval.block_stats import block_stats  # noqa: E402
from pmixed.mechanism.pmixed import PMixED  # noqa: E402
from pmixed.mechanism.teacher_forcing import released_target_probs  # noqa: E402
from pmixed.models.runtime import PUBLIC, EnsembleRuntime  # noqa: E402

TARGET_FLOOR = 1.25
TARGET_REF = 5.0
TARGET_MEM = 1.15

DEFAULTS = {  # model: (members, seq)
    "micro": (3, 16),
    "tiny": (8, 128),
    "gpt2-small-random": (80, 512),
}


def gpt2_config(name: str):
    from transformers import GPT2Config

    if name == "micro":
        return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512, n_positions=256,
                          bos_token_id=0, eos_token_id=0)  # fmt: skip
    if name == "tiny":  # configs/quick.toml's public model
        return GPT2Config(n_layer=4, n_embd=192, n_head=4, vocab_size=4096, n_positions=256,
                          bos_token_id=0, eos_token_id=0)  # fmt: skip
    if name == "gpt2-small-random":
        return GPT2Config()  # 12 layers, 768 wide, vocab 50257, 1024 positions: 124M
    raise SystemExit(f"unknown --model {name!r}")


DEVICE = torch.device("cpu")  # set by main() / run_only() from --device
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync() -> None:
    """Wait for the GPU's queued work, so a timer around a call measures the call."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def set_device(spec: str) -> None:
    global DEVICE
    from pmixed.models.device import resolve_device

    DEVICE = resolve_device(spec)


def build_base(cfg):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval().to(DEVICE)


def member_names(n: int) -> list[str]:
    return [f"member_{i:03d}" for i in range(n)]


def build_peft(base, n: int, rank: int, alpha: float, seed: int = 0, b_std: float = 0.3):
    """PeftModel with n LoRA adapters (c_attn) on a deep copy of ``base``, random A and B
    (B ~ N(0, b_std^2): how far the members sit from the public model)."""
    from peft import LoraConfig, get_peft_model

    names = member_names(n)
    lcfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.1, target_modules=["c_attn"],
                      fan_in_fan_out=True)  # fmt: skip
    pm = get_peft_model(copy.deepcopy(base), lcfg, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, lcfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for mod in pm.modules():
                if hasattr(mod, "lora_A") and name in getattr(mod, "lora_A", {}):
                    a, b = mod.lora_A[name].weight, mod.lora_B[name].weight  # [r, in], [out, r]
                    a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
                    b.copy_(torch.randn(b.shape, generator=gen) * b_std)  # non-zero
    pm.eval()
    return pm.to(DEVICE), names


def make_blocks(cfg, n_blocks: int, seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (seq,), generator=gen) for _ in range(n_blocks)]


def make_masks(mech: PMixED, n_blocks: int, T: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [mech.draw_block(T, gen) for _ in range(n_blocks)]


# --------------------------------------------------------------------------- the three variants


def floor_block(rt: EnsembleRuntime, block: torch.Tensor, n: int, chunk: int) -> None:
    """(F) the N+1 rows' forwards + softmax, in chunks of ``chunk`` rows."""
    inputs = block[None, :-1]
    rows = [PUBLIC] + list(range(n))
    for s in range(0, len(rows), chunk):
        ids = rows[s : s + chunk]
        p = rt.probs(inputs.expand(len(ids), -1), ids)
        del p


def pmixed_block(rt: EnsembleRuntime, block, mask, mech: PMixED, chunk: int = 4,
                 average: bool = False) -> torch.Tensor:
    """(P) block_stats + released_target_probs: the released target probabilities [T]
    ((PA) with ``average=True``: every member at every position, as for the ensemble average)."""
    stats, _, _ = block_stats(rt, block, max_order=mech.params.max_order, needed=mask, chunk=chunk,
                                 average=average)
    probs, _ = released_target_probs(stats, mask, mech.params)
    return probs


@torch.no_grad()
def reference_forwards(pm, names: list[str], block: torch.Tensor) -> torch.Tensor:
    """(R, part 1) public + one adapter at a time: all N+1 distributions [N+1, T, V] float32."""
    inputs = block[None, :-1].to(DEVICE)
    T = inputs.shape[1]
    V = pm.get_base_model().config.vocab_size
    dists = torch.empty(len(names) + 1, T, V, device=DEVICE)
    with pm.disable_adapter():
        dists[0] = torch.softmax(pm(input_ids=inputs).logits[0].float(), dim=-1)
    for i, name in enumerate(names):
        pm.set_adapter(name)
        dists[i + 1] = torch.softmax(pm(input_ids=inputs).logits[0].float(), dim=-1)
    return dists


def reference_mixing(dists, block, mask, nv: dict, positions: range) -> torch.Tensor:
    """(R, part 2) per position: the original's per-token mixing on the same draws."""
    targets = block[1:].to(dists.device)
    mask = mask.to(dists.device)
    out = []
    for t in positions:
        drawn = mask[t].nonzero().flatten()
        dist = nr.naive_release(dists[0, t], dists[1 + drawn, t], **nv)
        out.append(dist[targets[t]])
    return torch.stack(out)


# --------------------------------------------------------------------------- memory (subprocess)


def peak_rss() -> int:
    """This process's peak RSS: VmHWM (per address space, reset by exec). ru_maxrss is NOT used:
    Linux carries the forking parent's high-water mark over exec into the child's ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def current_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_only(args) -> dict:
    """Child process: one variant over one block; prints a JSON line with its RSS (and, on a
    GPU, its peak allocated GPU memory)."""
    set_device(args.device)
    args.pmixed_chunk = args.pmixed_chunk or (4 if DEVICE.type == "cpu" else 16)
    cfg = gpt2_config(args.model)
    rss_start = current_rss()
    base = build_base(cfg).to(DTYPES[args.dtype])
    block = make_blocks(cfg, 1, args.seq, args.seed)[0]
    T = block.shape[0] - 1
    if args.only == "public":
        from pmixed.models.lm import log_probs

        rss_model = current_rss()
        with torch.no_grad():
            p = log_probs(base, block[None, :-1].to(DEVICE)).exp_()
            del p
    else:
        dirs = [Path(args.adapter_dir) / nm for nm in member_names(args.members)]
        rt = EnsembleRuntime(base, None, dirs)
        rss_model = current_rss()
        mech = make_mech(args)
        mask = make_masks(mech, 1, T, args.seed)[0]
        # the all-pairs path (PA), what `pmixed eval` runs: the larger of the two footprints
        pmixed_block(rt, block, mask, mech, args.pmixed_chunk, average=True)
    sync()
    out = {
        "only": args.only,
        "device": str(DEVICE),
        "peak_cuda": torch.cuda.max_memory_allocated(DEVICE) if DEVICE.type == "cuda" else None,
        "peak_rss": peak_rss(),
        "rss_start": rss_start,
        "rss_model": rss_model,
    }
    print("MEM " + json.dumps(out))
    return out


def measure_memory(args, adapter_dir: str) -> dict:
    res = {}
    for only in ("public", "stacked"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", only, "--model", args.model,
               "--members", str(args.members), "--seq", str(args.seq), "--seed", str(args.seed),
               "--rate", str(args.rate), "--threads", str(args.threads), "--adapter-dir", adapter_dir,
               "--chunk", str(args.chunk), "--pmixed-chunk", str(args.pmixed_chunk),
               "--device", args.device, "--dtype", args.dtype]  # fmt: skip
        cp = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [ln for ln in cp.stdout.splitlines() if ln.startswith("MEM ")]
        if cp.returncode != 0 or not line:
            raise RuntimeError(f"memory child {only} failed:\n{cp.stdout}\n{cp.stderr}")
        res[only] = json.loads(line[-1][4:])
    return res


# --------------------------------------------------------------------------- main


def make_mech(args) -> PMixED:
    return PMixED(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=args.members,
                  sample_rate=args.rate)  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(DEFAULTS), default="tiny")
    ap.add_argument(
        "--members", type=int, default=None, help="N (default: 3 micro, 8 tiny, 80 gpt2-small)"
    )
    ap.add_argument(
        "--seq", type=int, default=None, help="block length in tokens (T = seq - 1 queries)"
    )
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument(
        "--rate", type=float, default=None, help="q (default: 0.3 for N <= 8, else 0.03)"
    )
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lora-b-std", type=float, default=0.3,
                    help="std of the random lora_B: how far members sit from the public model (0.3: "
                         "PMixED's mean lambda near a trained ensemble's; 0.02: inside the original's ball)")
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--chunk", type=int, default=None,
                    help="rows per forward in (F) (default 4; 16 on a GPU, as [eval] member_chunk)")
    ap.add_argument("--pmixed-chunk", type=int, default=None,
                    help="block_stats(chunk=...) in (P) and the memory child (default 4; 16 on a GPU)")  # fmt: skip
    ap.add_argument(
        "--memory-only", action="store_true", help="skip the timings (implies --measure-memory)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds (on the first block)")
    ap.add_argument("--naive-positions", type=int, default=0,
                    help="positions per block of (R)'s mixing actually timed, scaled to T (0: all)")  # fmt: skip
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch default)"
    )
    ap.add_argument("--measure-memory", action="store_true")
    ap.add_argument("--only", choices=["public", "stacked"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or auto (GPU if any)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the engine's forwards (F, P, PA, memory)")
    ap.add_argument("--reference-dtype", choices=list(DTYPES), default="float32", help="(R)'s forwards")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    members, seq = DEFAULTS[args.model]
    args.members = args.members or members
    args.seq = args.seq or seq
    if args.rate is None:
        args.rate = 0.3 if args.members <= 8 else 0.03
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        return run_only(args)
    set_device(args.device)
    gpu = DEVICE.type != "cpu"
    args.chunk = args.chunk or (16 if gpu else 4)
    args.pmixed_chunk = args.pmixed_chunk or (16 if gpu else 4)
    if args.memory_only:
        return memory_only(args)

    cfg = gpt2_config(args.model)
    mech = make_mech(args)
    K = mech.params.max_order
    nv = {"alpha": nr.ALPHA, "q": args.rate, "eps": nr.rdp_budget(8.0, 1e-5, nr.ALPHA), "T": 1024}
    t_setup = time.perf_counter()
    base = build_base(cfg)
    pm, names = build_peft(base, args.members, args.rank, args.lora_alpha, args.seed, args.lora_b_std)
    tmp = tempfile.TemporaryDirectory(prefix="pmixed-eval-speed-")
    pm.save_pretrained(tmp.name)  # one folder per adapter: tmp/member_XXX
    dirs = [Path(tmp.name) / nm for nm in names]
    pm.to(DTYPES[args.reference_dtype])
    rt = EnsembleRuntime(base.to(DTYPES[args.dtype]), None, dirs)  # patches ``base`` in place; ``pm`` owns a deep copy
    t_setup = time.perf_counter() - t_setup

    blocks = make_blocks(cfg, args.blocks, args.seq, args.seed)
    T = args.seq - 1
    masks = make_masks(mech, args.blocks, T, args.seed)
    n_mix = T if args.naive_positions <= 0 else min(args.naive_positions, T)
    mix_scale = T / n_mix

    # correctness (not timed): the engine's members == PEFT's members; released probs in [0, 1]
    with torch.no_grad():
        inputs = blocks[0][None, :-1]
        ref = reference_forwards(pm, names[:2], blocks[0])  # on DEVICE, as the engine's rows
        ours = rt.probs(inputs.expand(3, -1), [PUBLIC, 0, 1])
        max_abs_diff = float((ref - ours).abs().max())
    probs0 = pmixed_block(rt, blocks[0], masks[0], mech, args.pmixed_chunk)
    st0, _, _ = block_stats(rt, blocks[0], max_order=K, needed=masks[0], chunk=args.pmixed_chunk, average=False)
    lam0 = released_target_probs(st0, masks[0], mech.params)[1]
    lam_mean = float(lam0[masks[0]].mean()) if masks[0].any() else float("nan")
    probs0_avg = pmixed_block(rt, blocks[0], masks[0], mech, args.pmixed_chunk, average=True)
    p_vs_pa = float(((probs0 - probs0_avg).abs() / probs0_avg).max())
    nr.STATS.update(lam_one=0, bisect=0)

    def f_all():
        for b in blocks:
            floor_block(rt, b, args.members, args.chunk)

    def p_all():
        for b, m in zip(blocks, masks, strict=True):
            pmixed_block(rt, b, m, mech, args.pmixed_chunk)

    def pa_all():
        for b, m in zip(blocks, masks, strict=True):
            pmixed_block(rt, b, m, mech, args.pmixed_chunk, average=True)

    r_parts = {"fwd": [], "mix": []}

    def r_all():
        fwd = mix = 0.0
        for b, m in zip(blocks, masks, strict=True):
            t0 = time.perf_counter()
            dists = reference_forwards(pm, names, b)
            sync()
            t1 = time.perf_counter()
            reference_mixing(dists, b, m, nv, range(n_mix))
            sync()
            t2 = time.perf_counter()
            fwd += t1 - t0
            mix += (t2 - t1) * mix_scale
            del dists
        r_parts["fwd"].append(fwd)
        r_parts["mix"].append(mix)
        return fwd + mix

    fns = {"F": f_all, "P": p_all, "PA": pa_all, "R": r_all}
    for _ in range(args.warmup):  # warm-up on a short prefix of the first block
        short = blocks[0][: min(args.seq, 16)]
        floor_block(rt, short, args.members, args.chunk)
        warm_mask = mech.draw_block(short.shape[0] - 1, torch.Generator().manual_seed(9))
        pmixed_block(rt, short, warm_mask, mech, args.pmixed_chunk)
        pmixed_block(rt, short, warm_mask, mech, args.pmixed_chunk, average=True)
        reference_forwards(pm, names, short)
    r_parts["fwd"].clear()
    r_parts["mix"].clear()
    samples = {k: [] for k in fns}
    names_order = list(fns)
    for r in range(args.repeats):
        order = names_order[r % len(fns) :] + names_order[: r % len(fns)]
        for k in order:
            sync()
            t0 = time.perf_counter()
            ret = fns[k]()
            sync()
            dt = time.perf_counter() - t0
            samples[k].append(ret if k == "R" else dt)  # R: forwards + scaled mixing
    med = {k: statistics.median(v) for k, v in samples.items()}
    r_fwd, r_mix = statistics.median(r_parts["fwd"]), statistics.median(r_parts["mix"])
    lam_one, bis = nr.STATS["lam_one"], nr.STATS["bisect"]

    mem = measure_memory(args, tmp.name) if args.measure_memory else None
    tmp.cleanup()

    ratio_pf = med["P"] / med["F"]
    ratio_rp = med["R"] / med["P"]
    tok = args.blocks * T
    print(
        f"# eval_speed: model={args.model} N={args.members} q={args.rate} K={K} blocks={args.blocks} "
        f"seq={args.seq} (T={T} queries/block) chunk={args.chunk} pmixed_chunk={args.pmixed_chunk} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} (medians, interleaved) setup={t_setup:.1f}s device={DEVICE} "
        f"dtype={args.dtype} (R: {args.reference_dtype})"
        + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else "")
    )
    print(f"{'variant':58} {'s (all blocks)':>14} {'ms/token':>10}")
    rows = [
        ("(F) floor: N+1 rows through EnsembleRuntime.probs", med["F"]),
        ("(P) PMixED: block_stats (drawn pairs) + released", med["P"]),
        ("(PA) PMixED + ensemble average (every member, position)", med["PA"]),
        ("(R) reference-style: set_adapter loop + per-token scipy", med["R"]),
        ("    (R) forwards (N+1, one adapter at a time)", r_fwd),
        (
            "    (R) per-token mixing"
            + (f" (timed on {n_mix}/{T} positions per block, scaled)" if n_mix < T else ""),
            r_mix,
        ),
    ]
    for what, t in rows:
        print(f"{what:58} {t:14.3f} {t * 1e3 / tok:10.3f}")
    ok_pf = "ok" if ratio_pf <= TARGET_FLOOR else "MISS"
    ok_rp = "ok" if ratio_rp >= TARGET_REF else "MISS"
    print(f"P/F (PMixED / floor): {ratio_pf:.3f}x [{ok_pf}, target <= {TARGET_FLOOR}]")
    print(f"R/P (reference-style / PMixED): {ratio_rp:.2f}x [{ok_rp}, target >= {TARGET_REF}]")
    print(
        f"R/PA (reference-style / PMixED with the ensemble average): {med['R'] / med['PA']:.2f}x; "
        f"R/F (reference-style / floor): {med['R'] / med['F']:.2f}x, the largest R/P of an evaluation that "
        "runs all N+1 forwards over every position"
    )
    print(
        f"checks: engine vs PEFT member probs max|diff| = {max_abs_diff:.2e}; P vs PA released probs max "
        f"rel diff {p_vs_pa:.1e}; released probs in [0,1]: "
        f"{bool(((probs0 >= 0) & (probs0 <= 1)).all())}; PMixED mean lambda {lam_mean:.3f} (lora_B std "
        f"{args.lora_b_std}); naive (all timed rounds) lam=1 shortcut {lam_one}, bisections {bis}"
    )
    out = {
        "benchmark": "eval_speed",
        "ceiling_rf": med["R"] / med["F"],
        "model": args.model,
        "members": args.members,
        "rate": args.rate,
        "blocks": args.blocks,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "device": str(DEVICE),
        "dtype": args.dtype,
        "reference_dtype": args.reference_dtype,
        "s": {"F": med["F"], "P": med["P"], "PA": med["PA"], "R": med["R"], "R_fwd": r_fwd, "R_mix": r_mix},
        "samples": samples,
        "naive_positions_timed": n_mix,
        "naive_mix_scaled": n_mix < T,
        "P_over_F": ratio_pf,
        "R_over_P": ratio_rp,
        "R_over_PA": med["R"] / med["PA"],
        "P_vs_PA_max_rel_diff": p_vs_pa,
        "lora_b_std": args.lora_b_std,
        "pmixed_mean_lambda": lam_mean,
        "naive_lam_one": lam_one,
        "naive_bisections": bis,
        "max_abs_diff_engine_vs_peft": max_abs_diff,
    }
    if mem is not None:
        out.update(print_memory(args, mem))
    if args.json:
        print(json.dumps(out))
    return out


def memory_only(args) -> dict:
    cfg = gpt2_config(args.model)
    base = build_base(cfg)
    pm, names = build_peft(base, args.members, args.rank, args.lora_alpha, args.seed, args.lora_b_std)
    with tempfile.TemporaryDirectory(prefix="pmixed-eval-speed-") as tmp:
        pm.save_pretrained(tmp)
        del pm, base
        mem = measure_memory(args, tmp)
    print(f"# eval_speed memory only: model={args.model} N={args.members} seq={args.seq} "
          f"pmixed_chunk={args.pmixed_chunk} threads={torch.get_num_threads()}")  # fmt: skip
    out = {"benchmark": "eval_speed_memory", **print_memory(args, mem)}
    if args.json:
        print(json.dumps(out))
    return out


def print_memory(args, mem: dict) -> dict:
    out = {}
    pub, st = mem["public"], mem["stacked"]
    if pub.get("peak_cuda"):  # on a GPU: the models and activations live in GPU memory
        ratio = st["peak_cuda"] / pub["peak_cuda"]
        ok = "ok" if ratio <= TARGET_MEM else "MISS"
        print(f"GPU memory (fresh subprocesses, one block of {args.seq}): peak allocated public alone "
              f"{pub['peak_cuda'] / 2**20:.1f} MiB, EnsembleRuntime N={args.members} + PMixED eval "
              f"{st['peak_cuda'] / 2**20:.1f} MiB: {ratio:.3f}x [{ok}, target <= {TARGET_MEM}]")
        out["mem_ratio_cuda"] = ratio
    ratio_mem = st["peak_rss"] / pub["peak_rss"]
    net_pub = pub["peak_rss"] - pub["rss_start"]
    net_st = st["peak_rss"] - st["rss_start"]
    ok_m = "ok" if ratio_mem <= TARGET_MEM else "MISS"
    mib = 2**20
    print(
        f"memory (fresh subprocesses, one block of {args.seq}): peak RSS public alone "
        f"{pub['peak_rss'] / mib:.1f} MiB, EnsembleRuntime N={args.members} + PMixED eval "
        f"{st['peak_rss'] / mib:.1f} MiB"
    )
    print(
        f"memory ratio (stacked / public, peak RSS): {ratio_mem:.3f}x [{ok_m}, target <= {TARGET_MEM}]"
    )
    print(
        f"memory above the process's RSS after imports: public {net_pub / mib:.1f} MiB, stacked "
        f"{net_st / mib:.1f} MiB ({net_st / max(net_pub, 1):.2f}x); after model load: public "
        f"{(pub['rss_model'] - pub['rss_start']) / mib:.1f} MiB, stacked "
        f"{(st['rss_model'] - st['rss_start']) / mib:.1f} MiB"
    )
    out["memory"] = mem
    out["mem_ratio"] = ratio_mem
    return out


if __name__ == "__main__":
    main()
