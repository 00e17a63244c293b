"""A KV cache layer that appends in place: keys and values live in a buffer with spare positions,
and a decode step writes its new positions into the spare ones instead of copying the whole cache.

transformers' ``DynamicLayer`` appends by ``torch.cat`` of the whole cache with the new positions,
so every decode step copies every cached key and value of the batch: O(L) per step and O(L^2)
over a generation, and on a CPU under load that copy was most of a step (62% of the tiny model's
step at 8 streams of 33 rows, measured with the torch profiler). ``GrowingLayer`` keeps a buffer
[B, H, capacity, D]; ``keys`` / ``values`` are views of its first ``length`` positions; when an
append does not fit, the buffer is reallocated at twice the size (amortised O(1) copies per
position), never beyond ``limit`` positions (the model's context, so the memory bound of a
request's caches is unchanged) unless the append itself needs more. The buffer may also hold
spare rows [rows, capacity_rows): a persistent batch (constant-work serving) takes a joining
request into them and fills a leaving one's rows with the last rows (``put_rows`` / ``move_rows``
/ ``set_rows``), so that a change of the batch's membership copies one request's cache instead
of the whole batch, and drops padding that every row has in place (``shift_left``). On a CPU a
persistent batch reserves every position up to the context at once (``blank``, ``reserve``): the
spare positions and rows are address space until a step writes them, so the batch never regrows (a regrowth
copied it whole into fresh pages, whose first touch costs more than the copy, and held both
buffers at once).

Values are identical to ``DynamicLayer``'s (the same positions hold the same tensors; tests:
tests/models/test_kv_cache.py); only where they are stored differs.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["GrowingLayer", "growing_cache"]

class GrowingLayer(DynamicLayer):
    """One layer's keys and values [rows, H, length, D] as views of a buffer [capacity_rows, H,
    capacity, D]."""

    def __init__(self, limit: int | None = None, reserve: bool = False):
        super().__init__()  # transformers 4.56 takes no arguments here, 5.x keyword ones
        self.limit = limit  # the most positions worth reserving (the context), None: no cap
        self.reserve = reserve  # the first allocation takes every position up to ``limit``
        self._k: torch.Tensor | None = None  # [B, H, capacity, D]
        self._v: torch.Tensor | None = None
        self.length = 0
        self.rows = 0  # rows in use (the first ones of the buffer)

    def _start(self, device: torch.device) -> None:
        self.device = device
        self.is_initialized = True  # read by transformers 5.x (crop, reset), unused by 4.56

    def _capacity_for(self, needed: int) -> int:
        """Doubling (at least 16 positions), never beyond ``limit`` unless ``needed`` is."""
        cap = max(needed, 2 * (0 if self._k is None else self._k.shape[2]), 16)
        if self.limit is not None:
            cap = min(cap, self.limit)
        return max(cap, needed)

    @staticmethod
    def _buffers(like_k: torch.Tensor, like_v: torch.Tensor, rows: int, caps: tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised keys / values buffers [rows, H, cap, D] at the first capacity of ``caps``
        whose address space the system grants (a strict-overcommit refusal tries the next)."""
        def alloc(cap: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (like_k.new_empty(rows, like_k.shape[1], cap, like_k.shape[3]),
                    like_v.new_empty(rows, like_v.shape[1], cap, like_v.shape[3]))

        for cap in caps[:-1]:
            try:
                return alloc(cap)
            except RuntimeError as err:
                if "allocate memory" not in str(err):
                    raise
        return alloc(caps[-1])

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        cap = self._capacity_for(needed)
        caps = (max(self.limit, needed), cap) if self.reserve and self._k is None and self.limit else (cap,)
        b = max(key_states.shape[0], 0 if self._k is None else self._k.shape[0])  # spare rows are kept
        k, v = self._buffers(key_states, value_states, b, caps)
        if self._k is not None and self.length:
            k[: self.rows, :, : self.length].copy_(self._k[: self.rows, :, : self.length])
            v[: self.rows, :, : self.length].copy_(self._v[: self.rows, :, : self.length])
        self._k, self._v = k, v

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` / ``value_states`` [B, H, t, D]; return all positions so far."""
        if self._k is None:
            self._start(key_states.device)
            self.rows = key_states.shape[0]
        elif self.rows != key_states.shape[0]:
            raise ValueError(f"cache holds {self.rows} rows, the step has {key_states.shape[0]}")
        t = key_states.shape[2]
        end = self.length + t
        if self._k is None or end > self._k.shape[2]:
            self._grow(key_states, value_states, end)
        self._k[: self.rows, :, self.length : end].copy_(key_states)
        self._v[: self.rows, :, self.length : end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys = self._k[: self.rows, :, : self.length]  # [rows, H, length, D] views
        self.values = self._v[: self.rows, :, : self.length]

    def blank(
        self, like_k: torch.Tensor, like_v: torch.Tensor, rows: int, length: int, room: int,
        spare_rows: int = 0, least_room: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start as ``rows`` rows of ``length`` positions (heads and widths as ``like_k`` /
        ``like_v`` [b, H, L, D]) with ``room`` spare positions (fewer beyond ``limit``) and
        ``spare_rows`` spare rows; return the views [rows, H, length, D] for the caller to fill.
        They are uninitialised: the caller writes every one of the ``length`` positions (zeros
        where a row is padding: a masked position's value still enters attention's product with
        weight 0, and garbage there could be NaN). Spare positions and rows are never read before
        an append or ``put_rows`` writes them, so on a CPU they are address space, not memory,
        until then. Where the system refuses that address space (strict overcommit), the buffer
        is allocated with ``least_room`` spare positions instead (and grows by doubling)."""
        self._start(like_k.device)
        wants = (room,) if least_room is None else (room, least_room)
        caps = tuple(length + w if self.limit is None else max(length, min(length + w, self.limit)) for w in wants)
        self._k, self._v = self._buffers(like_k, like_v, rows + spare_rows, caps)
        self.length, self.rows = length, rows
        self._views()
        return self.keys, self.values

    @property
    def capacity_rows(self) -> int:
        return 0 if self._k is None else self._k.shape[0]

    def put_rows(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a cache k / v [b, H, s, D] (s <= length) into rows [start, start + b) of the
        buffer, right-aligned at ``length``, its left padding zeroed; ``set_rows`` exposes them."""
        b, s = k.shape[0], k.shape[2]
        if start + b > self.capacity_rows or s > self.length:
            raise ValueError(f"{b} rows of {s} positions do not fit at row {start} of "
                             f"{self.capacity_rows} rows x {self.length} positions")
        for buf, x in ((self._k, k), (self._v, v)):
            buf[start : start + b, :, : self.length - s].zero_()
            buf[start : start + b, :, self.length - s : self.length].copy_(x)

    def move_rows(self, dst: int, src: int, count: int) -> None:
        """Copy rows [src, src + count) onto rows [dst, dst + count) (disjoint), every position."""
        if dst + count > src and src + count > dst:
            raise ValueError("overlapping row ranges")
        for buf in (self._k, self._v):
            buf[dst : dst + count, :, : self.length].copy_(buf[src : src + count, :, : self.length])

    def shift_left(self, shift: int) -> None:
        """Drop the first ``shift`` positions of every row in use, moving the rest to the left
        in place (the dropped ones must be padding for every row): positions [shift, length)
        become [0, length - shift). Copied in pieces of ``shift`` positions, left to right, so no
        piece overlaps the one it is copied onto; nothing is allocated."""
        if not 0 <= shift <= self.length:
            raise ValueError(f"cannot drop {shift} of {self.length} positions")
        if shift:
            for buf in (self._k, self._v):
                for a in range(shift, self.length, shift):
                    b = min(a + shift, self.length)
                    buf[: self.rows, :, a - shift : b - shift].copy_(buf[: self.rows, :, a:b])
            self.length -= shift
            self._views()

    def set_rows(self, rows: int) -> None:
        """Use the first ``rows`` rows of the buffer (<= ``capacity_rows``)."""
        if rows > self.capacity_rows:
            raise ValueError(f"{rows} rows, the buffer holds {self.capacity_rows}")
        self.rows = rows
        self._views()

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self._k = self._v = None
        self.keys = self.values = None
        self.length = self.rows = 0
        self.is_initialized = False

    def crop(self, *args: Any, **kwargs: Any) -> None:
        """transformers' crop (its argument's meaning differs between versions), on the views: they
        stay a prefix of the buffer, whose later positions become spare."""
        super().crop(*args, **kwargs)
        self.length = 0 if self.keys is None else self.keys.shape[2]

    def _rebuild(self) -> None:
        keys, values = self.keys, self.values
        self._k = self._v = None
        self.length = self.rows = 0
        self.update(keys, values)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)  # new tensors in keys / values
        if self.length:
            self._rebuild()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.length:
            self._rebuild()


def growing_cache(limit: int | None = None, reserve: bool = False) -> DynamicCache:
    """An empty transformers cache whose layers are ``GrowingLayer``s (``limit``: positions worth
    reserving; ``reserve``: the first allocation takes all of them); the model's first update of
    each layer creates it."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: GrowingLayer(limit, reserve)
    return cache
