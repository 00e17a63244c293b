"""The OpenAI wire format the server speaks: request models (pydantic, strict types), the checks
that refuse what the guarantee does not cover, and the response / chunk / error bodies.

Refused with 400 and a reason (docs in the README's "Serving" section):

- ``logprobs``, ``top_logprobs``, ``echo`` with logprobs: the guarantee covers the *sampled*
  tokens; the released distribution itself is never returned.
- ``seed``: serving samples with the OS CSPRNG; a seeded release is not private.
- ``best_of`` > 1 (picks by log-probability), ``suffix``, ``logit_bias``, presence / frequency
  penalties, tools / functions, a JSON ``response_format``: not implemented (the first would need
  the private distribution; the others are post-processing this server does not offer).

Extensions: ``top_k`` (int >= 0, 0 = off; vLLM's -1 means off too) and ``ignore_eos``. Unknown
fields are ignored, as OpenAI's clients send some of their own.

Response extensions: ``finish_reason`` may be ``"budget"`` (the deployment's privacy budget ran
out before ``max_tokens``) or ``"error"`` besides OpenAI's ``"stop"`` / ``"length"``; each choice
carries ``public_only_tokens`` (tokens sampled from the public model alone after the budget ran
out, with ``--public-continuation``) and ``public_text_offset`` (where in the text they begin, or
null); a streamed chunk's choice carries ``public_only`` (its text came from the public model
alone). The ``usage`` block counts charged completion tokens.

Screened PMixED (``pmixed serve --mechanism adaptive``) changes none of these formats: a token
the screen answers from the public model is part of the mechanism's output (covered by its
round's unit) and is neither marked ``public_only`` nor left out of ``usage``; ``public_only``
still means public continuation after the budget ran out.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "Limits",
    "error_body",
    "parse_body",
]

OBJECT_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body. Messages never depend on private data (they
    describe the request, the configuration or the budget's public figures)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or OBJECT_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Limits(BaseModel):
    """The server's caps on a request."""

    model_config = ConfigDict(frozen=True)

    max_tokens: int = 256  # per choice
    n: int = 4  # choices per request (prompts x n for a batch of prompts)
    stop: int = 4  # stop sequences
    stop_chars: int = 200  # characters per stop sequence
    messages: int = 256
    prompt_chars: int = 200_000  # before tokenising (the context check comes after)
    default_max_tokens: int = 16  # completions' OpenAI default; chat defaults to the cap


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model: type[_Strict]) -> _Strict:
    """Bytes -> a validated request, or ApiError(400) saying what is wrong (UTF-8, JSON, types)."""
    if not raw:
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {err.start})",
                       code="invalid_encoding") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except ValueError as err:
        msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON: {msg}{where}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:  # a "\ud800" escape parses to a lone surrogate, which no tokenizer can encode
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF "
                            "escape): not valid Unicode text", code="invalid_encoding") from None
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        e = err.errors(include_input=False, include_url=False)[0]
        loc = [str(p) for p in e["loc"]]
        # a union's branch names ("str", "list[int]") in the location say nothing to a client
        loc = [p for p in loc if not any(c in p for c in "[]") and p not in {"str", "int", "list"}]
        param = ".".join(loc) or None
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ApiError(400, f"{param or 'body'}: {e['msg']}{more}", param=param,
                       code="missing_field" if e["type"] == "missing" else "invalid_type") from None


