"""The error hierarchy. Callers catch :class:`PMixEDError`; the CLI maps each class to an exit code."""

from __future__ import annotations


class PMixEDError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class ConfigError(PMixEDError, ValueError):
    """An invalid parameter or configuration field. The message names the field."""

    exit_code = 2

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class BudgetExhausted(PMixEDError):
    """A charge was refused because it would take the spent privacy budget past its limit.

    Nothing was recorded; the caller must not release the output it wanted to charge for.
    """

    exit_code = 3

    def __init__(self, spent: float, requested: float, limit: float, detail: str = ""):
        self.spent = spent
        self.requested = requested
        self.limit = limit
        msg = (
            f"privacy budget exhausted: spent epsilon={spent:.6g}, this charge would bring it to "
            f"epsilon={requested:.6g}, limit epsilon={limit:.6g}"
        )
        super().__init__(msg + (f" ({detail})" if detail else ""))


class LedgerError(PMixEDError):
    """The ledger file is corrupt, foreign, or was written for a different budget."""

    exit_code = 4


class DataError(PMixEDError):
    """Input data that cannot be used (missing unit column, too few units, empty texts...)."""

    exit_code = 5


class EnsembleMismatch(PMixEDError):
    """An ensemble's manifest does not match the base model, tokenizer or partition given."""

    exit_code = 6


class AssetError(PMixEDError):
    """An asset could not be fetched or failed its checksum."""

    exit_code = 7


class PromptTooLong(PMixEDError):
    """A prompt that leaves no room for a new token in the model's context. Raised before any
    query is drawn or charged."""

    exit_code = 2

    def __init__(self, prompt_tokens: int, context: int):
        self.prompt_tokens = prompt_tokens
        self.context = context
        super().__init__(
            f"the prompt is {prompt_tokens} tokens but the model's context is {context} tokens "
            f"(at most {context - 1} prompt tokens leave room for one new token); shorten it or "
            f"truncate it from the left (--truncate-prompt)"
        )


class GenerationInterrupted(PMixEDError):
    """An error after at least one token was charged and released. ``partial`` holds what was
    released (a ``pmixed.engine.Generation``); the cause is chained (``__cause__``)."""

    exit_code = 1

    def __init__(self, partial: object, cause: BaseException):
        self.partial = partial
        super().__init__(f"generation stopped by an error after {len(getattr(partial, 'token_ids', []))} "
                         f"released tokens: {type(cause).__name__}: {cause}")
