"""Cost of the PMixED release (projection + mixing) vs a naive per-token implementation in the
original code's style (benchmarks/naive_reference.py; REFERENCE.md section 4, item 6).

Everything is measured in ONE run, interleaved, after warm-up, as medians, and reported as
ratios (shared, noisy machines). Three regimes of synthetic distributions over V tokens (float32
probabilities, like a model's softmax output):

    near:  member logits = public logits + N(0, noise^2)   (a member fine-tuned on similar text)
    far:   member logits independent N(0, far_std^2)        (a member on a different topic)
    mixed: even-numbered members near, odd-numbered members far (half and half)

Timed, with the same inputs and the same Poisson draws for both sides:

    (a) ours, one query:      PMixED.release(public [V], members [m, V]) at a fixed m (default 3)
    (b) naive, one query:     naive_release on the same inputs
    (a'/b') the same two averaged over a sequence of seeded Poisson draws (m ~ Bin(N, q))
    (c) ours, one block:      PMixED.release_rows over P positions with targets (teacher forcing),
                              rows = the (position, member) pairs of PMixED.draw_block
    (c') ours, evaluation path: what pmixed.eval.block_stats.block_stats does after the forwards
                              (row_totals(public), member_stats over all N members in chunks
                              of 4 [4, P, V] with needed = the draw mask) + released_target_probs.
                              The [4, P, V] chunk is ONE synthetic template reused for every chunk
                              (the data do not change the cost; 80 x 512 x V would not fit)
    (d) naive, one block:     P separate naive_release calls (timed on a subset of positions and
                              scaled linearly when --naive-positions < P; the output says so)
    (e) floors:               one read of the inputs (members [m, V] + public [V], summed in their
                              own dtype), the same over the block's rows + public, and the
                              public-only release (m = 0). naive / floor is the largest speedup
                              ANY implementation that reads its inputs once could show; where it
                              is below a target, the target cannot be met on this machine.

The naive side is the ORIGINAL code's style (scipy bisect for beta per query and for lam per drawn
member, float64 casts inside every divergence, .item() per step; see naive_reference.py), at
alpha = 3 with the original's RDP budget (eps=8, delta=1e-5) over T=1024 queries.
Default --threads 1: with 2 shared cores and another process busy, 2 intra-op threads make every
small op wait on a descheduled OpenMP worker (measured 48 ms instead of 0.07 ms per divergence).

    python benchmarks/mechanism.py --device cpu --vocab 50257 --members 80 --rate 0.03 --positions 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:  # the installed package (or PYTHONPATH) first; the checkout's src/ otherwise
    import pmixed  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_reference import ALPHA, naive_block, naive_release, rdp_budget  # noqa: E402
from pmixed.mechanism.pairs import row_totals  # noqa: E402
from pmixed.mechanism.pmixed import PMixED  # noqa: E402
from pmixed.mechanism.teacher_forcing import BlockStats, member_stats, released_target_probs  # noqa: E402

PUBLISHED_MS_PER_TOKEN = 44.0  # REFERENCE.md section 4 item 6: original code, N=80, q=0.03, V=50257

TARGET_TOKEN = 20.0
TARGET_BLOCK = 50.0


# ----------------------------------------------------------------------------- synthetic data


def _softmax32(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def _is_far(regime: str, member: torch.Tensor) -> torch.Tensor:
    """bool per member index: far in 'far', odd members in 'mixed', none in 'near'."""
    if regime == "near":
        return torch.zeros_like(member, dtype=torch.bool)
    if regime == "far":
        return torch.ones_like(member, dtype=torch.bool)
    if regime == "mixed":
        return member % 2 == 1
    raise ValueError(regime)


def _member_logits(pub_logits, member, regime, gen, noise, far_std):
    """Logits [r, V] of members ``member`` [r] at public logits ``pub_logits`` [r, V]."""
    near = pub_logits + noise * torch.randn(pub_logits.shape, generator=gen)
    far = torch.randn(pub_logits.shape, generator=gen) * far_std
    return torch.where(_is_far(regime, member)[:, None], far, near)


def make_query(
    vocab: int,
    members: int,
    regime: str,
    gen: torch.Generator,
    *,
    noise: float = 0.3,
    far_std: float = 2.5,
    pub_std: float = 2.5,
):
    """public [V] and all N members [N, V], float32 probabilities (CPU)."""
    pub_logits = torch.randn(vocab, generator=gen) * pub_std
    mem = torch.arange(members)
    mem_logits = _member_logits(pub_logits.expand(members, -1), mem, regime, gen, noise, far_std)
    return _softmax32(pub_logits), _softmax32(mem_logits)


def make_block(
    mech: PMixED,
    vocab: int,
    positions: int,
    regime: str,
    gen: torch.Generator,
    *,
    noise: float = 0.3,
    far_std: float = 2.5,
    pub_std: float = 2.5,
    chunk: int = 0,
):
    """A teacher-forced block: public [P, V], the drawn rows [R, V] (float32 probabilities),
    row_position [R], row_member [R], targets [P], and extras {mask [P, N], template}.
    Only drawn (position, member) pairs are materialised for (c); ``template`` (if chunk > 0) is
    ONE [chunk, P, V] float32 chunk of full member rows (members 0..chunk-1), reused for every
    chunk of the evaluation path (c')."""
    mask = mech.draw_block(positions, gen)  # bool [P, N]
    pos_mem = torch.nonzero(mask)  # [R, 2], sorted by position
    row_position, row_member = pos_mem[:, 0].contiguous(), pos_mem[:, 1].contiguous()
    pub_logits = torch.randn(positions, vocab, generator=gen) * pub_std
    public = _softmax32(pub_logits)
    R = row_position.shape[0]
    rows = torch.empty(R, vocab)
    for s in range(0, R, 256):  # bounded temporaries
        e = min(R, s + 256)
        lg = _member_logits(
            pub_logits[row_position[s:e]], row_member[s:e], regime, gen, noise, far_std
        )
        rows[s:e] = _softmax32(lg)
    targets = torch.randint(0, vocab, (positions,), generator=gen)
    template = None
    if chunk:
        template = torch.empty(chunk, positions, vocab)
        for j in range(chunk):
            lg = _member_logits(
                pub_logits, torch.full((positions,), j), regime, gen, noise, far_std
            )
            template[j] = _softmax32(lg)
    return public, rows, row_position, row_member, targets, {"mask": mask, "template": template}


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median wall time (s) of each fn; all fns run once per round, in rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            samples[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in samples.items()}


# ----------------------------------------------------------------------------- one regime


def eval_path(mech: PMixED, public: torch.Tensor, template: torch.Tensor, targets, mask):
    """(c'): block_stats' mechanism part + released_target_probs, every chunk = ``template``."""
    K = mech.params.max_order
    P, N = mask.shape
    c = template.shape[0]
    tot = row_totals(public, "public")  # [P] float64, as block_stats does (public stays float32)
    pub_t = public.gather(1, targets[:, None]).squeeze(1).double() / tot
    moments = torch.empty(P, N, K - 1, dtype=torch.float64)
    member_target = torch.empty(P, N, dtype=torch.float64)
    for s in range(0, N, c):
        e = min(N, s + c)
        mom, mt = member_stats(public, template[: e - s], targets, K, mask[:, s:e], tot)
        moments[:, s:e] = mom
        member_target[:, s:e] = mt
    return released_target_probs(BlockStats(moments, member_target, pub_t), mask, mech.params)


def run_regime(args, regime: str, device: torch.device, mech: PMixED, nv: dict) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    public, members = make_query(args.vocab, args.members, regime, gen)
    public, members = public.to(device), members.to(device)

    # fixed m (the headline per-token comparison): the first m members (mixed: near, far, near)
    fixed = members[: args.m]
    # a sequence of Poisson draws, the same for both sides
    draws = [mech.draw(gen) for _ in range(args.draws)]
    draw_sizes = [int(d.numel()) for d in draws]
    drawn = [members[d.to(device)] for d in draws]
    empty = members[:0]

    def ours_poisson():
        for mset in drawn:
            mech.release(public, mset)

    def naive_poisson():
        for mset in drawn:
            naive_release(public, mset, **nv)

    token = time_interleaved(
        {
            "ours_token": lambda: mech.release(public, fixed),
            "naive_token": lambda: naive_release(public, fixed, **nv),
            "ours_poisson": ours_poisson,
            "naive_poisson": naive_poisson,
            "floor_pass": lambda: (fixed.sum(), public.sum()),
            "ours_public_only": lambda: mech.release(public, empty),
        },
        args.repeats,
        args.warmup,
        device,
    )
    token["ours_poisson"] /= len(drawn)
    token["naive_poisson"] /= len(drawn)

    # block
    bpub, rows, row_position, _row_member, targets, extra = make_block(
        mech,
        args.vocab,
        args.positions,
        regime,
        gen,
        chunk=args.eval_chunk if args.eval_path else 0,
    )
    bpub, rows, row_position, targets = (t.to(device) for t in (bpub, rows, row_position, targets))
    mask, template = extra["mask"], extra["template"]
    n_naive = min(args.naive_positions, args.positions)
    sub = range(n_naive)
    scale = args.positions / n_naive
    fns = {
        "ours_block": lambda: mech.release_rows(bpub, rows, row_position, targets=targets),
        "naive_block_subset": lambda: naive_block(
            bpub, rows, row_position, **nv, targets=targets, positions=sub
        ),
        "floor_block_pass": lambda: (rows.sum(), bpub.sum()),
    }
    if template is not None:
        fns["ours_eval_path"] = lambda: eval_path(mech, bpub, template, targets, mask)
    block = time_interleaved(fns, max(1, args.block_repeats), 1, device)
    block["naive_block"] = block["naive_block_subset"] * scale

    # correctness cross-check (not timed): both are distributions; our block equals per-token release
    ours_d = mech.release(public, fixed)
    naive_d = naive_release(public, fixed, **nv)
    released, lam = mech.release_rows(bpub, rows, row_position, targets=targets)
    check_p = min(4, args.positions)
    per_tok = torch.stack(
        [mech.release(bpub[p], rows[row_position == p])[targets[p]] for p in range(check_p)]
    )

    R = int(rows.shape[0])
    ms = {
        "ours_token": token["ours_token"] * 1e3,
        "naive_token": token["naive_token"] * 1e3,
        "ours_token_poisson": token["ours_poisson"] * 1e3,
        "naive_token_poisson": token["naive_poisson"] * 1e3,
        "floor_pass_mV": token["floor_pass"] * 1e3,
        "ours_public_only": token["ours_public_only"] * 1e3,
        "ours_block": block["ours_block"] * 1e3,
        "ours_block_per_token": block["ours_block"] * 1e3 / args.positions,
        "naive_block": block["naive_block"] * 1e3,
        "naive_block_per_token": block["naive_block"] * 1e3 / args.positions,
        "floor_block_pass": block["floor_block_pass"] * 1e3,
    }
    res = {
        "regime": regime,
        "m_fixed": args.m,
        "poisson_draws": len(drawn),
        "poisson_mean_m": sum(draw_sizes) / len(draw_sizes),
        "block_rows": R,
        "naive_positions_timed": n_naive,
        "naive_block_scaled": n_naive < args.positions,
        "ms": ms,
        "speedup_token": token["naive_token"] / token["ours_token"],
        "speedup_token_poisson": token["naive_poisson"] / token["ours_poisson"],
        "speedup_block": block["naive_block"] / block["ours_block"],
        "ours_over_floor_token": token["ours_token"] / token["floor_pass"],
        "ours_over_floor_block": block["ours_block"] / block["floor_block_pass"],
        "ceiling_token": token["naive_token"] / token["floor_pass"],
        "ceiling_block": block["naive_block"] / block["floor_block_pass"],
        "checks": {
            "ours_sum": float(ours_d.sum()),
            "naive_sum": float(naive_d.sum()),
            "block_matches_per_token": bool(
                torch.allclose(released[:check_p], per_tok, rtol=1e-12, atol=0.0)
            ),
            "block_lam_mean": float(lam.mean()) if lam.numel() else None,
        },
    }
    if "ours_eval_path" in block:
        ms["ours_eval_path"] = block["ours_eval_path"] * 1e3
        ms["ours_eval_path_per_token"] = block["ours_eval_path"] * 1e3 / args.positions
        res["speedup_block_eval_path"] = block["naive_block"] / block["ours_eval_path"]
        probs, _ = eval_path(mech, bpub, template, targets, mask)
        res["checks"]["eval_path_probs_in_0_1"] = bool(((probs >= 0) & (probs <= 1)).all())
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--members", type=int, default=80, help="ensemble size N")
    ap.add_argument("--rate", type=float, default=0.03, help="Poisson sample rate q")
    ap.add_argument("--positions", type=int, default=512, help="teacher-forced block length P")
    ap.add_argument(
        "--m",
        type=int,
        default=3,
        help="fixed number of drawn members for the per-token comparison",
    )
    ap.add_argument("--draws", type=int, default=16, help="seeded Poisson draws averaged per token")
    ap.add_argument(
        "--naive-positions",
        type=int,
        default=64,
        help="positions of the naive block actually timed (scaled to P)",
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block-repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch default)"
    )
    ap.add_argument("--regimes", default="near,far,mixed")
    ap.add_argument(
        "--no-eval-path", dest="eval_path", action="store_false",
        help="skip (c'), the member_stats + released_target_probs evaluation path",
    )  # fmt: skip
    ap.add_argument(
        "--eval-chunk", type=int, default=4, help="members per chunk in (c') (engine: 4)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    mech = PMixED(
        epsilon=8.0,
        delta=1e-5,
        query_budget=1024,
        ensemble_size=args.members,
        sample_rate=args.rate,
    )
    if args.eval_path and device.type != "cpu":
        args.eval_path = False  # member_stats allocates its outputs on the CPU
    nv = {"alpha": ALPHA, "q": args.rate, "eps": rdp_budget(8.0, 1e-5, ALPHA), "T": 1024}

    results = [
        run_regime(args, r.strip(), device, mech, nv) for r in args.regimes.split(",") if r.strip()
    ]

    print(
        f"# mechanism release: V={args.vocab} N={args.members} q={args.rate} P={args.positions} m={args.m} "
        f"device={args.device} threads={torch.get_num_threads()} ours_order_K={mech.params.max_order} "
        f"naive_alpha={ALPHA} (scipy bisect, maxiter=20)"
    )
    hdr = f"{'regime':6} {'what':40} {'ms':>12} {'ms/token':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        ms = r["ms"]
        rows = [
            (f"(a) ours release, m={r['m_fixed']}", ms["ours_token"], ms["ours_token"]),
            (f"(b) naive release, m={r['m_fixed']}", ms["naive_token"], ms["naive_token"]),
            (
                f"(a') ours, Poisson m (mean {r['poisson_mean_m']:.2f})",
                ms["ours_token_poisson"],
                ms["ours_token_poisson"],
            ),
            ("(b') naive, Poisson m", ms["naive_token_poisson"], ms["naive_token_poisson"]),
            (
                f"(c) ours release_rows, R={r['block_rows']}",
                ms["ours_block"],
                ms["ours_block_per_token"],
            ),
        ]
        if "ours_eval_path" in ms:
            rows.append(
                (
                    "(c') ours member_stats+released_target",
                    ms["ours_eval_path"],
                    ms["ours_eval_path_per_token"],
                )
            )
        rows += [
            (
                f"(d) naive x{args.positions}"
                + (
                    f" (scaled from {r['naive_positions_timed']})"
                    if r["naive_block_scaled"]
                    else ""
                ),
                ms["naive_block"],
                ms["naive_block_per_token"],
            ),
            ("(e) floor: one read of [m,V] + [V]", ms["floor_pass_mV"], ms["floor_pass_mV"]),
            (
                "(e) floor: one read of the block",
                ms["floor_block_pass"],
                ms["floor_block_pass"] / args.positions,
            ),
            ("(e) ours public-only (m=0)", ms["ours_public_only"], ms["ours_public_only"]),
        ]
        for what, t, per in rows:
            print(f"{r['regime']:6} {what:40} {t:12.3f} {per:10.4f}")
        ok_t = "ok" if r["speedup_token"] >= TARGET_TOKEN else "MISS"
        ok_b = "ok" if r["speedup_block"] >= TARGET_BLOCK else "MISS"
        print(
            f"{r['regime']:6} per-token speedup (naive/ours): {r['speedup_token']:.1f}x [{ok_t}, target >= {TARGET_TOKEN:g}x]"
            f"  (Poisson m: {r['speedup_token_poisson']:.1f}x)"
        )
        print(
            f"{r['regime']:6} block speedup ({args.positions} naive calls / one block call): {r['speedup_block']:.1f}x "
            f"[{ok_b}, target >= {TARGET_BLOCK:g}x] (release_rows with targets)"
        )
        if "speedup_block_eval_path" in r:
            print(
                f"{r['regime']:6} block speedup, evaluation path (member_stats over all N + released_target_probs): "
                f"{r['speedup_block_eval_path']:.1f}x (for information: it also reads every member's [P, V] for the"
                " non-private ensemble average, which the naive side does not compute)"
            )
        print(
            f"{r['regime']:6} ours / floor: token {r['ours_over_floor_token']:.1f}x, block {r['ours_over_floor_block']:.1f}x;"
            f" ceiling (naive / floor): token {r['ceiling_token']:.1f}x, block {r['ceiling_block']:.1f}x;"
            f" checks {r['checks']}"
        )
        print(
            f"{r['regime']:6} per-token ms: ours (Poisson m) {ms['ours_token_poisson']:.3f}, naive (Poisson m) "
            f"{ms['naive_token_poisson']:.3f} measured here; original code ~{PUBLISHED_MS_PER_TOKEN:g} ms "
            "= PUBLISHED figure (REFERENCE.md s.4 item 6; N=80, q=0.03, V=50257), NOT measured here"
        )
    out = {
        "benchmark": "mechanism",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "vocab": args.vocab,
        "members": args.members,
        "rate": args.rate,
        "positions": args.positions,
        "published_ms_per_token_original": PUBLISHED_MS_PER_TOKEN,
        "results": results,
    }
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
