"""Phase I training: the LoRA ensemble (``ensemble``), the non-private baseline (``finetune``)
and the DP-SGD baseline (``dpsgd``). Import the submodules directly; this package's top level
stays free of torch."""
