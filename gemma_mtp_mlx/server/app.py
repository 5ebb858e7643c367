"""The HTTP layer: FastAPI routes in OpenAI's shapes, server-sent events, JSON errors."""

import asyncio
import json
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, List, Optional, Union

import mlx.core as mx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..adaptive import AUTO
from ..batch import BatchEngine
from ..generate import encode_prompt
from ..distributed import load_sharded, world
from ..loading import DEFAULT_MODEL
from ..structured.grammar import grammar_processor
from ..validate import MAX_NUM_DRAFT_TOKENS
from . import lockstep
from .prompt_cache import PromptCache
from .chat import chat_prompt, tool_format
from .protocol import BadRequest, ChatRequest, CompletionRequest, GenerationFields, error_body, now
from .shapes import ChatShape, CompletionShape
from .worker import Delta, Job, Worker

ENDPOINTS = "/health, /metrics, /v1/models, /v1/completions, /v1/chat/completions"


@dataclass
class Served:
    """What the generation thread loaded, for the handlers."""

    engine: object
    tokenizer: object
    max_context: int
    vocab_size: int
    num_draft_tokens: Union[int, str]  # the server's default per request ("auto" or k); 0 without a drafter
    max_tokens: int  # per request, when it does not say


def create_app(worker: Worker, model_name: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="gemma-mtp", lifespan=lifespan)
    add_error_handlers(app)

    def served() -> Served:
        if worker.load_error:
            raise BadRequest(worker.load_error, status=503)
        if not worker.ready.is_set():
            raise BadRequest("the model is still loading: retry in a few seconds", status=503)
        return worker.served

    @app.get("/health")
    async def health():
        served()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        served()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                            "owned_by": "gemma-mtp"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(worker), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        s = served()
        prompt = completion_prompt(s, body.prompt)
        job = make_job(s, body, prompt, top_logprobs=body.logprobs or 0, want_logprobs=body.logprobs is not None)
        return await respond(worker, job, body, request, CompletionShape(model_name, job.want_logprobs))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        s = served()
        prompt = chat_prompt(s, body, model_name)
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        job = make_job(s, body, prompt, top_logprobs=top, want_logprobs=body.logprobs)
        return await respond(worker, job, body, request, ChatShape(model_name, job.want_logprobs, bool(body.tools)))

    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        kind = "invalid_request_error" if e.status == 400 else "service_unavailable"
        return JSONResponse(error_body(str(e), kind, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_fields(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]
        if first["type"] == "json_invalid":
            message = "the request body is not valid JSON"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        if e.status_code == 404:
            message = f"no such path: {request.url.path} (the endpoints are {ENDPOINTS})"
            return JSONResponse(error_body(message, "not_found_error"), status_code=404)
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {e}", "server_error"), status_code=500)


def completion_prompt(s: Served, prompt) -> List[int]:
    if isinstance(prompt, list):
        vocab = s.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"prompt: token ids must be in [0, {vocab}), got {bad[0]}", param="prompt")
    try:
        return encode_prompt(s.tokenizer, prompt).tolist()
    except ValueError as e:
        raise BadRequest(str(e), param="prompt")


def make_job(s: Served, body: GenerationFields, prompt: List[int], top_logprobs: int,
             want_logprobs: bool) -> Job:
    try:
        stop = body.stop_strings()
    except ValueError as e:
        raise BadRequest(str(e), param="stop")
    response_format = tool_format(s, body)
    try:  # compiled again for the row; here so that a bad format is a 400 naming its field
        grammar_processor(s.tokenizer, response_format, s.vocab_size)
    except ValueError as e:
        raise BadRequest(str(e), param="response_format")
    max_tokens = body.token_limit(s.max_tokens)
    if len(prompt) + max_tokens > s.max_context:
        raise BadRequest(f"the prompt has {len(prompt)} tokens and up to {max_tokens} more were asked for: "
                         f"together more than the model's context of {s.max_context} tokens; shorten the "
                         "prompt or lower max_tokens", param="messages" if isinstance(body, ChatRequest) else "prompt")
    options = dict(max_tokens=max_tokens, temp=body.temperature, top_p=body.top_p, top_k=body.top_k,
                   min_p=body.min_p, seed=body.seed, repetition_penalty=body.repetition_penalty,
                   presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                   num_draft_tokens=body.num_draft_tokens if s.num_draft_tokens else None,  # plain: no k
                   response_format=response_format)
    k = (body.num_draft_tokens or s.num_draft_tokens) if s.num_draft_tokens else 0
    tokenizer = s.tokenizer
    return Job(prompt, options, stop, top_logprobs, want_logprobs, tokenizer.detokenizer,
               lambda t: tokenizer.decode([t]), set(tokenizer.eos_token_ids), k, asyncio.get_running_loop())


async def next_delta(worker: Worker, job: Job, request: Request) -> Optional[Delta]:
    """The job's next delta, or None if the client went away (its row is then removed)."""
    while True:
        try:
            return await asyncio.wait_for(job.queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                worker.cancel(job)
                return None


async def respond(worker: Worker, job: Job, body: GenerationFields, request: Request, shape):
    worker.submit(job)
    first = await next_delta(worker, job, request)
    if first is None:
        return JSONResponse(error_body("the client went away"), status_code=499)
    if first.error:
        return error_response(first)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_events(worker, job, first, shape, include_usage),
                                 media_type="text/event-stream")
    deltas = [first]
    while deltas[-1].finish_reason is None:
        delta = await next_delta(worker, job, request)
        if delta is None:
            return JSONResponse(error_body("the client went away"), status_code=499)
        deltas.append(delta)
    if deltas[-1].error:
        return error_response(deltas[-1])
    return shape.whole(deltas)


def error_response(delta: Delta) -> JSONResponse:
    kind = "invalid_request_error" if delta.status == 400 else "server_error"
    return JSONResponse(error_body(delta.error, kind), status_code=delta.status)


async def stream_events(worker: Worker, job: Job, first: Delta, shape, include_usage: bool) -> AsyncIterator[str]:
    """SSE: one chunk per delta, then the usage chunk if asked, then [DONE]. If the
    client disconnects, the task running this is cancelled and the row is removed."""
    try:
        delta = first
        for payload in shape.chunks(None, include_usage):  # the opening chunk (chat: the role)
            yield sse(payload)
        while True:
            if delta.error:
                yield sse(error_body(delta.error, "server_error"))
                return
            if delta.text or delta.tokens or delta.finish_reason:
                for payload in shape.chunks(delta, include_usage):
                    yield sse(payload)
            if delta.finish_reason:
                break
            delta = await job.queue.get()
        if include_usage:
            yield sse(shape.usage_chunk(delta.usage))
        yield "data: [DONE]\n\n"
    finally:
        if not job.done:
            worker.cancel(job)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def metrics_text(worker: Worker) -> str:
    """Prometheus' text format."""
    c, engine = worker.counters, worker.engine
    lines = []

    def metric(name: str, kind: str, help_: str, value, labels: str = ""):
        if not any(line.startswith(f"# HELP gemma_mtp_{name} ") for line in lines):
            lines.append(f"# HELP gemma_mtp_{name} {help_}")
            lines.append(f"# TYPE gemma_mtp_{name} {kind}")
        lines.append(f"gemma_mtp_{name}{labels} {value}")

    metric("ready", "gauge", "1 once the model is loaded", int(worker.ready.is_set() and not worker.load_error))
    for reason, n in sorted(c.requests.items()) or [("stop", 0)]:
        metric("requests_total", "counter", "finished requests by finish reason", n, f'{{finish_reason="{reason}"}}')
    metric("prompt_tokens_total", "counter", "prompt tokens of finished requests", c.prompt_tokens)
    metric("cached_prompt_tokens_total", "counter", "prompt tokens taken from the prompt cache", c.cached_tokens)
    metric("completion_tokens_total", "counter", "tokens generated", c.completion_tokens)
    metric("rounds_total", "counter", "speculative rounds", c.rounds)
    metric("drafted_tokens_total", "counter", "tokens drafted", c.drafted_tokens)
    metric("accepted_tokens_total", "counter", "drafted tokens the target accepted", c.accepted_tokens)
    mean = c.accepted_tokens / c.rounds + 1 if c.rounds else 0.0
    metric("mean_accepted_length", "gauge", "tokens per round over all finished requests", f"{mean:.4f}")
    metric("queue_length", "gauge", "requests waiting for a row", engine.num_waiting if engine else 0)
    metric("batch_size", "gauge", "rows generating now", engine.num_active if engine else 0)
    cache = getattr(engine, "prompt_cache", None)
    metric("prompt_cache_entries", "gauge", "entries in the prompt cache", len(cache.entries) if cache else 0)
    metric("prompt_cache_bytes", "gauge", "bytes held by the prompt cache", cache.nbytes if cache else 0)
    metric("memory_active_bytes", "gauge", "MLX memory in use", mx.get_active_memory())
    metric("memory_idle_bytes", "gauge", "MLX memory in use right after loading", worker.idle_memory)
    return "\n".join(lines) + "\n"


def check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    k = args.num_draft_tokens
    if k is not None and k != AUTO and not 1 <= k <= MAX_NUM_DRAFT_TOKENS:
        raise ValueError(f"--num-draft-tokens must be in [1, {MAX_NUM_DRAFT_TOKENS}] or auto, got {k}")
    for name in ("max_batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("prompt_cache_size", "prompt_cache_bytes"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 disables the cache)")


def loader(args, group):
    """What the generation thread runs first: load the pair (rank 0's share of it under
    mlx.launch), build the engine."""

    def load_served() -> Served:
        model, tokenizer, drafter = load_sharded(args.model, args.draft_model, no_draft=args.no_draft, group=group)
        k = (args.num_draft_tokens or drafter.default_num_draft_tokens) if drafter is not None else 0
        cache = PromptCache(args.prompt_cache_size, args.prompt_cache_bytes)
        engine = BatchEngine(model, tokenizer, drafter, num_draft_tokens=k or None,
                             max_batch_size=args.max_batch_size, prompt_cache=cache)
        return Served(engine, tokenizer, model.args.max_position_embeddings, model.args.vocab_size, k,
                      args.max_tokens)

    return load_served


def serve(args) -> None:
    """Serve on this process, or under mlx.launch on rank 0 while the other ranks follow it."""
    check_args(args)
    group = world()
    load_served = loader(args, group)
    if group.rank() != 0:
        lockstep.follow(lambda: load_served().engine, group)
        os._exit(0)  # rank 0 is stopping too: skip the interpreter's teardown, which the launcher may cut short
    name = args.model or DEFAULT_MODEL.name
    worker = Worker(load_served) if group.size() == 1 else lockstep.LockstepWorker(load_served, group)
    config = uvicorn.Config(create_app(worker, name), host=args.host, port=args.port, access_log=False,
                            log_level="debug" if args.debug else "info")
    server = uvicorn.Server(config)
    worker.on_load_error = lambda: setattr(server, "should_exit", True)
    ranks = f" over {group.size()} ranks" if group.size() > 1 else ""
    print(f"gemma-mtp: serving {name}{ranks} on http://{args.host}:{args.port}/v1 (loading; /health answers 200 "
          "when ready)", flush=True)
    server.run()
    if worker.load_error:
        raise ValueError(worker.load_error)
