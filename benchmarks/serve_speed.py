"""Private decoding speed: the batched decode engine (``pmixed.serve.scheduler.Decoder``) against
the floor, the original code's way and today's serial path, and under concurrent load.

Issue 13's targets: "per token, batched private decoding in drawn-only mode costs at most 1.5x one
batched forward of (1 + expected drawn members) rows with KV caches, and constant-work mode at
most 1.5x one batched forward of N + 1 rows; and is at least 5x faster than recomputing the whole
prefix every step (the original code's way) at 256 generated tokens; also show today's serial
path in the same run", and under load "aggregate tokens/s at 8 and 32 concurrent streams (at
least 4x the single-stream figure in drawn-only mode on the CPU), p50 / p95 inter-token latency
and time to first token at 1, 8, 32 streams; peak memory at 32 streams".

A synthetic ensemble: a randomly initialised base (``--model tiny``: configs/quick.toml's public
model shape, 4 layers, 192 wide, vocab 4096; ``micro``: for tests; ``smollm2-random``: the
SmolLM2-135M shape, 30 layers, 576 wide, vocab 49152) and N random LoRA members (r 4, lora_B std
0.3: as far from the public model as trained members, see eval_speed.py) saved as PEFT folders.
Random prompt tokens; every generated token is a real PMixED query charged to a SQLite ledger
file (fsync'd, one transaction per step), sampled from the OS CSPRNG. Timed in ONE run:

  (D) drawn-only mode, one stream: seconds per generated token over ``--tokens`` tokens;
  (C) constant-work mode, one stream;
  (Fd) floor for D: one group of round(1 + qN) rows decoding one token per step with KV caches
       appended in place (``EnsembleRuntime.decode(..., persistent=True)``), over the same
       number of steps and cache lengths;
  (Fc) floor for C: one group of N + 1 rows, the same way;
  (Fw) the work floor for D: one group of 1 + N E[L] / T rows, the same way, where L is the last
       step (of T) at which a member is drawn: an exact decoder must run a member over every token
       before the last step it is drawn at (its KV cache there depends on all of them), so any
       drawn-only decoder advances N E[L] member rows over T steps, E[L] = T - (1-q)(1-(1-q)^T)/q;
       at q = 0.5 this is nearly every member at every step, whatever the engine does;
  (R) the original code's way: every step recomputes the whole prefix (no KV cache) for the
       public row and the drawn members, then the mechanism (timed on ``--recompute-tokens``
       steps spread over the 256 and scaled: the output says so);
  (S) today's serial path: ``PrivatePredictor.generate`` (public row, then the drawn members,
       per-row caches, one charge per token);
  (AD), (AC) screened PMixED (docs/privacy.md section 11) with a public screen that sends every
       query to the ensemble (the most work screening adds: a unit taken and the entropy computed
       per token), drawn-only and constant-work; (APD) with a private screen (test members drawn
       at rate 0.5 and scored every token), drawn-only. Issue 14's target: at most 1.25x plain.

Load (``--streams 1,8,32``): S concurrent streams of ``--load-tokens`` tokens each, in both modes,
each configuration in a fresh subprocess (its peak RSS is its own): aggregate tokens/s, p50/p95
inter-token latency, p50/p95 time to first token, peak RSS. ``--arrival-gap MS`` submits stream i
at i x MS milliseconds instead of all at once, so that requests join and leave the running batch
throughout the run (continuous batching's churn). ``--prefill-tokens K`` prefills the load runs'
prompts K tokens per step at most (``Decoder(prefill_tokens=K)``, chunked prefill), so that a
long prompt (``--prompt``) arriving does not stall the streams already decoding (default: the
server's, 64; 0: each prompt whole, in the step it arrives).

``--load-repeats R`` runs R interleaved rounds of the load configurations and reports the run with
the median rate of each (its own latencies and memory), with every run's rate; ``--load-only``
skips the per-token part. ``--dtype bfloat16`` runs the forwards (engine and floors) in bf16, as
``[eval] dtype`` / ``pmixed serve --dtype`` do. ``--device cuda`` runs them on the GPU (the
mechanism stays on the CPU, as in ``pmixed serve``; timed loops of the floors and of the
recomputation end with ``torch.cuda.synchronize``; load runs add their peak GPU memory).

    python benchmarks/serve_speed.py --model tiny --members 32 --sample-rate 0.5
    python benchmarks/serve_speed.py --model smollm2-random --members 8 --load-tokens 16 --dtype bfloat16 \
        --modes drawn --streams 1,32 --load-only --load-repeats 3
    python benchmarks/serve_speed.py --model smollm2-random --members 8 --tokens 64 --streams 1,8
    python benchmarks/serve_speed.py --device cuda --model smollm2-random --members 8 --streams 1,8,32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

try:
    import pmixed  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pmixed.engine import PrivatePredictor  # noqa: E402
from pmixed.mechanism.pmixed import PMixED  # noqa: E402
from pmixed.models.device import resolve_device  # noqa: E402
from pmixed.models.runtime import PUBLIC, EnsembleRuntime, RowGroup  # noqa: E402
from pmixed.privacy.ledger import Ledger  # noqa: E402
from pmixed.serve.scheduler import DEFAULT_PREFILL_TOKENS, Decoder  # noqa: E402
from pmixed.serve.stream import SamplingParams  # noqa: E402


def base_model(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "micro":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512, n_positions=512,
                                          bos_token_id=0, eos_token_id=0)).eval(), ["c_attn"], True
    if name == "tiny":
        return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=192, n_head=4, vocab_size=4096, n_positions=512,
                                          bos_token_id=0, eos_token_id=0)).eval(), ["c_attn"], True
    if name == "smollm2-random":
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        return LlamaForCausalLM(cfg).eval(), ["q_proj", "v_proj"], False
    raise SystemExit(f"unknown --model {name!r}")


def save_members(base, targets, fifo, root: Path, n: int, b_std: float = 0.3) -> list[Path]:
    import copy

    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=fifo)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_std)
        d = root / f"member_{i:03d}"
        pm.save_pretrained(str(d))
        dirs.append(d)
    return dirs


class _NoTok:
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def setup(args, root: Path):
    base, targets, fifo = base_model(args.model)
    dirs = save_members(base, targets, fifo, root, args.members)
    base.to(getattr(torch, args.dtype))  # the inference precision, as ``[eval] dtype`` (cast before stacking)
    base.to(resolve_device(args.device))  # the runtime runs where the base is
    rt = EnsembleRuntime(base, _NoTok(), dirs)
    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=10**6, ensemble_size=args.members,
                  sample_rate=args.sample_rate)
    return rt, mech


def prompt(args, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    vocab = args.vocab
    return torch.randint(1, vocab, (args.prompt,), generator=g).tolist()


def adaptive_mech(args, private: bool):
    """Screened PMixED with every query private (threshold -1e9: the most work screening can
    add), a public screen or a private one (test members at rate 0.5, weight 1)."""
    from pmixed.mechanism.adaptive import AdaptivePMixED

    return AdaptivePMixED(epsilon=8.0, delta=1e-5, private_queries=10**6, ensemble_size=args.members,
                          sample_rate=args.sample_rate, screen_threshold=-1e9,
                          screen_weight=1.0 if private else 0.0, screen_epsilon=1e-4 if private else 0.0,
                          screen_rate=0.5)


def decoder_per_token(rt, mech, args, mode: str, led_path: Path) -> float:
    rule = getattr(mech, "rule", None)
    with Ledger(led_path, epsilon=8.0, delta=1e-5, rule=rule) as led, Decoder(rt, mech, led, mode=mode) as dec:
        s = dec.submit(prompt(args, 1), SamplingParams(max_tokens=args.tokens, stop_at_eos=False))
        it = iter(s)
        next(it)  # the first token includes the prefill
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        return (time.perf_counter() - t0) / max(n, 1)


def drawn_work_rows(members: int, q: float, steps: int) -> float:
    """1 + N E[L] / T: the rows per step an exact drawn-only decoder advances on average (Fw)."""
    last = steps - (1 - q) * (1 - (1 - q) ** steps) / q if q < 1 else steps
    return 1 + members * last / steps


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer around a call measures the call (the
    decoders' steps end on the CPU, which waits already)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def floor_per_token(rt, args, rows: int) -> float:
    g = RowGroup([PUBLIC, *range(rows - 1)], tokens=prompt(args, 1))
    rt.decode([g], persistent=True)
    tok = 1
    sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(args.tokens - 1):  # the cache appended in place (models/kv_cache.py): no re-copy
        g.tokens = [tok]
        rt.decode([g], persistent=True)
    sync(rt.device)
    return (time.perf_counter() - t0) / (args.tokens - 1)


@torch.no_grad()
def recompute_per_token(rt, mech, args) -> tuple[float, int]:
    """The original's way: the whole prefix through public + drawn members at every step."""
    seq = prompt(args, 1) + [1] * args.tokens
    steps = sorted({int(i * (args.tokens - 1) / max(args.recompute_tokens - 1, 1)) for i in range(args.recompute_tokens)})
    total = 0.0
    for s in steps:
        ids = torch.tensor([seq[: args.prompt + s]])
        t0 = time.perf_counter()
        drawn = mech.draw()
        pub = rt.probs(ids, [PUBLIC])[0, -1].double()
        mem = rt.probs(ids.expand(len(drawn), -1), [int(i) for i in drawn])[:, -1].double() if len(drawn) else pub.new_zeros(0, pub.shape[0])
        mech.release(pub, mem)
        sync(rt.device)
        total += time.perf_counter() - t0
    return total / len(steps), len(steps)


