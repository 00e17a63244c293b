"""The ensemble runtime: rows of one base model + N stacked LoRA members, next-token distributions out.

One copy of the base weights serves the public model p_0 (row id ``PUBLIC`` = -1) and every
member (row id i) through :class:`pmixed.models.stacked_lora.StackedLoRA`; extra adapters (the
fine-tuned and DP-SGD baselines) ride on the same stack under their own names.

Two ways in:

- :meth:`EnsembleRuntime.probs`: teacher-forced rows, [B, T] tokens -> [B, T, V] probabilities
  (evaluation; ``pmixed.eval.block_stats`` builds the mechanism's per-pair statistics on it).
- :meth:`EnsembleRuntime.decode`: the decode step of generation and serving, one batched forward
  over groups of rows. Each :class:`RowGroup` names its row ids, the tokens it has not consumed
  yet and its KV cache; the step returns each group's next-token distributions and advances its
  cache. A member that was not drawn for a while catches up on the tokens it missed simply by
  being given them. The caches are :class:`pmixed.models.kv_cache.GrowingLayer`s: a step that
  reuses last step's batch (constant-work serving) appends its position in place.

The row selection of every forward travels with the call (context-local in ``StackedLoRA``), so
one runtime may be used from several threads: the public row is always the base model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from pmixed.models.device import module_device
from pmixed.models.hf_compat import cache_kwarg_name, output_cache
from pmixed.models.kv_cache import growing_cache
from pmixed.models.stacked_lora import PUBLIC, StackedLoRA

__all__ = ["KV", "PUBLIC", "EnsembleRuntime", "RowGroup", "softmax_"]


def softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension in place (no second [..., V] buffer); returns ``x``."""
    x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [b, H, L, D]


@dataclass
class _Batch:
    """The padded batch cache that groups share across steps (``decode(..., persistent=True)``):
    a cache of ``GrowingLayer``s, per layer (keys, values) [B, H, width, D] with ``slots[j]``'s
    rows at the j-th place (in slot order) right-aligned at ``width``. A later step whose groups
    are these, give or take some (``adopt``), reuses it: the new position is appended in place."""

    cache: Any
    slots: list[RowGroup]
    width: int

    def adopt(self, groups: Sequence[RowGroup], waste: int) -> list[RowGroup] | None:
        """Make the batch hold exactly ``groups`` (one pending token each): a group that left is
        detached (its cache copied out) and its rows filled with the last slot's, when that slot
        has as many rows; a group that joins (with a cache no longer than ``width``) goes into
        the spare rows; when every row would keep more than ``waste`` positions of padding
        (the groups that made the batch wide have left), that padding is dropped in place
        (``GrowingLayer.shift_left``: no allocation, whose fresh pages cost more than the copy).
        Returns the groups in slot order, or None (nothing changed) when that cannot be done:
        the caller then rebuilds the batch."""
        want = {id(g) for g in groups}
        mine = {id(g) for g in self.slots if g._batch is self}  # a slot whose group stepped elsewhere is stale
        joining = [g for g in groups if id(g) not in mine]
        if any(g.cache is None or g.seen > self.width for g in joining):
            return None
        shift = self.width - max(g.seen for g in groups)  # padding every row has
        shift = shift if shift > waste else 0
        sizes = [len(g.adapters) for g in self.slots]
        gone = [j for j, g in enumerate(self.slots) if id(g) not in want or id(g) not in mine]
        keep = list(range(len(self.slots)))  # by position, the slot that ends up there
        moves: list[tuple[int, int]] = []  # (to, from) positions: the last slot fills a leaving one's rows
        for j in reversed(gone):  # later slots first: the last one is never a leaving one
            if j != len(keep) - 1:
                if sizes[keep[-1]] != sizes[j]:
                    return None
                moves.append((j, len(keep) - 1))
                keep[j] = keep[-1]
            keep.pop()
        layers = list(self.cache.layers)
        r = sum(sizes[i] for i in keep)
        if r + sum(len(g.adapters) for g in joining) > layers[0].capacity_rows:
            return None
        for j in gone:  # a group that leaves keeps a cache of its own
            g = self.slots[j]
            if g._batch is self:
                g.cache = [(k.clone(), v.clone()) for k, v in g.cache]
                g._batch = None
        starts = list(accumulate(sizes, initial=0))  # a position's first row (sizes match where rows move)
        for to, frm in moves:
            for layer in layers:
                layer.move_rows(starts[to], starts[frm], sizes[to])
        self.slots = [self.slots[i] for i in keep]
        for layer in layers:
            layer.set_rows(r)
            layer.shift_left(shift)
        self.width -= shift
        for g in joining:
            for layer, (k, v) in zip(layers, g.cache):
                layer.put_rows(r, k, v)
            r += len(g.adapters)
            self.slots.append(g)
            g._batch = self
        for layer in layers:
            layer.set_rows(r)
        return list(self.slots)


