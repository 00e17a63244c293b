"""Stacked multi-LoRA forward: N LoRA members on ONE copy of the base weights.

PMixED needs, for the same context, the next-token distribution of the public model (the base
without adapters) and of a few ensemble members (base + one LoRA adapter each). Running one
forward per member (``PeftModel.set_adapter`` in a loop, as the reference code does) costs a
full base forward per member; PEFT's mixed batches (``adapter_names=``) loop over the distinct
adapters inside every layer. Here every targeted linear layer is wrapped by
:class:`StackedLoRALinear`, which holds

- the original base layer (the same module object: its weights are neither copied nor merged),
- ``A: [N, r, in]``, ``B: [N, out, r]``, ``scaling: [N]`` for all N members (unmerged),

and computes, for a batch whose rows are each assigned a member index (or ``-1`` for the public
model), ``y = base(x)`` for every row plus ``scaling[m] * x @ A[m].T @ B[m].T`` for the rows with a
member ``m``, with two batched matmuls over the gathered ``A``/``B``. Rows with ``-1`` get the
base output and no delta at all.

A row keeps its adapter for as long as the caller keeps passing the same ``adapter_ids``, so an
HF KV cache (``past_key_values``, ``use_cache=True``) built for a batch stays valid: each row's
cache holds the keys/values of its own member (per-member KV caches). When rows are dropped or
reordered in the cache (``DynamicCache.batch_select_indices``), ``adapter_ids`` must be selected
the same way.

Usage::

    stacked = StackedLoRA.from_peft_dirs(base_model, ["ens/member_000", "ens/member_001", ...])
    ids = torch.tensor([-1, 0, 17, 42])            # row 0 public, rows 1..3 members 0, 17, 42
    out = stacked(input_ids, ids, past_key_values=cache, use_cache=True)
    with stacked.rows(ids):                        # or: any call of the patched model
        out = base_model.generate(...)
    lp = log_probs(stacked, input_ids, ids)        # pmixed.models.lm: [B, T, V] float32 log-softmax

Inference only: LoRA dropout is never applied and the model is put in eval mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pmixed.errors import EnsembleMismatch
from pmixed.models.hf_compat import cache_kwarg_name, output_cache
from pmixed.models.peft_io import (
    check_config,
    config_dict,
    module_rank_scaling,
    read_adapter_dir,
    split_state_dict,
)

__all__ = [
    "PUBLIC",
    "StackedLoRA",
    "StackedLoRALinear",
    "output_cache",  # re-exported from pmixed.models.hf_compat for older imports
]

#: The adapter id of the public (base-only) model in ``adapter_ids``.
PUBLIC = -1


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is optional for this module
        return None
    return Conv1D


def _layer_in_out(layer: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a supported base layer, None if unsupported."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):  # GPT-2: weight [in, out], fan_in_fan_out
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    return None


class _Selection:
    """The current row -> member assignment, shared by all wrapped layers of one StackedLoRA.

    Computed once per forward (one host sync for ``nonzero`` at most), not once per layer.
    """

    __slots__ = ("batch", "rows", "members", "all_rows")

    def __init__(self, ids_cpu: torch.Tensor, device: torch.device):
        # Selection is computed on the host from a CPU copy of the ids (no device sync per
        # layer, none at all when the caller passes CPU ids), then moved to the adapters' device.
        self.batch = int(ids_cpu.shape[0])
        mask = ids_cpu >= 0
        n_sel = int(mask.sum())
        self.all_rows = n_sel == self.batch
        if self.all_rows:
            self.rows = None  # every row has a member: no gather/scatter over rows
            self.members = ids_cpu.to(device, non_blocking=True)  # [B]
        elif n_sel == 0:
            self.rows = None
            self.members = None  # public only: the base output, untouched
        else:
            rows = mask.nonzero().squeeze(1)  # [b]
            self.rows = rows.to(device, non_blocking=True)
            self.members = ids_cpu.index_select(0, rows).to(device, non_blocking=True)  # [b]


class StackedLoRALinear(nn.Module):
    """A base linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) plus N stacked LoRA members.

    Buffers (non-persistent, so the base model's ``state_dict`` keys are unchanged apart from the
    ``base_layer.`` prefix): ``lora_A [N, r, in]``, ``lora_B [N, out, r]``, ``scaling [N]``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: torch.Tensor,
        owner: StackedLoRA | None = None,
    ):
        super().__init__()
        io = _layer_in_out(base_layer)
        if io is None:
            raise TypeError(f"unsupported base layer type {type(base_layer).__name__}")
        n, r, fan_in = lora_A.shape
        if io != (fan_in, lora_B.shape[1]) or lora_B.shape != (n, lora_B.shape[1], r):
            raise ValueError(f"A {tuple(lora_A.shape)} / B {tuple(lora_B.shape)} do not fit {io}")
        self.base_layer = base_layer
        self.in_features, self.out_features = io
        self.num_members, self.rank = int(n), int(r)
        self.register_buffer("lora_A", lora_A, persistent=False)  # [N, r, in]
        self.register_buffer("lora_B", lora_B, persistent=False)  # [N, out, r]
        self.register_buffer("scaling", scaling, persistent=False)  # [N]
        # A plain attribute (not a submodule): avoids a reference cycle in the module tree.
        object.__setattr__(self, "_owner", owner)

    def extra_repr(self) -> str:
        return f"members={self.num_members}, r={self.rank}, in={self.in_features}, out={self.out_features}"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # [B, T, out]: the base output for every row, public and members
        result = self.base_layer(x, *args, **kwargs)
        owner = self._owner
        sel = owner._current_selection() if owner is not None else None
        if sel is None or sel.members is None:
            return result  # public-only batch: exactly the base output
        if x.shape[0] != sel.batch:
            raise ValueError(
                f"batch has {x.shape[0]} rows but adapter_ids has {sel.batch} entries "
                "(beam search / row expansion must expand adapter_ids too)"
            )
        lead = x.shape[1:-1]
        xs = x if sel.rows is None else x.index_select(0, sel.rows)  # [b, T, in]
        xs = xs.reshape(xs.shape[0], -1, self.in_features).to(self.lora_A.dtype)  # [b, T, in]
        a = self.lora_A.index_select(0, sel.members)  # [b, r, in]
        b = self.lora_B.index_select(0, sel.members)  # [b, out, r]
        s = self.scaling.index_select(0, sel.members)  # [b]
        h = torch.bmm(xs, a.transpose(1, 2))  # [b, T, r]
        h = h * s.view(-1, 1, 1)  # scale in the rank-r space (cheapest place)
        delta = torch.bmm(h, b.transpose(1, 2))  # [b, T, out]
        delta = delta.reshape(delta.shape[0], *lead, self.out_features).to(result.dtype)
        if sel.rows is None:
            return result + delta
        return result.index_add(0, sel.rows, delta)  # only member rows change


