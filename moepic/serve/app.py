"""The HTTP API (FastAPI): OpenAI's completions and chat completions, whole or streamed as
server-sent events, /v1/models, /health and /metrics. Side effects: the worker's queue.

A request's path: body validated (protocol.py) → token ids and limits (requests.py) → the worker
(429 when its queue is full) → token events decoded into text, cut at stop strings (stops.py) →
one JSON body, or SSE chunks ending in `data: [DONE]`. A client that leaves — a dropped stream, or
a closed connection while it waits for a whole answer — cancels its request before the next step,
which frees its KV cache; the others go on. Every error body has OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import traceback
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from moepic.runtime.scheduler import TokenEvent
from moepic.serve.metrics import CONTENT_TYPE, ServeMetrics
from moepic.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ResponseShape, finish_reason, usage
from moepic.serve.requests import Prepared, ServedModel
from moepic.serve.stops import StopText
from moepic.serve.worker import ServeWorker
from moepic.tokenizer import IncrementalDecoder

DISCONNECT_POLL_S = 0.25  # how often a whole-answer request checks that its client is still there


class _ClientGone(Exception):
    pass


class _ClosingStream(StreamingResponse):
    """A stream whose generator is closed however the response ends (finished, client gone, server
    stopping), so the request is cancelled at once instead of whenever the generator is collected;
    and released even if the stream never started (a client gone before its first byte)."""

    def __init__(self, content, run: _Run, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.run.release()


class _DrainCutsQuietly:
    """When a drain's time is up, uvicorn cancels the requests still running. Each has cancelled its
    generation on the way out (its generator's `finally`); what is left is a connection closed on
    purpose, not an error whose traceback belongs in the log."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http":
                raise


def build_app(model: ServedModel, worker: ServeWorker, metrics: ServeMetrics) -> FastAPI:
    app = FastAPI(title="moepic", summary="OpenAI-compatible MoE inference with experts offloaded to host memory")
    app.add_middleware(_DrainCutsQuietly)
    started = int(time.time())
    _error_handlers(app)

    @app.get("/health")
    async def health():
        if worker.failed is not None or worker.stopping:
            why = worker.failed or "shutting down"
            return JSONResponse(ApiError(503, why, kind="server_error").body(), status_code=503)
        return {"status": "ok", "queued": worker.queued, "batch_size": worker.batch_size}

    def model_card() -> dict:
        return {"id": model.name, "object": "model", "created": started, "owned_by": "moepic",
                "max_model_len": model.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != model.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model.name!r}", param="model",
                           code="model_not_found")
        return model_card()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        return await _answer(body, model.completion(body), ResponseShape(chat=False, model=model.name), http, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        return await _answer(body, model.chat(body), ResponseShape(chat=True, model=model.name), http, "chat")

    async def _answer(body, prepared: Prepared, shape: ResponseShape, http: Request, endpoint: str):
        arrived = time.perf_counter()
        request_id, events = await worker.submit(prepared.request)
        run = _Run(worker, request_id, events, prepared, model, metrics, endpoint, arrived)
        if body.stream:
            return _ClosingStream(_sse(run, shape, body.include_usage), run, media_type="text/event-stream")
        text, ended = [], None
        async with contextlib.aclosing(run.pieces(http)) as pieces:
            async for piece, ended in pieces:
                text.append(piece)
        return shape.whole("".join(text), ended, run.counts())

    return app


class _Run:
    """One submitted request's events, as text pieces cut at its stop strings; `release` (once,
    however it ends) cancels it if it is still in the scheduler and counts its outcome."""

    def __init__(self, worker: ServeWorker, request_id: int, events: asyncio.Queue, prepared: Prepared,
                 model: ServedModel, metrics: ServeMetrics, endpoint: str, arrived: float) -> None:
        self.worker, self.request_id, self.events, self.prepared = worker, request_id, events, prepared
        self.metrics, self.endpoint, self.arrived = metrics, endpoint, arrived
        self.decoder, self.stops = IncrementalDecoder(model.codec), StopText(prepared.stops)
        self.tokens = 0
        self.outcome, self.left_scheduler, self.released = "cancelled", False, False

    def counts(self) -> dict:
        return usage(len(self.prepared.request.prompt_ids), self.tokens)

    async def pieces(self, http: Request | None = None) -> AsyncIterator[tuple[str, str | None]]:
        """(text, None) as text is decided, then (text, finish reason) once. Leaving early (the
        client went, an error) cancels the request. `http`: watch it for a client that left."""
        watch = None if http is None else _Watch(http)
        try:
            while True:
                item = await (self.events.get() if watch is None else watch.next_event(self.events))
                if isinstance(item, ApiError):
                    self.outcome, self.left_scheduler = "error", True  # the worker dropped it
                    raise item
                event: TokenEvent = item
                self.tokens += 1
                if self.tokens == 1:
                    self.metrics.first_token_s.observe(time.perf_counter() - self.arrived)
                text = self.stops.push(self.decoder.push(event.token))
                if event.finished is not None and not self.stops.stopped:  # EOS or the token limit: the rest of the text
                    text += self.stops.push(self.decoder.flush())
                    text += self.stops.flush()
                self.left_scheduler = event.finished is not None
                if self.stops.stopped or self.left_scheduler:
                    self.outcome = "stop" if self.stops.stopped else finish_reason(event.finished)
                    yield text, self.outcome
                    return
                if text:
                    yield text, None
        finally:
            self.release()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if not self.left_scheduler:  # a stop string ended it early, or nobody listens: free its place and cache
            self.worker.cancel(self.request_id)
        self.metrics.requests.labels(self.endpoint, self.outcome).inc()
        if self.outcome in ("stop", "length"):
            self.metrics.latency_s.observe(time.perf_counter() - self.arrived)


class _Watch:
    """A whole-answer request's client, checked at most every DISCONNECT_POLL_S, whether or not
    tokens keep arriving (a busy batch would otherwise never give the check its turn)."""

    def __init__(self, http: Request) -> None:
        self.http, self.checked = http, time.perf_counter()

    async def next_event(self, events: asyncio.Queue):
        while True:
            try:
                item = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                item = None
            if time.perf_counter() - self.checked >= DISCONNECT_POLL_S:
                self.checked = time.perf_counter()
                if await self.http.is_disconnected():
                    raise _ClientGone()
            if item is not None:
                return item


def _data(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(run: _Run, shape: ResponseShape, include_usage: bool) -> AsyncIterator[str]:
    pieces = run.pieces()
    try:
        if shape.chat:
            yield _data(shape.chunk("", first=True))
        async for text, ended in pieces:
            if text or not shape.chat:
                yield _data(shape.chunk(text, ended if not shape.chat else None))
            if ended is not None and shape.chat:
                yield _data(shape.chunk(None, ended))
        if include_usage:
            yield _data(shape.usage_chunk(run.counts()))
        yield _data("[DONE]")
    except ApiError as e:  # the status line went out already: the error travels as an event
        yield _data(e.body())
    finally:
        await pieces.aclose()


def _error_handlers(app: FastAPI) -> None:
    def answer(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return answer(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return answer(ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"))
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(where) or None
        return answer(ApiError(400, f"{field + ': ' if field else ''}{first['msg']}", param=field))

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return answer(ApiError(error.status_code, str(error.detail), kind=kind))

    @app.exception_handler(_ClientGone)
    async def gone(request, error):
        return Response(status_code=499)  # nobody reads it: the connection is closed

    @app.exception_handler(Exception)
    async def bug(request, error: Exception):
        traceback.print_exception(error, file=sys.stderr)
        return answer(ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error"))