@dataclass
class RowGroup:
    """Rows that share one token sequence, and so one KV cache of batch ``len(adapters)``.

    adapters: the row ids (``PUBLIC`` or member / extra indices); tokens: the tokens the group
    has not consumed yet (>= 1 for a step; the whole prompt on the first); cache: per layer
    (keys, values) [b, H, seen, D], None before the first step; seen: tokens consumed so far.
    Generation uses one group per row (members catch up on what they missed); serving in
    constant-work mode one group of N + 1 rows per request.
    """

    adapters: list[int]
    tokens: list[int] = field(default_factory=list)
    cache: KV | None = None
    seen: int = 0
    _batch: _Batch | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Drop the cache: the group will not step again. Its rows in a persistent batch become
        free there (``_Batch.adopt`` counts the slot as gone and copies nothing out)."""
        self.cache, self._batch, self.tokens = None, None, []

    def cache_bytes(self) -> int:
        return 0 if self.cache is None else sum(k.numel() * k.element_size() * 2 for k, _ in self.cache)


class EnsembleRuntime:
    """Base model + N stacked members (+ named extra adapters) on one copy of the weights."""

    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        member_dirs: Sequence[str | os.PathLike[str]],
        extra_dirs: dict[str, str | os.PathLike[str]] | None = None,
    ):
        extra_dirs = dict(extra_dirs or {})
        dirs = [Path(d) for d in member_dirs] + [Path(d) for d in extra_dirs.values()]
        self.n_members = len(member_dirs)
        self.extra_index = {name: self.n_members + j for j, name in enumerate(extra_dirs)}
        self.tokenizer = tokenizer
        self.model = base_model
        self.model.eval()
        self.stacked = StackedLoRA.from_peft_dirs(base_model, dirs)
        self.device = module_device(base_model)

    @property
    def dtype(self) -> torch.dtype:
        """The precision the forwards run in (the base's parameters')."""
        return next(self.model.parameters()).dtype

    @property
    def context_length(self) -> int | None:
        """The most tokens one row can hold (positions of the base model), None when unknown."""
        cfg = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    @classmethod
    def from_ensemble(cls, ensemble: Any, extra_dirs: dict[str, Any] | None = None) -> EnsembleRuntime:
        return cls(ensemble.base_model, ensemble.tokenizer, ensemble.adapter_paths, extra_dirs)

    @torch.no_grad()
    def probs(self, input_ids: torch.Tensor, adapter_ids: Sequence[int]) -> torch.Tensor:
        """Next-token probabilities [B, T, V] float32, on the runtime's device, for rows
        ``adapter_ids`` over ``input_ids`` [B, T]."""
        ids = torch.as_tensor(list(adapter_ids), dtype=torch.long)
        out = self.stacked(input_ids.to(self.device), ids, use_cache=False)
        x = out.logits if out.logits.dtype == torch.float32 else out.logits.float()  # [B, T, V]
        del out
        return softmax_(x)

    @torch.no_grad()
    def decode(self, groups: Sequence[RowGroup], *, persistent: bool = False,
               max_rows: int | None = None) -> list[torch.Tensor]:
        """One batched forward over every row of ``groups``: each group consumes its pending
        tokens; returns each group's next-token distributions [b, V] float32 (on the runtime's
        device), and advances each group's ``cache`` / ``seen`` in place (``tokens`` cleared).

        Layout of the batch (B rows, Lmax = the longest cache, n = the most pending tokens):
        caches left-padded to Lmax, pending tokens right-padded to n, an attention mask [B,
        Lmax + n] that hides both paddings, and explicit position ids (seen + j), so each row
        computes exactly what it would alone (tests: tests/models/test_runtime.py). The head
        runs only at each row's last real position when the logits are head(backbone(x)).

        ``persistent=True`` (the same groups step together every time, as in constant-work
        serving): the groups keep views into the step's batch cache instead of copies, and when
        the batch's groups come back (in any order) with one token each, that batch is reused
        without re-padding and appends the new position in place (``GrowingLayer``), so a steady
        step copies nothing but the new keys and values. Groups may leave and join such a batch
        (``_Batch.adopt``: a leaving group's rows are filled with the last slot's, a joining one
        goes into spare rows, about a quarter of the rows, never beyond ``max_rows`` in all):
        that copies the caches of the groups that move, not the whole batch. Other steps copy
        each group's cache into the padded batch once, and (not persistent) out again.
        """
        if not groups:
            return []
        for g in groups:
            if not g.tokens:
                raise ValueError(f"decode group {g.adapters} has no pending tokens")
        dev = self.device
        n = max(len(g.tokens) for g in groups)
        held: dict[int, tuple[int, _Batch]] = {}  # id(batch) -> (rows of ``groups`` it holds, batch)
        for g in groups:
            if g._batch is not None:
                c = held.get(id(g._batch), (0, g._batch))[0]
                held[id(g._batch)] = (c + len(g.adapters), g._batch)
        shared = max(held.values(), key=lambda x: x[0])[1] if held else None  # the one holding most
        order = None
        if persistent and n == 1 and shared is not None:
            order = shared.adopt(groups, waste=max(16, max(g.seen for g in groups) // 2))
        run = order if order is not None else list(groups)  # the groups in row order
        sizes = [len(g.adapters) for g in run]
        B = sum(sizes)
        lmax = shared.width if order is not None else max(g.seen for g in run)
        ids = torch.zeros(B, n, dtype=torch.long)  # [B, n]
        mask = torch.zeros(B, lmax + n, dtype=torch.long)  # [B, Lmax + n]
        pos = torch.zeros(B, n, dtype=torch.long)  # [B, n]
        last = torch.zeros(B, dtype=torch.long)  # [B] each row's last real pending position
        adapters: list[int] = []
        r = 0
        for g, b in zip(run, sizes):
            t = len(g.tokens)
            ids[r : r + b, :t] = torch.tensor(g.tokens, dtype=torch.long)
            mask[r : r + b, lmax - g.seen : lmax + t] = 1
            pos[r : r + b] = (torch.arange(n) + g.seen).clamp(max=g.seen + t - 1)
            last[r : r + b] = t - 1
            adapters += g.adapters
            r += b
        kw: dict[str, Any] = {"attention_mask": mask.to(dev), "position_ids": pos.to(dev), "use_cache": True}
        if order is not None:
            kw["past_key_values"] = shared.cache
        else:
            # persistent: room up to the context on a CPU (reserved, not written: a page is
            # committed when a step first writes a position on it, so no step ever regrows the
            # batch, which copied it whole into fresh pages); on a GPU, whose allocations are
            # memory at once, or without a known context, as many steps again as the cache holds
            # (amortised doubling). And spare rows: a joining group goes there.
            lazy = persistent and dev.type == "cpu"
            least = max(n, lmax) if persistent else n
            room = (self.context_length or least) if lazy else least
            spare = 0
            if persistent and n == 1:  # spare rows are reserved, not written: pages committed on first use
                spare = max(max(sizes), B // 4) if max_rows is None else max(0, max_rows - B)
            kw["past_key_values"] = self._batched_cache(run, sizes, lmax, room, spare, least, reserve=lazy)
        split = self.split_head()
        rows = torch.arange(B, device=dev)
        if split is None:
            out = self.stacked(ids.to(dev), adapters, **kw)
            logits = out.logits[rows, last.to(dev)]  # [B, V]
        else:
            backbone, head = split
            if "past_key_values" in kw:
                kw[cache_kwarg_name(backbone)] = kw.pop("past_key_values")
            with self.stacked.rows(adapters):
                out = backbone(input_ids=ids.to(dev), **kw)
                logits = head(out[0][rows, last.to(dev)])  # [B, V]
        new_cache = output_cache(out)
        layers = [(layer.keys, layer.values) for layer in new_cache.layers]  # [B, H, Lmax + n, D]
        probs = softmax_(logits.float())  # [B, V]
        aligned = persistent and all(len(g.tokens) == n for g in run)  # every group ends at the right edge
        if order is not None:
            shared.width = lmax + n
            batch = shared
        else:
            batch = _Batch(new_cache, list(run), lmax + n) if aligned else None
        result: dict[int, torch.Tensor] = {}
        r = 0
        for g, b in zip(run, sizes):
            t = len(g.tokens)
            sl = slice(lmax - g.seen, lmax + t)  # the group's real entries, contiguous
            if aligned:  # views: the next step of the same groups reuses ``batch`` whole
                g.cache = [(k[r : r + b, :, sl], v[r : r + b, :, sl]) for k, v in layers]
            else:  # copies: a group that sits out steps must not pin the whole batch
                g.cache = [(k[r : r + b, :, sl].clone(), v[r : r + b, :, sl].clone()) for k, v in layers]
            g._batch = batch
            g.seen += t
            g.tokens = []
            result[id(g)] = probs[r : r + b]
            r += b
        return [result[id(g)] for g in groups]

    def _batched_cache(self, groups: Sequence[RowGroup], sizes: list[int], lmax: int, room: int,
                       spare_rows: int = 0, least_room: int | None = None, *, reserve: bool = False) -> Any:
        """The groups' caches, left-padded to ``lmax`` and stacked along the batch, copied once
        into a cache of ``GrowingLayer``s with ``room`` spare positions to append in place (or
        ``least_room`` where the address space is refused: ``GrowingLayer.blank``) and
        ``spare_rows`` spare rows for groups that join a persistent batch. ``reserve``: a first
        step's empty cache reserves every position up to the context at its first append too."""
        limit = self.context_length
        cache = growing_cache(limit=limit, reserve=reserve)
        if lmax == 0:
            return cache
        ref = next(g.cache for g in groups if g.cache is not None)
        B = sum(sizes)
        for li, (k0, v0) in enumerate(ref):
            layer = cache.layer_class_to_replicate()
            cache.layers.append(layer)
            keys, values = layer.blank(k0, v0, B, lmax, room, spare_rows, least_room)  # [B, H, lmax, D] uninitialised
            r = 0
            for g, b in zip(groups, sizes):
                held = 0 if g.cache is None else g.cache[li][0].shape[2]  # None: a first step, all padding
                if held < lmax:  # the left padding: zeros (masked, but read with weight 0)
                    keys[r : r + b, :, : lmax - held].zero_()
                    values[r : r + b, :, : lmax - held].zero_()
                if held:
                    k, v = g.cache[li]
                    keys[r : r + b, :, lmax - held :].copy_(k)
                    values[r : r + b, :, lmax - held :].copy_(v)
                r += b
        return cache

    def split_head(self) -> tuple[Any, Any] | None:
        """(backbone, head) when the logits are exactly head(backbone(x)[0]); None otherwise
        (models with logit soft-capping or scaling use the whole forward)."""
        cfg = getattr(self.model, "config", None)
        if any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")):
            return None
        backbone = getattr(self.model, "base_model", None)
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        if backbone is None or backbone is self.model or head is None:
            return None
        return backbone, head