class StackedLoRA(nn.Module):
    """A base model patched in place with N stacked LoRA members (member ``i`` = ``adapter_dirs[i]``).

    ``stacked.model`` is the base model itself (one copy of its weights). Members are keyed by
    their position ``0..N-1`` in the list they were loaded from; ``names[i]`` is the folder name
    (or the given name) and :meth:`member_index` maps a name back to its index. ``-1``
    (:data:`PUBLIC`) selects the public model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names: list[str] = []
        self.sources: list[str] = []
        self.target_modules: list[str] = []
        # The row -> member selection of the forward running in *this* context (thread, task).
        # Context-local, never object-wide: concurrent forwards on one StackedLoRA (a threaded
        # server) must not see each other's selection, or the public row p_0 could get a
        # member's delta. A new thread starts with no selection (= every row public).
        self._selection_var: contextvars.ContextVar[_Selection | None] = contextvars.ContextVar(
            f"pmixed_stacked_lora_selection_{id(self):x}", default=None
        )
        self._originals: dict[str, nn.Module] = {}
        self._layers: dict[str, StackedLoRALinear] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_peft_dirs(
        cls,
        base_model: nn.Module,
        adapter_dirs: Sequence[str | os.PathLike[str]],
        *,
        names: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> StackedLoRA:
        """Load N folders written by ``PeftModel.save_pretrained`` and patch ``base_model`` in place.

        All members must target the same modules with the same rank (per module); otherwise, or
        when a folder is missing/corrupt/unsupported, :class:`EnsembleMismatch` names the folder.
        ``dtype``: storage/compute dtype of A and B (default: the base layer's weight dtype).
        Adapters are read one at a time into preallocated stacks (peak: stacks + one adapter).
        """
        dirs = [Path(d) for d in adapter_dirs]
        if names is None:  # folder names, or the full paths when folder names collide
            names = [d.name for d in dirs]
            if len(set(names)) != len(names):
                names = [str(d) for d in dirs]
        return cls._build(
            base_model,
            ((str(d), lambda d=d: read_adapter_dir(d)) for d in dirs),
            n=len(dirs),
            names=list(names),
            dtype=dtype,
        )

    @classmethod
    def from_state_dicts(
        cls,
        base_model: nn.Module,
        state_dicts: Sequence[Mapping[str, torch.Tensor]],
        configs: Sequence[Any],
        *,
        names: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> StackedLoRA:
        """Same as :meth:`from_peft_dirs` from in-memory adapters.

        ``state_dicts[i]``: PEFT adapter state dict (e.g. ``get_peft_model_state_dict``, or the
        contents of ``adapter_model.safetensors``); ``configs[i]``: a ``LoraConfig`` or its dict.
        """
        if len(state_dicts) != len(configs):
            raise ValueError("state_dicts and configs must have the same length")
        n = len(state_dicts)
        if names is None:
            names = [f"member_{i}" for i in range(n)]
        items = (
            (str(nm), lambda sd=sd, c=c: (config_dict(c), dict(sd)))
            for nm, sd, c in zip(names, state_dicts, configs, strict=True)
        )
        return cls._build(base_model, items, n=n, names=list(names), dtype=dtype)

    @classmethod
    def _build(cls, base_model, items, *, n: int, names: list[str], dtype) -> StackedLoRA:
        if n < 1:
            raise EnsembleMismatch("no LoRA adapters given")
        if len(names) != n or len(set(names)) != n:
            raise EnsembleMismatch(f"need {n} distinct member names, got {names!r}")
        if any(isinstance(m, StackedLoRALinear) for m in base_model.modules()):
            raise ValueError("base_model is already patched by a StackedLoRA; unpatch() it first")
        self = cls(base_model)
        self.names = names
        stacks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        layers: dict[str, nn.Module] = {}
        for i, (source, load) in enumerate(items):
            cfg, sd = load()
            try:
                check_config(cfg)
                mods = split_state_dict(sd)
                if i == 0:
                    for name in sorted(mods):
                        try:
                            layer = base_model.get_submodule(name)
                        except AttributeError as exc:
                            raise ValueError(
                                f"targets {name!r}, which the base model lacks"
                            ) from exc
                        io = _layer_in_out(layer)
                        if io is None:
                            raise ValueError(
                                f"targets {name!r} of type {type(layer).__name__}; only nn.Linear "
                                "and GPT-2 Conv1D layers are supported"
                            )
                        layers[name] = layer
                        r = int(mods[name]["A"].shape[0])
                        w = layer.weight
                        dt = dtype or (w.dtype if w.is_floating_point() else torch.float32)
                        stacks[name] = (
                            torch.empty(n, r, io[0], dtype=dt, device=w.device),  # A [N, r, in]
                            torch.empty(n, io[1], r, dtype=dt, device=w.device),  # B [N, out, r]
                            torch.empty(n, dtype=dt, device=w.device),  # scaling [N]
                        )
                    self.target_modules = sorted(mods)
                elif set(mods) != set(stacks):
                    extra, missing = (
                        sorted(set(mods) - set(stacks)),
                        sorted(set(stacks) - set(mods)),
                    )
                    raise ValueError(
                        f"target modules differ from member 0 ({self.sources[0]!r}): "
                        f"extra {extra[:3]}, missing {missing[:3]}"
                    )
                for name, (a_st, b_st, s_st) in stacks.items():
                    a, b = mods[name]["A"], mods[name]["B"]
                    if tuple(a.shape) != tuple(a_st.shape[1:]) or tuple(b.shape) != tuple(
                        b_st.shape[1:]
                    ):
                        raise ValueError(
                            f"module {name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                            f"not match rank/shape [r, in]={tuple(a_st.shape[1:])}, "
                            f"[out, r]={tuple(b_st.shape[1:])} (of member 0 and the base layer)"
                        )
                    r_cfg, scale = module_rank_scaling(cfg, name)
                    if r_cfg != a.shape[0]:
                        raise ValueError(
                            f"module {name!r}: config rank {r_cfg} != tensor rank {a.shape[0]}"
                        )
                    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                        raise ValueError(f"module {name!r}: non-finite LoRA weights")
                    a_st[i].copy_(a)
                    b_st[i].copy_(b)
                    s_st[i] = scale
            except EnsembleMismatch:
                raise
            except Exception as exc:
                raise EnsembleMismatch(f"LoRA adapter {source!r} (member {i}): {exc}") from exc
            self.sources.append(source)
            del sd
        self._patch(layers, stacks)
        base_model.eval()
        return self

    def _patch(self, layers: dict[str, nn.Module], stacks) -> None:
        for name, layer in layers.items():
            a, b, s = stacks[name]
            wrapper = StackedLoRALinear(layer, a, b, s, owner=self)
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, wrapper)
            self._originals[name] = layer
            self._layers[name] = wrapper

    def unpatch(self) -> nn.Module:
        """Restore the original layers (drops the stacked adapters); returns the base model."""
        for name, layer in self._originals.items():
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, layer)
        self._originals.clear()
        self._layers.clear()
        return self.model

    # ---------------------------------------------------------------- selection

    @property
    def num_members(self) -> int:
        return len(self.names)

    def member_index(self, name: str) -> int:
        """Index of the member called ``name`` (folder name by default)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no member named {name!r}") from None

    def _device(self) -> torch.device:
        for layer in self._layers.values():
            return layer.lora_A.device
        return torch.device("cpu")

    def _check_ids(self, adapter_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """adapter_ids as a validated 1-D CPU LongTensor."""
        ids = torch.as_tensor(adapter_ids, dtype=torch.long).cpu()
        if ids.dim() != 1:
            raise ValueError(f"adapter_ids must be 1-D [B], got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < PUBLIC or int(ids.max()) >= self.num_members):
            raise ValueError(f"adapter_ids must lie in [-1, {self.num_members - 1}]")
        return ids

    def _current_selection(self) -> _Selection | None:
        """The selection set by :meth:`rows` in the current context (None: all rows public)."""
        return self._selection_var.get()

    @contextlib.contextmanager
    def rows(self, adapter_ids: torch.Tensor | Sequence[int]) -> Iterator[None]:
        """Within the block, any forward of the patched model *in the same thread / context*
        uses member ``adapter_ids[b]`` for row ``b`` (``-1``: public). Outside any block, and in
        any other thread, the patched model is the public model."""
        if not self._layers:
            raise RuntimeError("this StackedLoRA was unpatched")
        sel = _Selection(self._check_ids(adapter_ids), self._device())
        token = self._selection_var.set(sel)
        try:
            yield
        finally:
            self._selection_var.reset(token)

    def forward(
        self,
        input_ids: torch.Tensor,
        adapter_ids: torch.Tensor | Sequence[int] | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``self.model(input_ids, cache=past_key_values, **kwargs)`` with row ``b`` on member
        ``adapter_ids[b]`` (``None``: all rows public).

        The KV cache may be passed as ``past_key_values`` or ``cache`` (transformers >= 5.2x
        renamed it to ``cache`` and deprecates the old name); it is handed to the model under the
        name its ``forward`` declares. The returned cache is ``out.cache`` (new) or
        ``out.past_key_values`` (old); :func:`output_cache` reads either.
        """
        if adapter_ids is None:
            adapter_ids = torch.full((input_ids.shape[0],), PUBLIC, dtype=torch.long)
        if "cache" in kwargs:
            if past_key_values is not None:
                raise ValueError("pass the KV cache as either past_key_values or cache, not both")
            past_key_values = kwargs.pop("cache")
        if past_key_values is not None:
            kwargs[cache_kwarg_name(self.model)] = past_key_values
        with self.rows(adapter_ids):
            return self.model(input_ids=input_ids, **kwargs)

    # -------------------------------------------------------------- accounting

    def adapter_bytes(self) -> int:
        """Bytes held by the stacked A/B/scaling tensors of all members."""
        return sum(
            t.numel() * t.element_size()
            for layer in self._layers.values()
            for t in (layer.lora_A, layer.lora_B, layer.scaling)
        )

    def base_bytes(self) -> int:
        """Bytes of the base model's parameters and persistent buffers (one copy)."""
        adapter = {
            t.data_ptr()
            for layer in self._layers.values()
            for t in (layer.lora_A, layer.lora_B, layer.scaling)
        }
        seen: set[int] = set()
        total = 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            ptr = t.data_ptr()
            if ptr in adapter or ptr in seen:
                continue
            seen.add(ptr)
            total += t.numel() * t.element_size()
        return total
