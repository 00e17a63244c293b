"""Forward cost of the public model + M ensemble members: stacked LoRA vs the reference-style loop.

Everything is measured in ONE run and reported as ratios (shared, noisy machines):

1. public-only forward of a batch [1, T];
   floor: the same base forward on a [1 + M, T] batch with no adapters (what cannot be avoided);
2. stacked forward: 1 public row + M member rows in one batch (``StackedLoRA``);
3. naive loop: PEFT ``set_adapter`` one member at a time, one [1, T] forward each, plus the
   public forward (``disable_adapter``), i.e. the reference implementation's pattern restricted
   to the M drawn members (the reference ran all N); PEFT's own mixed batch (``adapter_names=``)
   is timed as a second baseline;
4. one KV-cached decode step (T = 1) for the same rows, public-only vs stacked;
5. memory: the stacked model holding N adapters vs the base alone (RSS on CPU, allocator on CUDA),
   plus the exact tensor bytes.

Models are randomly initialised from configs (no hub access). Adapters are random LoRA
folders in the exact ``PeftModel.save_pretrained`` layout, written to a temporary directory.

    python benchmarks/forward.py --device cpu --model gpt2-small-random --members 80 --rows 3 --seq 128
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pmixed.models.hf_compat import output_cache  # noqa: E402
from pmixed.models.stacked_lora import StackedLoRA  # noqa: E402


def gpt2_config(name: str, seq: int):
    from transformers import GPT2Config

    if name == "tiny":
        return GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=max(seq + 8, 256),
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    if name == "gpt2-small-random":
        return GPT2Config()  # 12 layers, 768, 12 heads, vocab 50257, 1024 positions: 124M
    raise SystemExit(f"unknown --model {name!r}")


def write_random_adapters(cfg, root: Path, n: int, rank: int, alpha: float, targets: list[str]):
    """n LoRA adapter folders (adapter_config.json + adapter_model.safetensors), random A and B."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):  # module names and shapes only, no memory
        meta = GPT2LMHeadModel(cfg)
    shapes = {
        name: (int(mod.weight.shape[0]), int(mod.weight.shape[1]))  # Conv1D weight [in, out]
        for name, mod in meta.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    }
    lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=True)
    gen = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(n):
        d = root / f"member_{i:03d}"
        d.mkdir(parents=True)
        lcfg.save_pretrained(str(d))
        sd = {}
        for name, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.{name}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            sd[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
        save_file(sd, str(d / "adapter_model.safetensors"))
        dirs.append(d)
    del meta
    return dirs


class Mem:
    """Resident memory on CPU (current and peak RSS), allocator memory on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:  # pragma: no cover
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )  # high-water mark, Linux KiB


def timers(fns: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each fn() over `repeats` rounds after `warmup` rounds.

    The candidates are interleaved round by round, so drift in the machine's load (shared,
    noisy machines) hits all of them alike and their ratios stay meaningful.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def mib(x: float) -> str:
    return f"{x / 2**20:9.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", choices=["tiny", "gpt2-small-random"], default="tiny")
    ap.add_argument("--members", type=int, default=80, help="N adapters loaded")
    ap.add_argument("--rows", type=int, default=3, help="M member rows per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="c_attn", help="comma-separated module names")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if not 1 <= args.rows <= args.members:
        raise SystemExit("--rows must lie in [1, --members]")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    targets = [t for t in args.targets.split(",") if t]
    cfg = gpt2_config(args.model, args.seq)
    rep = dict(device=device, repeats=args.repeats, warmup=args.warmup)

    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    tmp = tempfile.TemporaryDirectory(prefix="pmixed-bench-")
    dirs = write_random_adapters(cfg, Path(tmp.name), args.members, args.rank, args.alpha, targets)
    gc.collect()
    mem = Mem(device)
    mem0 = mem.now()

    # ---- base alone
    base = GPT2LMHeadModel(cfg).to(device).eval()
    mem_base_static = mem.now() - mem0
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(1)
    m = args.rows
    x_all = torch.randint(0, cfg.vocab_size, (1 + m, args.seq), generator=gen).to(device)
    x_pub = x_all[:1]
    member_ids = torch.randperm(args.members, generator=gen)[:m]
    ids = torch.cat([torch.tensor([-1]), member_ids]).to(device)  # [1 + M]: row 0 public

    mem.reset_peak()
    with torch.no_grad():  # peak of the base alone on the same batch shapes
        base(x_pub, use_cache=False)
        base(x_all, use_cache=False)
    mem_base_peak = mem.peak() - mem0

    # ---- stacked: N adapters on the same base
    t0 = time.perf_counter()
    stacked = StackedLoRA.from_peft_dirs(base, dirs)
    t_load = time.perf_counter() - t0
    mem_stacked_static = mem.now() - mem0
    mem.reset_peak()
    with torch.no_grad():
        stacked(x_pub, None, use_cache=False)
        stacked(x_all, ids, use_cache=False)
    mem_stacked_peak = mem.peak() - mem0
    with torch.no_grad():  # public and floor run on the patched model with no member row
        t = timers(
            {
                "public": lambda: stacked(x_pub, None, use_cache=False),
                "floor": lambda: stacked(x_all, None, use_cache=False),
                "stacked": lambda: stacked(x_all, ids, use_cache=False),
            },
            **rep,
        )
    t_public, t_floor, t_stacked = t["public"], t["floor"], t["stacked"]
    with torch.no_grad():
        ref_logits = stacked(x_all, ids, use_cache=False).logits.float()
        # sanity: the member rows really differ from the public model on the same tokens
        effect = (ref_logits[1:] - stacked(x_all[1:], None).logits.float()).abs().max().item()

    # ---- one decode step with KV caches (prefix T-1, then 1 token)
    with torch.no_grad():
        cache_pub = output_cache(base(x_pub[:, :-1], use_cache=True))
        cache_all = output_cache(stacked(x_all[:, :-1], ids, use_cache=True))

        def step_pub():
            stacked(x_pub[:, -1:], None, past_key_values=cache_pub, use_cache=True)
            cache_pub.crop(-1)  # drop the decoded token again

        def step_all():
            stacked(x_all[:, -1:], ids, past_key_values=cache_all, use_cache=True)
            cache_all.crop(-1)

        t = timers({"pub": step_pub, "all": step_all}, **rep)
        t_dec_pub, t_dec_all = t["pub"], t["all"]
    cache_pub = cache_all = None  # free the caches
    base_bytes, adapter_bytes = stacked.base_bytes(), stacked.adapter_bytes()

    # ---- naive reference-style loop with PEFT (same base, unpatched), M members loaded
    base = stacked.unpatch()
    stacked = None  # drop the stacked adapters
    gc.collect()
    chosen = [int(i) for i in member_ids]
    peft_model = PeftModel.from_pretrained(base, str(dirs[chosen[0]]), adapter_name=f"m{chosen[0]}")
    for i in chosen[1:]:
        if f"m{i}" not in peft_model.peft_config:
            peft_model.load_adapter(str(dirs[i]), adapter_name=f"m{i}")
    peft_model.eval()

    def naive():
        outs = []
        with peft_model.disable_adapter():
            outs.append(peft_model(input_ids=x_pub, use_cache=False).logits)
        for i in chosen:
            peft_model.set_adapter(f"m{i}")
            outs.append(
                peft_model(input_ids=x_all[len(outs) : len(outs) + 1], use_cache=False).logits
            )
        return torch.cat(outs)

    names = ["__base__"] + [f"m{i}" for i in chosen]
    with torch.no_grad():
        t = timers(
            {
                "public": lambda: base(x_pub, use_cache=False),  # PEFT-wrapped, adapters off
                "naive": naive,
                "mixed": lambda: peft_model(input_ids=x_all, adapter_names=names, use_cache=False),
            },
            **rep,
        )
        t_public_b, t_naive, t_peft_mixed = t["public"], t["naive"], t["mixed"]
        err = (naive().float() - ref_logits).abs().max().item()
        err_mixed = (
            (
                peft_model(input_ids=x_all, adapter_names=names, use_cache=False).logits.float()
                - ref_logits
            )
            .abs()
            .max()
            .item()
        )
    tmp.cleanup()

    # ---- report
    print(
        f"device={args.device} ({torch.get_num_threads()} threads)  model={args.model} "
        f"({n_params / 1e6:.1f}M params)  members N={args.members}  rows M={m} "
        f"(+1 public)  seq T={args.seq}  LoRA r={args.rank} on {','.join(targets)}  "
        f"median of {args.repeats}"
    )
    print(f"adapter loading (N folders -> stacked): {t_load:.3f} s")
    print("-- time per forward (full sequence, logits for all positions)")
    print(f"(1) public-only [1, T]                         {t_public * 1e3:10.2f} ms")
    print(f"    floor: base on [1+M, T], no adapters        {t_floor * 1e3:10.2f} ms")
    print(f"(2) stacked: 1 public + {m} member rows          {t_stacked * 1e3:10.2f} ms")
    print(f"(3) naive PEFT loop: public + {m} x set_adapter  {t_naive * 1e3:10.2f} ms")
    print(f"    public-only again, in the PEFT phase        {t_public_b * 1e3:10.2f} ms")
    print(f"    PEFT mixed batch (adapter_names=)           {t_peft_mixed * 1e3:10.2f} ms")
    print("-- one KV-cached decode step (T=1 after a T-1 prefix)")
    print(f"    public-only [1, 1]                          {t_dec_pub * 1e3:10.2f} ms")
    print(f"    stacked [1+M, 1]                            {t_dec_all * 1e3:10.2f} ms")
    print("-- ratios")
    print(f"stacked / public-only        {t_stacked / t_public:7.2f}x")
    print(f"stacked / floor              {t_stacked / t_floor:7.2f}x")
    # naive and PEFT mixed run in a second phase: normalise each phase by its own public time
    norm = t_public / t_public_b
    print(
        f"naive / stacked              {t_naive / t_stacked:7.2f}x  (public-normalised {t_naive * norm / t_stacked:.2f}x)"
    )
    print(
        f"PEFT mixed / stacked         {t_peft_mixed / t_stacked:7.2f}x  (public-normalised {t_peft_mixed * norm / t_stacked:.2f}x)"
    )
    print(f"decode stacked / public      {t_dec_all / t_dec_pub:7.2f}x")
    print(
        f"decode naive / stacked       {(1 + m) * t_dec_pub / t_dec_all:7.2f}x"
        f"  (estimate: naive decode = (1+M) public steps, one per member cache)"
    )
    print("-- memory (relative to the process before the base was built)")
    label = "allocated" if device.type == "cuda" else "RSS"
    print(f"base alone, static {label}          {mib(mem_base_static)}")
    print(f"base + {args.members} adapters, static {label}  {mib(mem_stacked_static)}")
    print(f"base alone, peak during forwards   {mib(mem_base_peak)}")
    print(f"stacked, peak during forwards      {mib(mem_stacked_peak)}  (high-water mark)")
    print(f"tensor bytes: base {mib(base_bytes)}, {args.members} adapters {mib(adapter_bytes)}")
    print(
        f"memory(N adapters) / memory(base), static {label}: {mem_stacked_static / mem_base_static:6.3f}x"
    )
    print(
        f"memory(N adapters) / memory(base), tensors:      {(base_bytes + adapter_bytes) / base_bytes:6.3f}x"
    )
    print(
        f"memory(N adapters) / memory(base), peak:         {mem_stacked_peak / mem_base_peak:6.3f}x"
    )
    print(
        f"-- check: max |logits stacked - naive PEFT| = {err:.2e}, vs PEFT mixed = {err_mixed:.2e}"
        f" (adapter effect on member rows: {effect:.2e})"
    )
    print(json.dumps(dict(
        public_ms=t_public * 1e3, floor_ms=t_floor * 1e3, stacked_ms=t_stacked * 1e3,
        naive_ms=t_naive * 1e3, peft_mixed_ms=t_peft_mixed * 1e3, decode_public_ms=t_dec_pub * 1e3,
        decode_stacked_ms=t_dec_all * 1e3, mem_base=mem_base_static, mem_stacked=mem_stacked_static,
        mem_base_peak=mem_base_peak, mem_stacked_peak=mem_stacked_peak, base_bytes=base_bytes,
        adapter_bytes=adapter_bytes, max_abs_err=err,
    )))  # fmt: skip


if __name__ == "__main__":
    main()
