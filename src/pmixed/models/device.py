"""Which device a run computes on: ``[run] device`` resolved against what this machine has.

``auto`` is the GPU when CUDA is available (under ``torchrun``, the rank's own GPU:
``cuda:<LOCAL_RANK mod device count>``) and the CPU otherwise; ``cpu``, ``cuda`` and ``cuda:<i>``
ask for one explicitly, and asking for a GPU this machine does not have is a configuration error
raised before anything is loaded, not a failure half-way through a run.
"""

from __future__ import annotations

import os

import torch

from pmixed.errors import ConfigError

__all__ = ["resolve_device", "module_device"]


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def resolve_device(spec: str = "auto") -> torch.device:
    """``[run] device`` -> a torch.device this machine has (ConfigError naming ``run.device`` if not)."""
    if spec == "cpu":
        return torch.device("cpu")
    cuda = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", _local_rank() % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not cuda:
            raise ConfigError("run.device", f"{spec!r} asked for, but CUDA is not available on this "
                                            "machine (torch.cuda.is_available() is False); use 'auto' or 'cpu'")
        index = int(spec.split(":", 1)[1]) if ":" in spec else _local_rank() % torch.cuda.device_count()
        if index >= torch.cuda.device_count():
            raise ConfigError("run.device", f"{spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise ConfigError("run.device", f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<i>'")


def module_device(module) -> torch.device:
    """The device of a module's (first) parameter; the CPU for a module without parameters."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
