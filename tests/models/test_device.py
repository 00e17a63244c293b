"""``[run] device``: resolution against what the machine has, and a clear error before any work."""

from __future__ import annotations

import pytest
import torch

from pmixed.config import RunSection
from pmixed.errors import ConfigError
from pmixed.models.device import module_device, resolve_device


def _fake_cuda(monkeypatch, count: int) -> None:
    """Pretend this machine has ``count`` GPUs (torch.device objects never touch the driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_asking_for_a_gpu_that_is_not_there_is_a_config_error(monkeypatch, spec):
    _fake_cuda(monkeypatch, 0)
    with pytest.raises(ConfigError, match=r"run\.device.*CUDA is not available"):
        resolve_device(spec)


def test_auto_and_cuda_pick_the_ranks_gpu(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun: 4 ranks on 2 GPUs share them round robin
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "", "tpu"])
def test_config_refuses_unknown_devices(bad):
    with pytest.raises(ConfigError, match=r"run\.device"):
        RunSection(device=bad)


def test_config_default_and_accepted():
    assert RunSection().device == "auto"
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert RunSection(device=ok).device == ok


def test_module_device():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    assert module_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