def serial_per_token(rt, mech, args, led_path: Path) -> float:
    with Ledger(led_path, epsilon=8.0, delta=1e-5) as led:
        pred = PrivatePredictor(rt, mech, led)
        text = " ".join(map(str, prompt(args, 1)))
        pred.generate(text, max_new_tokens=2, stop_at_eos=False)  # warm-up
        t0 = time.perf_counter()
        out = pred.generate(text, max_new_tokens=args.tokens, stop_at_eos=False)
        return (time.perf_counter() - t0) / len(out.token_ids)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def load_run(args) -> dict:
    """One load configuration (``--only-load MODE:STREAMS``), in this (fresh) process."""
    mode, streams = args.only_load.split(":")
    streams = int(streams)
    with tempfile.TemporaryDirectory() as tmp:
        rt, mech = setup(args, Path(tmp))
        rss0 = peak_rss()
        with Ledger(Path(tmp) / "load.ledger", epsilon=8.0, delta=1e-5) as led, \
                Decoder(rt, mech, led, mode=mode, max_active=streams, max_queue=0,
                        prefill_tokens=args.prefill_tokens or None) as dec:
            # warm-up (kernels, allocator)
            list(dec.submit(prompt(args, 99), SamplingParams(max_tokens=2, stop_at_eos=False)))
            times: list[list[float]] = [[] for _ in range(streams)]
            starts = [0.0] * streams

            def read(i, s):
                for _ in s:
                    times[i].append(time.perf_counter())

            t0 = time.perf_counter()
            threads = []
            for i in range(streams):
                time.sleep(max(0.0, t0 + i * args.arrival_gap / 1e3 - time.perf_counter()))  # staggered arrivals
                starts[i] = time.perf_counter()
                s = dec.submit(prompt(args, i), SamplingParams(max_tokens=args.load_tokens, stop_at_eos=False))
                th = threading.Thread(target=read, args=(i, s))
                th.start()
                threads.append(th)
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            cache = dec.cache_bytes_per_request()
    ttft = [t[0] - s for t, s in zip(times, starts)]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))  # noqa: E731
    return {"mode": mode, "streams": streams, "tokens": sum(len(t) for t in times), "wall_s": wall,
            "tokens_per_s": sum(len(t) for t in times) / wall, "itl_p50_ms": 1e3 * q(itl, 50),
            "itl_p95_ms": 1e3 * q(itl, 95), "itl_p99_ms": 1e3 * q(itl, 99),
            "itl_max_ms": 1e3 * max(itl, default=float("nan")), "ttft_p50_ms": 1e3 * q(ttft, 50), "ttft_p95_ms": 1e3 * q(ttft, 95),
            "peak_rss_mib": peak_rss() / 2**20, "rss_before_mib": rss0 / 2**20,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if rt.device.type == "cuda" else None,
            "cache_bound_mib_per_request": None if cache is None else cache / 2**20}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--members", type=int, default=32)
    ap.add_argument("--sample-rate", type=float, default=0.5)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--recompute-tokens", type=int, default=16)
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--load-tokens", type=int, default=32)
    ap.add_argument("--modes", default="drawn,constant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="precision of the forwards (the engine's and the floors'), as [eval] dtype")
    ap.add_argument("--device", default="cpu", help="where the forwards run: cpu, cuda, cuda:<i> or auto "
                    "(the mechanism runs on the CPU, as in pmixed serve)")
    ap.add_argument("--load-repeats", type=int, default=1,
                    help="rounds over the load configurations (interleaved); each figure is the run "
                         "with the median tokens/s (a noisy machine)")
    ap.add_argument("--arrival-gap", type=float, default=0.0,
                    help="milliseconds between the load streams' arrivals (0: all at once); staggered, "
                         "requests join and leave the running batch throughout the run")
    ap.add_argument("--prefill-tokens", type=int, default=DEFAULT_PREFILL_TOKENS,
                    help="load runs: chunked prefill, at most this many prompt tokens per step (default: the "
                         "server's; 0: whole prompts)")
    ap.add_argument("--load-only", action="store_true", help="skip the per-token part")
    ap.add_argument("--only-load", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.vocab = {"micro": 512, "tiny": 4096, "smollm2-random": 49152}.get(args.model, 512)
    if args.only_load:
        print(json.dumps(load_run(args)))
        return {}
    res: dict = {"model": args.model, "members": args.members, "sample_rate": args.sample_rate,
                 "tokens": args.tokens, "prompt": args.prompt, "threads": args.threads,
                 "dtype": args.dtype, "device": str(resolve_device(args.device)), "load_repeats": args.load_repeats, "arrival_gap_ms": args.arrival_gap,
                 "prefill_tokens": args.prefill_tokens or None}
    if not args.load_only:
        per_token(args, res)
    res["load"] = load_runs(args)
    if args.json:
        print(json.dumps(res, indent=2))
        return res
    if not args.load_only:
        print_per_token(args, res)
    gap = f", arriving {args.arrival_gap:g} ms apart" if args.arrival_gap else ""
    gap += f", prompts of {args.prompt} tokens" + (f" prefilled {args.prefill_tokens} tokens per step"
                                                   if args.prefill_tokens else " prefilled whole")
    print(f"load ({args.model}, N = {args.members}, q = {args.sample_rate}, {res['dtype']} on {res['device']}, {args.load_tokens} tokens "
          f"per stream{gap}; {args.load_repeats} interleaved round(s), the median run's figures): mode | streams | tokens/s "
          "| x single | ITL p50 / p95 / p99 / max ms | TTFT p50 / p95 ms | peak RSS MiB | cache bound / request MiB")
    gpu = lambda r: "" if r.get("peak_gpu_mib") is None else f" (GPU {r['peak_gpu_mib']:.0f})"  # noqa: E731
    for r in res["load"]:
        runs = "" if len(r["tokens_per_s_runs"]) < 2 else "  (runs: " + ", ".join(f"{x:.1f}" for x in r["tokens_per_s_runs"]) + ")"
        x = "-" if r["x_single"] is None else f"{r['x_single']:.2f}x"  # no single-stream run
        print(f"  {r['mode']:>8} | {r['streams']:>3} | {r['tokens_per_s']:8.1f} | {x} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p95_ms']:.1f} / {r['itl_p99_ms']:.1f} / {r['itl_max_ms']:.1f} | {r['ttft_p50_ms']:.1f} / {r['ttft_p95_ms']:.1f} | "
              f"{r['peak_rss_mib']:.0f}{gpu(r)} | {r['cache_bound_mib_per_request']:.2f}{runs}")
    return res


def per_token(args, res: dict) -> None:
    """The one-stream figures (D, C, the floors, R, S, the screened ones) and their ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        rt, mech = setup(args, Path(tmp))
        res["dtype"] = str(rt.dtype).removeprefix("torch.")  # what the forwards run in
        drawn_rows = max(1, round(1 + args.sample_rate * args.members))
        res["D"] = decoder_per_token(rt, mech, args, "drawn", Path(tmp) / "d.ledger")
        res["C"] = decoder_per_token(rt, mech, args, "constant", Path(tmp) / "c.ledger")
        res["Fd"] = floor_per_token(rt, args, drawn_rows)
        res["Fc"] = floor_per_token(rt, args, args.members + 1)
        work_rows = max(1, round(drawn_work_rows(args.members, args.sample_rate, args.tokens)))
        res["Fw"] = res["Fc"] if work_rows == args.members + 1 else floor_per_token(rt, args, work_rows)
        res["Fw_rows"] = work_rows
        res["R"], res["R_steps"] = recompute_per_token(rt, mech, args)
        res["S"] = serial_per_token(rt, mech, args, Path(tmp) / "s.ledger")
        res["AD"] = decoder_per_token(rt, adaptive_mech(args, False), args, "drawn", Path(tmp) / "ad.ledger")
        res["AC"] = decoder_per_token(rt, adaptive_mech(args, False), args, "constant", Path(tmp) / "ac.ledger")
        res["APD"] = decoder_per_token(rt, adaptive_mech(args, True), args, "drawn", Path(tmp) / "apd.ledger")
    res["ratios"] = {"AD/D": res["AD"] / res["D"], "AC/C": res["AC"] / res["C"], "APD/D": res["APD"] / res["D"],"D/Fd": res["D"] / res["Fd"], "D/Fw": res["D"] / res["Fw"], "C/Fc": res["C"] / res["Fc"], "R/D": res["R"] / res["D"],
                     "R/C": res["R"] / res["C"], "S/D": res["S"] / res["D"], "C/D": res["C"] / res["D"]}


def load_runs(args) -> list[dict]:
    """Every (mode, streams) configuration in a fresh subprocess, ``--load-repeats`` interleaved
    rounds; per configuration the run with the median tokens/s, with every run's rate."""
    configs = [(mode, int(s)) for mode in args.modes.split(",") for s in args.streams.split(",") if s]
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    for _ in range(args.load_repeats):
        for mode, s in configs:
            cmd = [sys.executable, __file__, "--only-load", f"{mode}:{s}", "--model", args.model,
                   "--members", str(args.members), "--sample-rate", str(args.sample_rate),
                   "--prompt", str(args.prompt), "--load-tokens", str(args.load_tokens),
                   "--threads", str(args.threads), "--dtype", args.dtype, "--device", args.device,
                   "--arrival-gap", str(args.arrival_gap),
                   "--prefill-tokens", str(args.prefill_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[(mode, s)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load = []
    for c in configs:
        ordered = sorted(runs[c], key=lambda r: r["tokens_per_s"])
        pick = dict(ordered[(len(ordered) - 1) // 2])  # the median run (the lower one of an even count)
        pick["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs[c]]
        load.append(pick)
    single = {r["mode"]: r["tokens_per_s"] for r in load if r["streams"] == 1}
    for r in load:
        r["x_single"] = r["tokens_per_s"] / single[r["mode"]] if r["mode"] in single else None
    return load


def print_per_token(args, res: dict) -> None:
    drawn_rows = max(1, round(1 + args.sample_rate * args.members))
    ms = lambda x: f"{1e3 * x:.2f} ms"  # noqa: E731
    print(f"model {args.model}, N = {args.members}, q = {args.sample_rate}, prompt {args.prompt}, "
          f"{args.tokens} generated tokens, {args.threads} thread(s), {res['dtype']} on {res['device']}; per generated token:")
    print(f"  (D)  drawn-only decoder          {ms(res['D'])}   D/Fd = {res['ratios']['D/Fd']:.2f}x (target <= 1.5)")
    print(f"  (C)  constant-work decoder       {ms(res['C'])}   C/Fc = {res['ratios']['C/Fc']:.2f}x (target <= 1.5); C/D = {res['ratios']['C/D']:.2f}x")
    print(f"  (Fd) floor: {drawn_rows} rows, one batched cached forward   {ms(res['Fd'])}")
    print(f"  (Fc) floor: {args.members + 1} rows, one batched cached forward  {ms(res['Fc'])}")
    print(f"  (Fw) work floor of any exact drawn-only decoder: {res['Fw_rows']} rows  {ms(res['Fw'])}   "
          f"D/Fw = {res['ratios']['D/Fw']:.2f}x")
    print(f"  (R)  recompute the prefix (original's way; {res['R_steps']} of {args.tokens} steps timed, mean)  "
          f"{ms(res['R'])}   R/D = {res['ratios']['R/D']:.1f}x, R/C = {res['ratios']['R/C']:.1f}x (target >= 5)")
    print(f"  (S)  today's serial path (PrivatePredictor.generate)  {ms(res['S'])}   S/D = {res['ratios']['S/D']:.2f}x")
    print(f"  (AD) screened, public screen, every query private, drawn-only  {ms(res['AD'])}   AD/D = "
          f"{res['ratios']['AD/D']:.2f}x (target <= 1.25)")
    print(f"  (AC) the same, constant-work  {ms(res['AC'])}   AC/C = {res['ratios']['AC/C']:.2f}x (target <= 1.25)")
    print(f"  (APD) screened, private screen (test members at q_s 0.5), every query private, drawn-only  "
          f"{ms(res['APD'])}   APD/D = {res['ratios']['APD/D']:.2f}x")


if __name__ == "__main__":
    main()
