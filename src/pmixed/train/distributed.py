"""torchrun helpers: the process group (gloo) and collectives that make every rank fail together.

Under ``torchrun --nproc_per_node=K`` each rank learns its rank and world size from the
environment; a single process (``WORLD_SIZE`` unset or 1) gets an inactive :class:`Dist` whose
collectives are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Dist", "init_distributed"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    initialised_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_ok(self, ok: bool) -> bool:
        """Collective: True iff every rank reports ok (a failing rank still takes part)."""
        if not self.active:
            return ok
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def run_collectively(self, fn, *, only_rank0: bool = False):
        """Run ``fn`` (on rank 0 only if asked), then make every rank fail if any rank failed."""
        err: BaseException | None = None
        result = None
        if not only_rank0 or self.rank == 0:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below on every rank
                err = e
        if not self.all_ok(err is None):
            if err is not None:
                raise err
            raise RuntimeError("another rank failed; see its log")
        return result

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    from datetime import timedelta

    import torch.distributed as dist

    here = False
    if not dist.is_initialized():
        # CPU training: gloo. Ranks can wait on each other for a long time (unequal parts).
        dist.init_process_group(backend="gloo", timeout=timedelta(days=2))
        here = True
    return Dist(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))),
        initialised_here=here,
    )