def _range(name: str, v: float | None, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if v is None:
        return
    bad = not math.isfinite(v) or v > hi or (v <= lo if lo_open else v < lo)
    if bad:
        bracket = "(" if lo_open else "["
        raise ApiError(400, f"{name} must lie in {bracket}{lo:g}, {hi:g}]", param=name, code="invalid_value")


def _refused(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


LOGPROBS_WHY = ("the privacy guarantee covers the sampled tokens, not the released distribution, "
                "so log-probabilities are never returned")
SEED_WHY = "serving samples with the operating system's CSPRNG; a seeded release would not be private"


def check_common(req: _Sampling, limits: Limits, *, max_tokens: int | None, default_max: int) -> dict:
    """The sampling checks shared by both routes -> keyword arguments of SamplingParams, n, stops."""
    if req.seed is not None:
        raise _refused("seed", SEED_WHY)
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v not in (None, 0, 0.0):
            raise _refused(name, "penalties are not implemented")
    if req.logit_bias:
        raise _refused("logit_bias", "biasing the distribution is not implemented")
    if max_tokens is None:
        max_tokens = default_max
    if max_tokens < 1:
        raise ApiError(400, "max_tokens must be >= 1", param="max_tokens", code="invalid_value")
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens} but this server allows at most {limits.max_tokens}",
                       param="max_tokens", code="invalid_value")
    n = 1 if req.n is None else req.n
    if n < 1:
        raise ApiError(400, "n must be >= 1", param="n", code="invalid_value")
    if n > limits.n:
        raise ApiError(400, f"n is {n} but this server allows at most {limits.n}", param="n",
                       code="invalid_value")
    _range("temperature", req.temperature, 0.0, 2.0)
    _range("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
        raise ApiError(400, "top_k must be >= 0 (0 or -1: off)", param="top_k", code="invalid_value")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    # The guarantee covers a token sampled from the mechanism's distribution as it is: temperature,
    # top_p, top_k and greedy decoding would act on each draw's mix (M1), a different mechanism,
    # whose exact divergence exceeds the charge (infinitely for top_k / top_p / greedy:
    # tests/exact/test_exact_sampling.py), so they are refused (docs/privacy.md section 8b).
    for name, value, off in (("temperature", temperature, 1.0), ("top_p", top_p, 1.0), ("top_k", top_k, 0)):
        if value != off:
            raise ApiError(400, f"{name} = {value:g} is not covered by the privacy guarantee: sampling "
                                f"transforms would act on each draw's mixture, which the proof does not "
                                f"cover; omit {name} or send {off:g}", param=name, code="not_covered_by_guarantee")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.stop:
        raise ApiError(400, f"at most {limits.stop} stop sequences", param="stop", code="invalid_value")
    if any(not s or len(s) > limits.stop_chars for s in stops):
        raise ApiError(400, f"a stop sequence must have 1 to {limits.stop_chars} characters", param="stop",
                       code="invalid_value")
    stream_usage = bool((req.stream_options or {}).get("include_usage", False))
    return {"params": {"max_tokens": max_tokens, "temperature": temperature,
                       "top_p": top_p, "top_k": top_k,
                       "stop_at_eos": not req.ignore_eos},
            "n": n, "stop": stops, "stream": bool(req.stream), "stream_usage": stream_usage}


def check_completion(req: CompletionRequest, limits: Limits) -> dict:
    if req.logprobs is not None:
        raise _refused("logprobs", LOGPROBS_WHY)
    if req.best_of not in (None, 1):
        raise _refused("best_of", "choosing the best of several samples needs their log-probabilities; "
                                  + LOGPROBS_WHY)
    if req.suffix:
        raise _refused("suffix", "insertion is not implemented")
    out = check_common(req, limits, max_tokens=req.max_tokens,
                       default_max=min(limits.default_max_tokens, limits.max_tokens))  # a cap below 16 too
    p = req.prompt
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if not prompts:
        raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
    if len(prompts) * out["n"] > limits.n:
        raise ApiError(400, f"{len(prompts)} prompts x n={out['n']} choices exceed this server's limit of "
                            f"{limits.n} choices per request", param="n", code="invalid_value")
    for x in prompts:
        if len(x) == 0:
            raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
        if isinstance(x, str) and len(x) > limits.prompt_chars:
            raise ApiError(400, f"prompt has more than {limits.prompt_chars} characters", param="prompt",
                           code="context_length_exceeded")
    out["prompts"] = prompts
    out["echo"] = bool(req.echo)
    return out


def check_chat(req: ChatCompletionRequest, limits: Limits) -> dict:
    if req.logprobs:
        raise _refused("logprobs", LOGPROBS_WHY)
    if req.top_logprobs is not None:
        raise _refused("top_logprobs", LOGPROBS_WHY)
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise _refused(name, "tool calling is not implemented")
    if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
        raise _refused("tool_choice", "tool calling is not implemented")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _refused("response_format", "structured output is not implemented")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree", param="max_tokens",
                       code="invalid_value")
    mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    out = check_common(req, limits, max_tokens=mt, default_max=limits.max_tokens)
    if not req.messages:
        raise ApiError(400, "messages is empty", param="messages", code="invalid_value")
    if len(req.messages) > limits.messages:
        raise ApiError(400, f"at most {limits.messages} messages", param="messages", code="invalid_value")
    if sum(len(m.text()) for m in req.messages) > limits.prompt_chars:
        raise ApiError(400, f"the messages have more than {limits.prompt_chars} characters",
                       param="messages", code="context_length_exceeded")
    if not any(m.text() for m in req.messages):
        raise ApiError(400, "every message is empty", param="messages", code="invalid_value")
    return out


# ---------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict], use: dict, *, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": use,
            "system_fingerprint": None}


def chunk_body(rid: str, created: int, model: str, choices: list[dict], *, chat: bool,
               use: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": choices, "system_fingerprint": None}
    if use is not None:
        body["usage"] = use
    return body


FinishReason = Literal["stop", "length", "budget", "cancelled", "error"]
