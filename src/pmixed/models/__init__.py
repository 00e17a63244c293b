"""Base causal LMs: loading (builtins, local folders, hub names), fingerprints, tiny GPT-2.

Import the submodules directly (``pmixed.models.loading``, ``pmixed.models.tiny_gpt2``,
``pmixed.models.lm``); this package's top level stays free of torch.
"""
