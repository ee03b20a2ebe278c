"""The OpenAI-compatible FastAPI app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health`` and ``/metrics`` over a :class:`~amendlm.serve.engine.Engine`.

A request is checked whole before anything is queued (model, fields, chat template, context
length, queue room), so every refusal is a JSON error with its status; only then does it become
one :class:`~amendlm.serve.engine.Job` per prompt.  Streaming answers are server-sent events, one
``data: {chunk}`` per text delta, ending in ``data: [DONE]``; a client that leaves mid-stream
cancels its jobs (the worker drops their rows at the next step).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from amendlm.ram.data import encode_prompt
from amendlm.serve.engine import Engine, EngineStopped, Event, Job, QueueFull
from amendlm.serve.errors import APIError, error_body, install_error_handlers
from amendlm.serve.metrics import RequestCounter, prometheus_text
from amendlm.serve.models import ServedModel
from amendlm.serve.rows import Sampling
from amendlm.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields


def create_app(served: dict[str, ServedModel], engine: Engine, default_max_tokens: int = 128,
               shutdown_timeout: float = 30.0) -> FastAPI:
    """The app serving ``served`` through ``engine`` (started and stopped with the app's lifespan).

    Args:
        default_max_tokens: completion length when a request gives no ``max_tokens`` (cut to the context left).
        shutdown_timeout: seconds the whole shutdown may take: the engine's running batch gets what is
            left of it once the server has stopped (``app.state.shutdown_began``, a ``time.monotonic()``
            set when the signal arrived, see :func:`amendlm.serve.server.uvicorn_server`; unset: all of it).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.shutdown_began = None
        engine.start()
        yield
        began = app.state.shutdown_began
        left = shutdown_timeout if began is None else max(0.0, shutdown_timeout - (time.monotonic() - began))
        await asyncio.to_thread(engine.stop, left)

    app = FastAPI(title="amendlm", summary="OpenAI-compatible server for a model, an adapter, or a proposal with aligners",
                  lifespan=lifespan)
    install_error_handlers(app)
    counter = RequestCounter()
    app.add_middleware(RequestCounter.Middleware, counter=counter)
    created = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served), "queue_length": engine.queue_length()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(prometheus_text(counter, engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": m.id, "object": "model", "created": created, "owned_by": "amendlm",
             "context_length": m.context_length, "mode": m.decode.mode, "source": m.source} for m in served.values()]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = _served(served, body.model)
        if body.echo:
            raise APIError(400, "echo is not implemented", param="echo")
        prompts = _completion_prompts(model, body.prompt)
        return await _answer(request, engine, model, body, prompts, _limit(body.max_tokens, default_max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = _served(served, body.model)
        limit = _limit(body.max_completion_tokens or body.max_tokens, default_max_tokens)
        return await _answer(request, engine, model, body, [_chat_prompt(model, body)], limit, chat=True)

    return app


def _limit(requested: int | None, default: int) -> tuple[int, bool]:
    return (requested, True) if requested is not None else (default, False)


def _served(served: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in served:
        raise APIError(404, f"model '{name}' not found; valid models: {', '.join(served)}", param="model",
                       code="model_not_found")
    return served[name]


def _completion_prompts(model: ServedModel, prompt) -> list[list[int]]:
    """Token ids of each prompt: a text gets the start token (as ``amendlm align generate --no-chat-template``)."""
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    prompts = []
    for item in items:
        ids = encode_prompt(model.tokenizer, item, chat_template=False) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "prompt has no tokens", param="prompt")
        if bad := [t for t in ids if not 0 <= t < model.vocab_size]:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})", param="prompt")
        prompts.append(ids)
    return prompts


