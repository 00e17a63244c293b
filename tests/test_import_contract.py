"""Layers stay one-way: the privacy math loads no torch; the mechanism loads no model framework."""

import subprocess
import sys


def _loaded_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_privacy_is_torch_free():
    mods = _loaded_after(
        "import pmixed, pmixed.privacy.calibration, pmixed.privacy.mixture_bound, "
        "pmixed.privacy.conversion, pmixed.privacy.params, pmixed.privacy.original_rules"
    )
    assert "torch" not in mods and "transformers" not in mods and "numpy" not in mods


def test_mechanism_is_model_framework_free():
    mods = _loaded_after("import pmixed.mechanism.pmixed")
    assert "torch" in mods
    assert not {"transformers", "peft", "opacus"} & mods


def test_cli_help_is_light():
    mods = _loaded_after("import pmixed.cli")
    assert "torch" not in mods and "transformers" not in mods
