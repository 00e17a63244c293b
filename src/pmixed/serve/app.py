"""The OpenAI-compatible HTTP server (FastAPI) on the batched private decode engine.

Routes (all but /healthz need ``Authorization: Bearer <key>``; pmixed.serve.keys):

- ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI's request and response
  formats, streamed as server-sent events (``data: {...}`` chunks, then ``data: [DONE]``) or not
  (pmixed.serve.protocol says what is refused and the fields added).
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one served model.
- ``GET /v1/privacy``: the budget (``Decoder.privacy()``) and the caller's quota. With screened
  PMixED (``--mechanism adaptive``) it adds ``filter_order``, ``units_left``, ``private_queries``,
  ``screen`` and ``queries_left_note``, and ``queries_left`` counts units (one screen round and
  its one private answer; the tokens the screen answers from the public model cost nothing more).
  Per-key quotas count every token sent, whichever answered it.
- ``GET /healthz``: liveness, no key.
- admin keys only: ``GET /metrics`` (Prometheus), ``GET /v1/admin/keys``,
  ``POST /v1/admin/keys/{id}/reset`` (start a new quota window for a key).

A request is checked completely (key, body, sampling, model, prompt length, the key's quota)
before it reaches the engine, so a refused request costs no budget. A streamed response starts
only when each of its choices has its first token or has ended: a request whose choices all end
before their first token because the budget is spent is answered 429 ``insufficient_quota`` (with
``x-should-retry: false``: the budget does not come back). A stop sequence is applied to the
decoded text: the text is cut before it and the engine is told to stop (tokens it had already
charged count in ``usage``). A client that goes away cancels its streams at the engine's next
step.

Nothing logged contains prompt or completion text unless ``log_text`` (``--log-text``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pmixed.errors import PromptTooLong
from pmixed.serve.keys import KeyInfo, KeyStore, QuotaExceeded
from pmixed.serve.metrics import CONTENT_TYPE, Metrics
from pmixed.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Limits,
    check_chat,
    check_completion,
    chunk_body,
    completion_body,
    new_id,
    parse_body,
    usage,
)
from pmixed.serve.scheduler import QueueFull
from pmixed.serve.stream import SamplingParams, Stream, Token

__all__ = ["TextAssembler", "chat_prompt", "create_app"]

log = logging.getLogger("pmixed.serve")


# ---------------------------------------------------------------- text
class TextAssembler:
    """Released token ids -> text deltas, with stop sequences applied to the text.

    Text is sent only when it is final: a trailing partial UTF-8 character (decoded as U+FFFD)
    and a trailing piece that could begin a stop sequence are held back until the next token
    decides them (or the stream ends). Tokens sampled from the public model alone follow every
    private token (the budget does not come back), so their text is a suffix: ``public_offset``
    is where it begins, and a delta that crosses it is split in two.
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.public_from: int | None = None  # index in ids of the first public-only token
        self.public_offset: int | None = None  # where its text begins
        self.sent = 0  # characters sent
        self.text = ""
        self.stopped = False  # a stop sequence was found

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: Token) -> list[tuple[str, bool]]:
        if self.stopped:
            return []
        if token.public_only and self.public_from is None:
            self.public_from = len(self.ids)
            self.public_offset = len(self._decode(self.ids).rstrip("\ufffd"))
        self.ids.append(int(token.id))
        self.text = self._decode(self.ids)
        hit = min((p for p in (self.text.find(s) for s in self.stops) if p >= 0), default=-1)
        if hit >= 0:
            self.text, self.stopped = self.text[:hit], True
            return self._take(len(self.text))
        end = len(self.text.rstrip("\ufffd"))
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if self.text[end - k:end] == s[:k]:
                    hold = max(hold, k)
                    break
        return self._take(max(self.sent, end - hold))

    def flush(self) -> list[tuple[str, bool]]:
        """At the end of the stream: the rest of the text."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> list[tuple[str, bool]]:
        a, b = self.sent, upto
        if b <= a:
            return []
        self.sent = b
        p = self.public_offset
        if p is None or b <= p:
            return [(self.text[a:b], False)]
        if a >= p:
            return [(self.text[a:b], True)]
        return [(self.text[a:p], False), (self.text[p:b], True)]


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> tuple[str, bool]:
    """The prompt text for a chat: the tokenizer's chat template with the generation prompt where it
    has one (-> (text, True): the template adds its own special tokens), else the plain join
    ``"{role}: {content}\\n"`` per message followed by ``"assistant:"`` (-> (text, False))."""
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), True
        except Exception as err:  # a template that refuses this conversation (e.g. roles order)
            raise ApiError(400, f"the model's chat template refused these messages: {type(err).__name__}",
                           param="messages", code="invalid_value") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:", False


# ---------------------------------------------------------------- one choice
@dataclass
class _Choice:
    index: int
    stream: Stream
    asm: TextAssembler
    prompt_text: str = ""
    private_tokens: int = 0
    public_tokens: int = 0
    first: asyncio.Event = field(default_factory=asyncio.Event)
    finish: str | None = None
    ttft: float | None = None
    last: float | None = None  # when the last token arrived
    gaps: list[float] = field(default_factory=list)  # inter-token seconds (the engine's step time)


async def _pump(c: _Choice, out: asyncio.Queue, t0: float) -> None:
    """Read one engine stream: text pieces and the finish onto ``out`` as (index, text, public,
    finish); a stop sequence cancels the stream and the rest is drained (charged tokens counted)."""
    try:
        async for tok in c.stream:
            if tok.public_only:
                c.public_tokens += 1
            else:
                c.private_tokens += 1
            now = time.perf_counter()
            if c.ttft is None:
                c.ttft = now - t0
            else:
                c.gaps.append(now - c.last)
            c.last = now
            was_stopped = c.asm.stopped
            for text, pub in c.asm.add(tok):
                out.put_nowait((c.index, text, pub, None))
            c.first.set()
            if c.asm.stopped and not was_stopped:
                c.stream.cancel()
        for text, pub in c.asm.flush():
            out.put_nowait((c.index, text, pub, None))
        reason = c.stream.finish_reason or "error"
        c.finish = "stop" if c.asm.stopped else reason
    except asyncio.CancelledError:
        c.stream.cancel()
        c.finish = "cancelled"
        raise
    except Exception:  # noqa: BLE001 - an engine failure ends the choice, never the server
        log.exception("stream %d failed", c.index)
        c.stream.cancel()
        c.finish = "error"
    finally:
        c.first.set()
        out.put_nowait((c.index, "", False, c.finish or "cancelled"))


async def _until_disconnect(request: Request, poll: float = 0.2) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll)


@dataclass
class _Job:
    """One admitted request: its choices, the key's reservation, and what to record at the end."""

    route: str
    rid: str
    chat: bool
    key: KeyInfo
    reserved: int
    window_start: float
    choices: list[_Choice]
    queue: asyncio.Queue
    tasks: list[asyncio.Task]
    t0: float
    echo: bool = False
    stream_usage: bool = False
    settled: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(c.stream.prompt_tokens for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(c.private_tokens + c.public_tokens for c in self.choices)


# ---------------------------------------------------------------- the app
def create_app(
    decoder: Any,
    *,
    keys: KeyStore,
    model_name: str = "pmixed",
    limits: Limits | None = None,
    log_text: bool = False,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The server's ASGI app over a started ``pmixed.serve.scheduler.Decoder`` (or anything with
    its interface: ``submit``, ``tokenizer``, ``context_length``, ``privacy``, ``stats``). The
    caller starts and closes the decoder."""
    limits = limits or Limits()
    metrics = metrics or Metrics()
    metrics.bind(decoder)
    tokenizer = decoder.tokenizer
    context = decoder.context_length
    vocab = len(tokenizer)
    created = int(time.time())
    app = FastAPI(title="pmixed", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.decoder, app.state.keys, app.state.metrics, app.state.limits = decoder, keys, metrics, limits

    def respond_error(err: ApiError, route: str) -> JSONResponse:
        metrics.requests.labels(route, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return respond_error(err, _route(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            err.status_code, str(err.detail))
        return respond_error(ApiError(err.status_code, msg, code="not_found" if err.status_code == 404 else None),
                             "other")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return respond_error(ApiError(400, "invalid request", code="invalid_request"), _route(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        log.error("internal error on %s: %s", request.url.path, type(err).__name__)
        return respond_error(ApiError(500, "internal server error", code="internal_error"), _route(request))

    def _route(request: Request) -> str:
        r = request.scope.get("route")
        return getattr(r, "path", "other")

    def auth(request: Request, *, admin: bool = False) -> KeyInfo:
        h = request.headers.get("authorization", "")
        scheme, _, value = h.partition(" ")
        if not h:
            raise ApiError(401, "no API key: send the header `Authorization: Bearer <key>` "
                                "(keys come from `pmixed keys create`)", code="missing_api_key")
        key = keys.authenticate(value.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        if admin and not key.admin:
            raise ApiError(403, "this operation needs an admin key", code="admin_required")
        return key

    # ---- small routes
    @app.get("/healthz")
    async def healthz():
        metrics.requests.labels("/healthz", "200").inc()
        return {"status": "ok", "model": model_name}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "pmixed"}

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        auth(request)
        if model_id != model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        metrics.requests.labels("/v1/models/{model_id}", "200").inc()
        return model_card()

    @app.get("/v1/privacy")
    async def privacy(request: Request):
        key = auth(request)
        body = dict(decoder.privacy())
        body["key"] = {k: v for k, v in key.public().items() if k in
                       ("id", "name", "quota", "period_s", "used", "window_resets_in_s")}
        metrics.requests.labels("/v1/privacy", "200").inc()
        return body

    @app.get("/metrics")
    async def prometheus(request: Request):
        auth(request, admin=True)
        metrics.requests.labels("/metrics", "200").inc()
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/admin/keys")
    async def admin_keys(request: Request):
        auth(request, admin=True)
        metrics.requests.labels("/v1/admin/keys", "200").inc()
        return {"object": "list", "data": [k.public() for k in keys.list()]}

    @app.post("/v1/admin/keys/{key_id}/reset")
    async def admin_reset(request: Request, key_id: str):
        auth(request, admin=True)
        from pmixed.serve.keys import KeyStoreError

        try:
            info = keys.reset(key_id)
        except KeyStoreError:
            raise ApiError(404, f"no key {key_id!r}", param="key_id", code="key_not_found") from None
        log.info("quota window reset for key %s", info.id)
        metrics.requests.labels("/v1/admin/keys/{key_id}/reset", "200").inc()
        return info.public()

    # ---- completions
    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def encode(text: str) -> list[int]:  # as the engine's PrivatePredictor.prompt_ids
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_ids(ids: list[int]) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt has no tokens", param="prompt", code="invalid_value")
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"a prompt token id lies outside the vocabulary [0, {vocab})",
                           param="prompt", code="invalid_value")
        if context is not None and len(ids) > context - 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {context} "
                                f"tokens (at most {context - 1} prompt tokens leave room for one new token)",
                           param="prompt", code="context_length_exceeded")
        return ids

    async def admit(request: Request, route: str, chat: bool, key: KeyInfo,
                    prompts: list[tuple[list[int], str]], checked: dict) -> _Job | None:
        """Reserve the key's quota and submit every choice; refused requests leave nothing behind."""
        n, params = checked["n"], checked["params"]
        per_choice = [(ids, text, min(params["max_tokens"], (context - len(ids)) if context else params["max_tokens"]))
                      for ids, text in prompts]
        reserved = sum(mt for _, _, mt in per_choice) * n
        try:
            info = keys.reserve(key.id, reserved)
        except QuotaExceeded as err:
            raise ApiError(429, str(err), code="quota_exceeded", type="rate_limit_error",
                           headers={"Retry-After": str(err.retry_after)}) from None
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        job = _Job(route, new_id("chatcmpl" if chat else "cmpl"), chat, key, reserved, info.window_start,
                   [], out, [], time.perf_counter(), echo=checked.get("echo", False),
                   stream_usage=checked["stream_usage"])
        try:
            for ids, text, mt in per_choice:
                sp = SamplingParams(**{**params, "max_tokens": mt})
                for _ in range(n):
                    stream = decoder.submit(ids, sp, loop=loop)
                    job.choices.append(_Choice(len(job.choices), stream, TextAssembler(tokenizer, checked["stop"]),
                                               prompt_text=text))
        except BaseException as err:
            for c in job.choices:
                c.stream.cancel()
            settle(job)
            if isinstance(err, QueueFull):
                retry = max(1, round(float(getattr(err, "retry_after", 1))))
                raise ApiError(429, f"the server is at its limit of concurrent requests; retry in {retry} s",
                               code="server_busy", type="rate_limit_error",
                               headers={"Retry-After": str(retry)}) from None
            if isinstance(err, PromptTooLong):
                raise ApiError(400, str(err).split("; shorten")[0], param="prompt",
                               code="context_length_exceeded") from None
            if isinstance(err, ValueError):
                raise ApiError(400, str(err), code="invalid_value") from None
            raise
        job.tasks = [asyncio.create_task(_pump(c, out, job.t0)) for c in job.choices]
        # wait until each choice has its first token (or has ended) or the client goes away
        gone = asyncio.create_task(_until_disconnect(request))
        firsts = asyncio.gather(*(c.first.wait() for c in job.choices))
        try:
            await asyncio.wait([gone, firsts], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not firsts.done():  # the client went away before the first token
            firsts.cancel()
            firsts.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no log
            close(job, "499")
            return None
        if all(c.finish is not None and c.private_tokens + c.public_tokens == 0 for c in job.choices):
            reasons = {c.finish for c in job.choices}
            close(job, None)
            if reasons == {"budget"}:
                raise ApiError(429, "the deployment's privacy budget is spent: no more tokens can be released "
                                    "(GET /v1/privacy shows the budget)", code="budget_exhausted",
                               type="insufficient_quota", headers={"x-should-retry": "false"})
            raise ApiError(500, "the engine failed before the first token", code="engine_error",
                           type="server_error")
        return job

    def settle(job: _Job) -> None:
        """Give the key back the part of its reservation not charged: tokens the engine produced
        but nobody read (a cancelled stream) count as charged."""
        if job.settled:
            return
        job.settled = True
        used = sum(max(c.private_tokens, c.stream.completion_tokens - c.public_tokens) for c in job.choices)
        keys.settle(job.key.id, job.reserved, used, job.window_start)

    def close(job: _Job, status: str | None) -> None:
        """Cancel what still runs, settle the key's quota, record metrics and one log line.
        Synchronous: it also runs while the response task is being cancelled."""
        for c in job.choices:
            if c.finish is None:
                c.stream.cancel()
        for t in job.tasks:
            if not t.done():
                t.cancel()
        # the quota is settled when every stream has ended: a cancelled stream's engine may still
        # charge the token in flight, which the key must pay for too
        pending = [c.stream for c in job.choices if not c.stream.done]
        if not pending:
            settle(job)
        else:
            loop, left = asyncio.get_running_loop(), [len(pending)]

            def ended() -> None:  # in the event loop's thread
                left[0] -= 1
                if left[0] == 0:
                    settle(job)

            def threadsafe() -> None:
                try:
                    loop.call_soon_threadsafe(ended)
                except RuntimeError:  # the loop has closed (shutdown): nobody is left to settle for
                    pass

            for s in pending:
                s.add_done_callback(threadsafe)
        priv = sum(c.private_tokens for c in job.choices)
        pub = sum(c.public_tokens for c in job.choices)
        metrics.tokens.labels("private").inc(priv)
        metrics.tokens.labels("public").inc(pub)
        metrics.prompt_tokens.inc(job.prompt_tokens)
        for c in job.choices:
            metrics.finish.labels(c.finish or "cancelled").inc()
            if c.ttft is not None:
                metrics.ttft.labels(job.route).observe(c.ttft)
            for g in c.gaps:
                metrics.inter_token.observe(g)
        metrics.duration.labels(job.route).observe(time.perf_counter() - job.t0)
        if status is not None:
            metrics.requests.labels(job.route, status).inc()
        log.info("%s %s key=%s status=%s prompt_tokens=%d completion_tokens=%d (public %d) finish=%s %.3fs",
                 job.rid, job.route, job.key.id, status or "refused", job.prompt_tokens, priv + pub, pub,
                 ",".join(c.finish or "cancelled" for c in job.choices), time.perf_counter() - job.t0)
        if log_text:
            for c in job.choices:
                log.info("%s choice %d prompt=%r completion=%r", job.rid, c.index, c.prompt_text, c.asm.text)

    def choice_extra(c: _Choice) -> dict:
        return {"public_only_tokens": c.public_tokens, "public_text_offset": c.asm.public_offset}

    async def whole(request: Request, job: _Job) -> JSONResponse:
        gone = asyncio.create_task(_until_disconnect(request))
        done = asyncio.gather(*job.tasks, return_exceptions=True)
        try:
            await asyncio.wait([gone, done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not done.done():  # the client went away: its streams stop at the engine's next step
            close(job, "499")
            return Response(status_code=499)
        choices = []
        for c in job.choices:
            text = c.asm.text
            if job.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": c.finish, **choice_extra(c)})
            else:
                extra = choice_extra(c)
                if job.echo:
                    text = c.prompt_text + text
                    if extra["public_text_offset"] is not None:
                        extra["public_text_offset"] += len(c.prompt_text)
                choices.append({"index": c.index, "text": text, "logprobs": None,
                                "finish_reason": c.finish, **extra})
        body = completion_body(job.rid, model_name, choices, usage(job.prompt_tokens, job.completion_tokens),
                               chat=job.chat)
        close(job, "200")
        return JSONResponse(body)

    def sse(obj: dict | str) -> bytes:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        return f"data: {data}\n\n".encode()

    async def streamed(job: _Job) -> AsyncIterator[bytes]:
        created_at = int(time.time())
        status = "200"
        try:
            if job.chat:
                yield sse(chunk_body(job.rid, created_at, model_name,
                                     [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None} for c in job.choices], chat=True))
            elif job.echo:
                for c in job.choices:
                    yield sse(chunk_body(job.rid, created_at, model_name,
                                         [{"index": c.index, "text": c.prompt_text, "logprobs": None,
                                           "finish_reason": None, "public_only": False}], chat=False))
            left = len(job.choices)
            while left:
                idx, text, pub, finish = await job.queue.get()
                c = job.choices[idx]
                if finish is None and not text:
                    continue
                if job.chat:
                    delta = {"content": text} if finish is None else {}
                    ch = {"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    ch = {"index": idx, "text": text, "logprobs": None, "finish_reason": finish}
                if finish is None:
                    ch["public_only"] = pub
                else:
                    left -= 1
                    ch.update(choice_extra(c))
                    if not job.chat and job.echo and ch["public_text_offset"] is not None:
                        ch["public_text_offset"] += len(c.prompt_text)
                yield sse(chunk_body(job.rid, created_at, model_name, [ch], chat=job.chat))
            if job.stream_usage:
                yield sse(chunk_body(job.rid, created_at, model_name, [], chat=job.chat,
                                     use=usage(job.prompt_tokens, job.completion_tokens)))
            yield sse("[DONE]")
        except BaseException:  # the client went away (cancelled) or the send failed
            status = "499"
            raise
        finally:
            close(job, status)

    async def run(request: Request, route: str, chat: bool):
        key = auth(request)
        raw = await request.body()
        if chat:
            req = parse_body(raw, ChatCompletionRequest)
            checked = check_chat(req, limits)
            check_model(req.model)
            text, _ = chat_prompt(tokenizer, req.messages)  # a template carries its special tokens
            prompts = [(check_ids(encode(text)), text)]
        else:
            req = parse_body(raw, CompletionRequest)
            checked = check_completion(req, limits)
            check_model(req.model)
            prompts = []
            for p in checked["prompts"]:
                if isinstance(p, str):
                    prompts.append((check_ids(encode(p)), p))
                else:
                    prompts.append((check_ids(list(p)), tokenizer.decode(list(p))))
        job = await admit(request, route, chat, key, prompts, checked)
        if job is None:
            return Response(status_code=499)
        if checked["stream"]:
            return StreamingResponse(streamed(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, "/v1/chat/completions", chat=True)

    return app