def _chat_prompt(model: ServedModel, body: ChatCompletionRequest) -> list[int]:
    """The conversation rendered by the model's chat template with the assistant's turn opened."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model '{model.id}' has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template itself refuses (e.g. an unknown role)
        raise APIError(400, f"the chat template refused the messages: {str(err).splitlines()[0]}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _jobs_config(model: ServedModel, body: SamplingFields, prompt_len: int, limit: tuple[int, bool]):
    """``(DecodeConfig, Sampling)`` of one prompt, or a 400 naming the field (context length included)."""
    overrides = body.decode_overrides()
    if model.aligner is None and overrides.get("mode", "proposal") != "proposal":
        raise APIError(400, f"model '{model.id}' has no aligner, so mode must be 'proposal' (got '{overrides['mode']}'); "
                            "ask for a 'model+ALIGNER' id of /v1/models", param="mode")
    try:
        decode = replace(model.decode, **overrides)
    except (ValueError, KeyError) as err:
        message = str(err).strip("'\"")
        raise APIError(400, message, param=next((k for k in overrides if k in message), None)) from None
    max_tokens, given = limit
    room = model.context_length - prompt_len
    if given and max_tokens > room:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds "
                            f"the context length {model.context_length} of model '{model.id}'", param="max_tokens",
                       code="context_length_exceeded")
    if room < 1:
        raise APIError(400, f"prompt ({prompt_len} tokens) leaves no room in the context length {model.context_length} "
                            f"of model '{model.id}'", param="prompt", code="context_length_exceeded")
    sampling = Sampling(max_tokens=min(max_tokens, room), temperature=body.temperature, top_p=body.top_p,
                        seed=body.seed, stop=body.stop_strings())
    return decode, sampling


async def _answer(request: Request, engine: Engine, model: ServedModel, body: SamplingFields,
                  prompts: list[list[int]], limit: tuple[int, bool], chat: bool):
    if chat and len(prompts) != 1:
        raise APIError(400, "a chat completion has one conversation", param="messages")
    configs = [_jobs_config(model, body, len(p), limit) for p in prompts]
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emitter(index: int):
        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                pass
        return emit

    if len(prompts) > engine.max_queue:
        raise APIError(400, f"{len(prompts)} prompts can never fit the queue (--max-queue {engine.max_queue}); "
                            "send fewer per request", param="prompt")
    jobs = [Job(model, p, decode, sampling, emitter(i)) for i, (p, (decode, sampling)) in enumerate(zip(prompts, configs))]
    try:
        for job in jobs:
            engine.submit(job)
    except (QueueFull, EngineStopped) as err:
        for job in jobs:
            job.cancel()
        if isinstance(err, EngineStopped):
            raise APIError(503, str(err), type="server_error", code="shutting_down") from None
        raise APIError(503, f"server busy: {err}; retry later", type="server_overloaded", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    kind = "chat.completion" if chat else "text_completion"
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.id}
    usage = {"prompt_tokens": sum(len(p) for p in prompts)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(jobs, events, meta, kind, chat, usage, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, reasons, counts = await _collect(request, jobs, events)
    usage.update(completion_tokens=sum(counts), total_tokens=usage["prompt_tokens"] + sum(counts))
    if chat:
        choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                    "finish_reason": reasons[0]}]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    return JSONResponse({**meta, "object": kind, "choices": choices, "usage": usage})


DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


async def _collect(request: Request, jobs: list[Job], events: asyncio.Queue):
    """Wait for every job's end; a client that leaves cancels them.

    A watcher task checks the connection every :data:`DISCONNECT_POLL_S` seconds, whatever events
    arrive meanwhile (the worker emits one per step), and wakes the loop when the client has gone.
    """
    n = len(jobs)
    texts, reasons, counts = [""] * n, [None] * n, [0] * n

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        events.put_nowait((None, None))

    watcher = asyncio.create_task(watch())
    try:
        while any(r is None for r in reasons):
            index, event = await events.get()
            if index is None:  # the client left
                return texts, reasons, counts
            if event.error:
                raise APIError(event.status, event.error, type="server_error",
                               code="shutting_down" if event.status == 503 else None,
                               headers={"Retry-After": "1"} if event.status == 503 else None)
            texts[index] = event.full_text if event.full_text is not None else texts[index] + event.text
            counts[index] = event.completion_tokens
            reasons[index] = event.finish_reason
        return texts, reasons, counts
    finally:
        watcher.cancel()
        for job, reason in zip(jobs, reasons):
            if reason is None:
                job.cancel()


async def _stream(jobs: list[Job], events: asyncio.Queue, meta: dict, kind: str, chat: bool, usage: dict, include_usage: bool):
    """Server-sent events: chunks as OpenAI's (``chat.completion.chunk`` / ``text_completion``), then ``[DONE]``."""
    chunk_kind = "chat.completion.chunk" if chat else kind
    done, counts = [False] * len(jobs), [0] * len(jobs)

    def chunk(choices, **extra) -> str:
        return f"data: {json.dumps({**meta, 'object': chunk_kind, 'choices': choices, **extra})}\n\n"

    def choice(index: int, text: str | None, reason: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

    try:
        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        while not all(done):
            index, event = await events.get()
            if event.error:
                yield f"data: {json.dumps(error_body(event.error, 'server_error'))}\n\n"
                break
            counts[index] = event.completion_tokens
            if event.text:
                yield chunk([choice(index, event.text, None)])
            if event.finish_reason:
                done[index] = True
                yield chunk([choice(index, None, event.finish_reason)])
        if include_usage:
            completion = sum(counts)
            yield chunk([], usage={**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion})
        yield "data: [DONE]\n\n"
    finally:  # also reached when the client leaves (the response is cancelled) or the generator is closed
        for job, finished in zip(jobs, done):
            if not finished:
                job.cancel()
