"""PMixED: differentially private next-token prediction by private mixing of ensemble distributions.

``import pmixed`` stays light: the torch-backed :class:`PMixED` mechanism is imported on first use,
so that ``pmixed.privacy`` (pure math) never pulls torch in.
"""

from __future__ import annotations

from pmixed.errors import (
    AssetError,
    BudgetExhausted,
    ConfigError,
    DataError,
    EnsembleMismatch,
    LedgerError,
    PMixEDError,
)

__version__ = "0.1.0"

__all__ = [
    "PMixED",
    "AdaptivePMixED",
    "PMixEDError",
    "ConfigError",
    "BudgetExhausted",
    "LedgerError",
    "DataError",
    "EnsembleMismatch",
    "AssetError",
    "__version__",
]


def __getattr__(name: str):
    if name == "PMixED":
        from pmixed.mechanism.pmixed import PMixED

        return PMixED
    if name == "AdaptivePMixED":
        from pmixed.mechanism.adaptive import AdaptivePMixED

        return AdaptivePMixED
    raise AttributeError(f"module 'pmixed' has no attribute {name!r}")
