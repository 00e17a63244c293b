"""Phase I training: the LoRA ensemble (``ensemble``), the non-private baseline (``finetune``)
and the DP-SGD baseline (``dpsgd``). Import the submodules directly; this package's top level
stays free of torch."""

# Registers the builder of builtin:tiny-gpt2 (pre-training is training: see pmixed.models.builtins).
from pmixed.train import public_pretrain as _public_pretrain  # noqa: F401
