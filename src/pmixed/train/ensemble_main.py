"""Entry point for distributed ensemble training.

    python -m torch.distributed.run --nproc_per_node=2 --standalone \
        -m pmixed.train.ensemble_main --config configs/quick.toml

Each rank trains the members ``i`` with ``i % world_size == rank``; rank 0 writes the manifest.
Also works as a plain single process (``python -m pmixed.train.ensemble_main --config ...``).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pmixed.train.ensemble_main")
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--output-dir", "-o", default=None)
    parser.add_argument("--quiet", "-q", action="store_true")
    args = parser.parse_args(argv)

    from pmixed.config import load_config
    from pmixed.errors import PMixEDError
    from pmixed.train.ensemble import train_ensemble

    try:
        cfg = load_config(args.config)
        if args.output_dir:
            cfg = cfg.replace(run__output_dir=args.output_dir)
        res = train_ensemble(cfg, progress=not args.quiet)
    except PMixEDError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"trained {res.trained} skipped {res.skipped} in {res.seconds:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
