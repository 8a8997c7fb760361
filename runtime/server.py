"""OpenAI-compatible HTTP server: `difuse serve --model PATH --host 127.0.0.1 --port 8000`.

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events, one
         delta per committed block, then `data: [DONE]`)
    GET  /v1/models, /health, /metrics (Prometheus text)

One worker thread owns the engine and drives a BlockBatcher (runtime/batching.py): requests join
the running batch at block boundaries and leave it when done. The asyncio side only encodes,
validates, enqueues and relays block events, so the event loop never waits on the model.
Generation settings (decoder, threshold, block_length, cache, gen_length, steps, ...) are
accepted as extra body fields; errors use OpenAI's body {"error": {message, type, param, code}}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import fields
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from difuse.runtime.batching import BlockBatcher, BlockEvent, QueueFull, Sequence
from difuse.runtime.config import CACHES, DECODERS, ITERATIONS, GenerationConfig, iteration_and_cache
from difuse.runtime.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, Registry

log = logging.getLogger("difuse.server")

# request body fields that go straight into GenerationConfig
SETTINGS = ("gen_length", "block_length", "decoder", "steps", "threshold", "low_threshold", "cache", "iteration",
            "unroll", "early_stop", "prefix_look", "after_look", "refresh_every", "temperature")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- request schema ---------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "5" is not an integer and "true" not a boolean; unknown OpenAI fields (top_p,
    # user, logit_bias, ...) are accepted and have no effect on a diffusion decoder
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    temperature: float | None = Field(None, ge=0)
    timeout: float | None = Field(None, gt=0)  # seconds; the server's --request-timeout caps it
    # difuse generation settings
    gen_length: int | None = None
    block_length: int | None = None
    decoder: Literal[DECODERS] | None = None  # type: ignore[valid-type]
    steps: int | None = None
    threshold: float | None = None
    low_threshold: float | None = None
    cache: Literal[CACHES] | None = None  # type: ignore[valid-type]
    iteration: Literal[ITERATIONS] | None = None  # type: ignore[valid-type]
    unroll: int | None = None
    early_stop: bool | None = None
    prefix_look: int | None = None
    after_look: int | None = None
    refresh_every: int | None = None


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    # accepted so that a request using them gets a clear "not supported" instead of silence
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None


# -- the engine side --------------------------------------------------------------------------
class GenerationService:
    """Owns the engine: one worker thread runs BlockBatcher.step() while anything is queued or
    running; request handlers submit sequences and receive block events on their event loop."""

    def __init__(self, engine, model_name: str, defaults: GenerationConfig, max_batch_size: int = 16,
                 max_queue: int = 64, request_timeout: float = 600.0, max_workspaces: int = 4):
        if engine.tokenizer is None:
            raise ValueError("the server needs a checkpoint with a tokenizer")
        self.engine, self.model_name, self.defaults = engine, model_name, defaults
        self.request_timeout = request_timeout
        self.batcher = BlockBatcher(engine, max_batch_size, max_queue, max_workspaces)
        self.max_sequence_length = getattr(engine.model.config, "max_sequence_length", None)
        self.created = int(time.time())
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.running_sequences = 0
        self.registry = registry = Registry()
        self.requests = registry.add(Counter("difuse_requests_total", "HTTP requests by endpoint and status",
                                             ("endpoint", "status")))
        self.prompt_tokens = registry.add(Counter("difuse_prompt_tokens_total", "prompt tokens of finished requests"))
        self.generated_tokens = registry.add(Counter("difuse_generated_tokens_total",
                                                     "completion tokens returned to clients"))
        self.finished = registry.add(Counter("difuse_finished_sequences_total", "sequences that left the engine, "
                                             "by reason (stop, length, timeout, cancelled, error)", ("reason",)))
        self.steps = registry.add(Counter("difuse_denoise_steps_total", "denoise steps (batched forwards) run"))
        self.committed = registry.add(Counter("difuse_committed_tokens_total", "tokens committed by the decoders"))
        self.tokens_per_step = registry.add(Histogram(
            "difuse_tokens_per_step", "tokens committed per denoise step, per worker iteration (whole batch)",
            (0.5, 1, 2, 4, 8, 16, 32, 64, 128)))
        self.step_latency = registry.add(Histogram(
            "difuse_step_latency_seconds", "wall time of one denoise step (block time / steps)",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)))
        self.request_latency = registry.add(Histogram(
            "difuse_request_latency_seconds", "time from arrival to the last token of a generation request",
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)))
        registry.add(Gauge("difuse_queue_depth", "requests waiting to join a batch", lambda: self.batcher.queue_depth))
        registry.add(Gauge("difuse_running_sequences", "sequences in running batches", lambda: self.running_sequences))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="difuse-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompt: list[int], config: GenerationConfig, events: asyncio.Queue, index: int,
               timeout: float | None = None) -> Sequence:
        loop = asyncio.get_running_loop()
        timeout = self.request_timeout if timeout is None else min(timeout, self.request_timeout)

        def deliver(sequence: Sequence, event: BlockEvent) -> None:
            if event.finish_reason is not None:
                self.finished.inc(reason=event.finish_reason)
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop closed during shutdown: nobody is listening
                pass

        sequence = Sequence(prompt, config, deliver, deadline=time.monotonic() + timeout)
        try:
            self.batcher.submit(sequence)
        except QueueFull as error:
            raise ApiError(503, f"{error}; retry later", "server_overloaded", None, "queue_full",
                           {"Retry-After": "1"}) from None
        self._wake.set()
        return sequence

    def _work(self) -> None:
        while not self._stop.is_set():
            if self.batcher.idle():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                stats = self.batcher.step()
            except Exception:  # a failed step must not kill the worker: fail its requests, keep serving
                log.exception("a generation step failed; ending the requests in flight")
                self.batcher.abort("error")
                self.running_sequences = 0
                continue
            self.running_sequences = self.batcher.running
            self.steps.inc(stats.forwards)
            self.committed.inc(stats.committed_tokens)
            for seconds in stats.block_seconds:
                self.step_latency.observe(seconds)
            if stats.forwards:
                self.tokens_per_step.observe(stats.committed_tokens / stats.forwards)

    # -- request translation ------------------------------------------------------------------
    def config_for(self, body: _Body, max_tokens: int | None) -> GenerationConfig:
        settings = {name: getattr(self.defaults, name) for name in (f.name for f in fields(GenerationConfig))}
        given = {name: getattr(body, name) for name in SETTINGS if getattr(body, name) is not None}
        settings.update(given)
        if "gen_length" not in given and max_tokens is not None:
            block = settings["block_length"]
            settings["gen_length"] = -(-max_tokens // block) * block if isinstance(block, int) and block > 0 \
                else max_tokens
        if "steps" not in given:  # the default's steps belong to the default's decoder and gen_length
            fixed = settings["decoder"] in ("fixed", "random")
            settings["steps"] = settings["gen_length"] if fixed else None  # fixed: LLaDA's one token per step
        try:
            return GenerationConfig(**settings)
        except ValueError as error:
            message = str(error)
            named = [(match.start(), match.group()) for match in re.finditer(r"\w+", message) if match.group() in SETTINGS]
            param = min(named)[1] if named else None
            raise ApiError(400, f"invalid generation settings: {message}", param=param,
                           code="invalid_generation_settings") from None

    def check_length(self, prompt: list[int], config: GenerationConfig, param: str) -> None:
        total = len(prompt) + config.gen_length
        if self.max_sequence_length is not None and total > self.max_sequence_length:
            raise ApiError(400, f"this model's maximum context length is {self.max_sequence_length} tokens; the "
                                f"request needs {len(prompt)} prompt + {config.gen_length} generated = {total}",
                           param=param, code="context_length_exceeded")

    def encode_text(self, text: str) -> list[int]:
        return list(self.engine.tokenizer(text)["input_ids"])

    def encode_ids(self, ids: list[int]) -> list[int]:
        vocab = self.engine.model.vocab_size
        if not ids or not all(0 <= t < vocab for t in ids):
            raise ApiError(400, f"a token-id prompt must be a non-empty list of ids in [0, {vocab})", param="prompt")
        return ids

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        turns = [{"role": "system" if m.role == "developer" else m.role,
                  "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                 for m in messages]
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)


class _Choice:
    """One sequence's answer as the blocks arrive: tokens before EOS, capped at max_tokens and cut
    at the first stop string; `absorb` returns the new text and the finish reason, if any."""

    def __init__(self, service: GenerationService, sequence: Sequence, max_tokens: int | None, stops: list[str]):
        self.service, self.sequence, self.max_tokens, self.stops = service, sequence, max_tokens, stops
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None

    def absorb(self, event: BlockEvent) -> str:
        if self.finish_reason is not None:
            return ""
        eos = self.service.engine.model.config.eos_token_id
        tokens, reason = event.tokens, event.finish_reason
        if eos in tokens:
            tokens, reason = tokens[:tokens.index(eos)], "stop"
        self.tokens += tokens
        if self.max_tokens is not None and len(self.tokens) >= self.max_tokens and reason != "stop":
            del self.tokens[self.max_tokens:]
            reason = "length"
        text = self.service.decode(self.tokens)
        cuts = [text.find(s) for s in self.stops if s and s in text]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        if reason in ("timeout", "cancelled", "error"):
            self.error = reason
        if reason is not None:
            self.finish_reason = reason
            if event.finish_reason is None:
                self.sequence.cancel()  # finished early for the client: free the batch slot now
        return delta


class _Job:
    """The sequences of one HTTP request and the queue their block events arrive on."""

    def __init__(self, service: GenerationService, prompts: list[list[int]], config: GenerationConfig,
                 max_tokens: int | None, stop: str | list[str] | None, timeout: float | None):
        self.service, self.prompts, self.started = service, prompts, time.monotonic()
        self.events: asyncio.Queue = asyncio.Queue()
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.choices: list[_Choice] = []
        try:
            for index, prompt in enumerate(prompts):
                sequence = service.submit(prompt, config, self.events, index, timeout)
                self.choices.append(_Choice(service, sequence, max_tokens, stops))
        except ApiError:
            self.cancel()
            raise

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def cancel(self) -> None:
        for choice in self.choices:
            choice.sequence.cancel()

    async def updates(self, request: Request):
        """Yields (index, delta, finish_reason) per block event until every choice finished;
        a client that went away (checked at most every 0.5 s) cancels the job."""
        checked = time.monotonic()
        while not self.done:
            try:
                index, event = await asyncio.wait_for(self.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                index, event = None, None
            if time.monotonic() - checked >= 0.5:
                if await request.is_disconnected():
                    self.cancel()
                    return
                checked = time.monotonic()
            if event is None:
                continue
            choice = self.choices[index]
            was_open = choice.finish_reason is None
            delta = choice.absorb(event)
            if was_open:
                yield index, delta, choice.finish_reason
        self._record()

    def error(self) -> ApiError | None:
        reasons = {c.error for c in self.choices if c.error}
        if "error" in reasons:
            return ApiError(500, "the generation step failed; see the server log", "server_error", code="engine_error")
        if "timeout" in reasons:
            return ApiError(504, "the request did not finish within its timeout",
                            "timeout_error", code="request_timeout")
        return None

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stats(self) -> dict:
        steps = sum(c.sequence.steps for c in self.choices)
        committed = sum(c.sequence.committed for c in self.choices)
        return {"steps": steps, "tokens_per_step": committed / steps if steps else 0.0,
                "tokens": [c.tokens for c in self.choices]}

    def _record(self) -> None:
        usage = self.usage()
        self.service.prompt_tokens.inc(usage["prompt_tokens"])
        self.service.generated_tokens.inc(usage["completion_tokens"])
        self.service.request_latency.observe(time.monotonic() - self.started)


# -- HTTP -------------------------------------------------------------------------------------
def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(service: GenerationService) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.stop()

    app = FastAPI(title="difuse", lifespan=lifespan)

    def count(request: Request, status: int) -> None:
        service.requests.inc(endpoint=request.url.path, status=str(status))

    def reply(request: Request, error: ApiError) -> JSONResponse:
        count(request, error.status)
        return error.response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return reply(request, error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return reply(request, ApiError(400, f"the request body is not valid JSON: {first.get('msg')}",
                                           code="invalid_json"))
        # pydantic reports which union member failed (e.g. prompt.str); keep the field path only
        param = ".".join(p for p in location if p.isdigit() or p in _FIELD_NAMES) or None
        return reply(request, ApiError(422, f"{param or 'body'}: {first.get('msg')}", param=param,
                                       code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return reply(request, ApiError(error.status_code, str(error.detail), code="not_found"
                                       if error.status_code == 404 else None))

    def check_model(body: _Body) -> None:
        if body.model != service.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{service.model_name!r}", param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, "n > 1 is not supported: greedy decoding would return n identical choices",
                           param="n")
        if body.seed is not None:
            raise ApiError(400, "seed is not supported: sampled requests share the random stream of their batch",
                           param="seed")
        unsupported = {"logprobs": getattr(body, "logprobs", None) not in (None, False),
                       "echo": getattr(body, "echo", False), "suffix": getattr(body, "suffix", None) is not None,
                       "tools": bool(getattr(body, "tools", None))}
        for name, used in unsupported.items():
            if used:
                raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "queue_depth": service.batcher.queue_depth,
                "running": service.running_sequences}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.registry.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        count(request, 200)
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": service.created, "owned_by": "difuse"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        config = service.config_for(body, body.max_tokens)
        prompts = _completion_prompts(service, body.prompt)
        for prompt in prompts:
            service.check_length(prompt, config, "prompt")
        return await _respond(service, request, body, prompts, config, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        config = service.config_for(body, max_tokens)
        prompt = service.encode_chat(body.messages)
        service.check_length(prompt, config, "messages")
        return await _respond(service, request, body, [prompt], config, max_tokens, chat=True)

    return app


_FIELD_NAMES = set(CompletionRequest.model_fields) | set(ChatRequest.model_fields) | set(ChatMessage.model_fields) \
    | set(_TextPart.model_fields)


def _completion_prompts(service: GenerationService, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [service.encode_text(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [service.encode_ids(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [service.encode_text(p) for p in prompt]
    elif prompt:
        prompts = [service.encode_ids(p) for p in prompt]
    else:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if any(not p for p in prompts):
        raise ApiError(400, "prompt encodes to no tokens", param="prompt")
    return prompts


async def _respond(service: GenerationService, request: Request, body: _Body, prompts: list[list[int]],
                   config: GenerationConfig, max_tokens: int | None, chat: bool):
    job = _Job(service, prompts, config, max_tokens, body.stop, body.timeout)
    kind = "chat.completion" if chat else "text_completion"
    identity = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": service.model_name}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        service.requests.inc(endpoint=request.url.path, status="200")
        return StreamingResponse(_stream(job, request, identity, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        async for _ in job.updates(request):
            pass
    finally:
        job.cancel()  # a handler cancelled by a disconnect must not leave its rows running
    error = job.error()
    if error is not None:
        raise error
    choices = []
    for index, choice in enumerate(job.choices):
        answer = {"message": {"role": "assistant", "content": choice.text}} if chat else \
            {"text": choice.text, "logprobs": None}
        choices.append({"index": index, **answer, "finish_reason": choice.finish_reason})
    service.requests.inc(endpoint=request.url.path, status="200")
    return {**identity, "object": kind, "choices": choices, "usage": job.usage(), "difuse": job.stats()}


async def _stream(job: _Job, request: Request, identity: dict, chat: bool, include_usage: bool):
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, delta: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if chat:
            content = ({"role": "assistant", "content": ""} if role else {}) | \
                ({"content": delta} if delta else {})
            choice = {"index": index, "delta": content, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        return {**identity, "object": chunk_kind, "choices": [choice]}

    try:
        if chat:
            for index in range(len(job.choices)):
                yield _sse(chunk(index, None, None, role=True))
        async for index, delta, finish_reason in job.updates(request):
            if job.choices[index].error:
                break
            if delta or finish_reason:
                yield _sse(chunk(index, delta, finish_reason))
        error = job.error()
        if error is not None:
            yield _sse(error.body())
        elif include_usage:
            yield _sse({**identity, "object": chunk_kind, "choices": [], "usage": job.usage()})
        yield _sse("[DONE]")
    finally:
        job.cancel()  # the client went away, or the stream ended: free the batch slots


# -- command line -----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difuse serve", description="OpenAI-compatible server with "
                                     "block-level dynamic batching.")
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--model-name", help="the id clients pass as `model` (default: the folder name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--no-fusion", action="store_true", help="run the denoise step eagerly")
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 avoids "
                        "OpenMP spin-waiting on a shared, oversubscribed CPU")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows of one running batch")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    parser.add_argument("--max-workspaces", type=int, default=4,
                        help="(batch, length) buckets kept with their KV caches and recordings (LRU)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    defaults = GenerationConfig()
    parser.add_argument("--gen-length", type=int, default=defaults.gen_length, help="default gen_length")
    parser.add_argument("--block-length", type=int, default=defaults.block_length)
    parser.add_argument("--decoder", choices=DECODERS, default=defaults.decoder)
    parser.add_argument("--threshold", type=float, default=defaults.threshold)
    parser.add_argument("--cache", choices=CACHES, help="default cache: prefix with block_diffusion, else none")
    parser.add_argument("--iteration", choices=ITERATIONS,
                        help="default iteration: block_diffusion for block-causal models (LLaDA2), else blockwise")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def main(argv: list[str] | None = None) -> int:
    import sys
    from pathlib import Path

    import uvicorn

    from difuse.models import default_model_path, generation_defaults
    from difuse.runtime.engine import Engine

    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    try:
        iteration, cache = iteration_and_cache(args.iteration, args.cache,
                                               generation_defaults(args.model or default_model_path()))
        defaults = GenerationConfig(gen_length=args.gen_length, block_length=args.block_length, decoder=args.decoder,
                                    threshold=args.threshold, cache=cache, iteration=iteration,
                                    steps=args.gen_length if args.decoder in ("fixed", "random") else None)
        engine = Engine.from_pretrained(args.model, args.device, dtype, not args.no_fusion, not args.no_cuda_graph)
        name = args.model_name or Path(args.model or "difuse-builtin").resolve().name
        service = GenerationService(engine, name, defaults, args.max_batch_size, args.max_queue,
                                    args.request_timeout, args.max_workspaces)
    except ValueError as error:
        print(f"difuse serve: error: {error}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)
    return 0
