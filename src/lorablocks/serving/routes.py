"""The HTTP endpoints: OpenAI-compatible completions (whole or streamed as server-sent events) and the live
composition (``/v1/blocks``). Generations run on the engine: the
:class:`~lorablocks.serving.scheduler.Scheduler` (continuous batching, the read lock one step at a time) or the
:class:`~lorablocks.serving.live.Runner` (a thread per generation, the read lock throughout); changes run on
FastAPI's thread pool and take the write lock."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from lorablocks.errors import one_line
from lorablocks.serving.api import (ChatRequest, CompletionRequest, PostBlock, PutBlocks, chat_object,
                                    completion_object, new_id, sampling_params, usage)
from lorablocks.serving.errors import RequestError, ServerBusyError, describe
from lorablocks.serving.generation import (Chunk, SamplingParams, check_length, encode_chat, encode_prompt,
                                           generate_stream, tokens_left)
from lorablocks.serving.guard import Access, log_error
from lorablocks.serving.live import ChangeReport, LiveModel, Runner
from lorablocks.serving.scheduler import Scheduler
from lorablocks.serving.unmerged import RequestCompositions, RowComposition

__all__ = ["FINGERPRINT_HEADER", "AppSettings", "add_routes"]

FINGERPRINT_HEADER = "X-Lorablocks-Fingerprint"

#: what runs generations: ``start(job)``, ``stopping``, ``failure``, ``shutdown()``
Engine = Union[Scheduler, Runner]


@dataclass(frozen=True)
class AppSettings:
    """What the HTTP layer needs besides the live model."""

    model_name: str = "lorablocks"
    #: keys, accepted Host names, body limit (see :mod:`lorablocks.serving.guard`)
    access: Access = field(default_factory=Access)
    max_tokens_limit: int = 512
    #: ``max_tokens`` of a completion that gives none (OpenAI's default is 16); chat: the limit. Either is
    #: cut to what the context leaves after the prompt (an explicit ``max_tokens`` that does not fit is refused)
    default_max_tokens: int = 16
    #: per-request compositions (``"model": "math+medicine:0.5"``) held at once; 0: off (the thread-per-generation
    #: engine has none)
    max_compositions: int = 4


# ------------------------------------------------------------------------------------------ generation


class _Job:
    """One generation on the engine (its own worker thread, or the scheduler's batch), handing its events to the
    request's event loop."""

    def __init__(self, live: LiveModel, runner: Engine, ids: list[int], params: SamplingParams,
                 composition: Optional[RowComposition] = None, release: Any = None) -> None:
        self.live, self.runner, self.ids, self.params = live, runner, ids, params
        self.composition, self._release = composition, release
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()

    def release(self) -> None:
        """Let go of the per-request composition (once; the engine ended the job or never took it)."""
        release, self._release = self._release, None
        if release is not None and self.composition is not None:
            release(self.composition)

    def put(self, kind: str, value: Any = None) -> None:
        if kind == "end":
            self.release()
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone: nobody listens any more
            self.cancelled.set()

    def _stop(self) -> bool:
        return self.cancelled.is_set() or self.runner.stopping.is_set()

    def run(self) -> None:
        try:
            if self._stop():
                return
            model, tokenizer = self.live.composed.model, self.live.composed.tokenizer
            with self.live.reading() as fingerprint:
                self.put("start", fingerprint)
                for chunk in generate_stream(model, tokenizer, self.ids, self.params, should_stop=self._stop):
                    self.put("chunk", chunk)
        except Exception as exc:  # reported to the client as one line
            self.put("error", exc)
        finally:
            self.put("end")

    async def start(self) -> str:
        """Queue the job and wait until it runs; its composition's fingerprint."""
        try:
            self.runner.start(self)
        except BaseException:  # the engine never took it: nothing will end it
            self.release()
            raise
        kind, value = await self.events.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise ServerBusyError("the server is stopping")
        return value

    async def chunks(self) -> AsyncIterator[Chunk]:
        while True:
            kind, value = await self.events.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value


async def _start(live: LiveModel, runner: Engine, ids: list[int], params: SamplingParams,
                 compositions: RequestCompositions, spec: Optional[str]) -> tuple[_Job, str]:
    """Queue a generation on the default composition (``spec`` None) or on the composition ``spec`` names."""
    composition = None if spec is None else await run_in_threadpool(compositions.acquire, spec)
    job = _Job(live, runner, ids, params, composition, compositions.release)
    try:
        return job, await job.start()
    except BaseException:
        job.cancelled.set()
        raise


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"


@dataclass(frozen=True)
class _Render:
    """Builds the response objects of one request (completion or chat)."""

    chat: bool
    rid: str
    model: str
    fingerprint: str

    def piece(self, text: Optional[str], finish: Optional[str], role: bool = False) -> str:
        if self.chat:
            return _sse(chat_object(self.rid, self.model, self.fingerprint, text, finish, chunk=True, role=role))
        return _sse(completion_object(self.rid, self.model, self.fingerprint, text or "", finish))

    def whole(self, text: str, finish: str, prompt_tokens: int, tokens: int) -> dict[str, Any]:
        build = chat_object if self.chat else completion_object
        return {**build(self.rid, self.model, self.fingerprint, text, finish), "usage": usage(prompt_tokens, tokens)}

    def usage_chunk(self, prompt_tokens: int, tokens: int) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({"id": self.rid, "object": kind, "created": int(time.time()), "model": self.model,
                     "system_fingerprint": self.fingerprint, "choices": [], "usage": usage(prompt_tokens, tokens)})


async def _events(job: _Job, render: _Render, prompt_tokens: int, include_usage: bool,
                  path: str) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion; the generation stops if the client goes away."""
    tokens = 0
    try:
        if render.chat:
            yield render.piece("", None, role=True)
        async for chunk in job.chunks():
            tokens = chunk.tokens or tokens
            if render.chat and chunk.finish_reason:
                if chunk.text:
                    yield render.piece(chunk.text, None)
                yield render.piece(None, chunk.finish_reason)
            else:
                yield render.piece(chunk.text, chunk.finish_reason)
        if include_usage:
            yield render.usage_chunk(prompt_tokens, tokens)
        yield "data: [DONE]\n\n"
    except Exception as exc:  # after the headers: the error goes into the stream (and one line into the log)
        status, body = describe(exc)
        log_error("POST", path, status, body["error"]["message"])
        yield _sse(body)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


def _fit_context(live: LiveModel, prompt_tokens: int, params: SamplingParams, given: Optional[int],
                 prompt_field: str) -> SamplingParams:
    """``params`` whose ``max_new_tokens`` fits the context after the prompt: a default is cut to fit (as vLLM
    does), an explicit ``max_tokens`` that does not fit is refused; a prompt that fills the context too."""
    model = live.composed.model
    left = tokens_left(model, prompt_tokens, setting=prompt_field)
    if given is not None:
        check_length(model, prompt_tokens, given, setting="max_tokens", prompt_setting=prompt_field)
        return params
    if left is not None and params.max_new_tokens > left:
        return dataclasses.replace(params, max_new_tokens=left)
    return params


async def _cancel_on_disconnect(request: Request, job: _Job) -> None:
    """Cancel ``job`` once its client is gone (a whole answer sends nothing before its end, so nothing else
    would notice: the generation would keep its place in the batch to its last token)."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(0.05)


async def _respond(live: LiveModel, runner: Engine, settings: AppSettings, compositions: RequestCompositions,
                   ids: list[int], params: SamplingParams, req: Any, chat: bool, request: Request) -> Any:
    spec = None if _names_default(live, settings, compositions, req.model) else req.model
    job, fingerprint = await _start(live, runner, ids, params, compositions, spec)
    render = _Render(chat, new_id("chatcmpl" if chat else "cmpl"), spec or settings.model_name, fingerprint)
    headers = {FINGERPRINT_HEADER: fingerprint}
    if req.stream:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return StreamingResponse(_events(job, render, len(ids), req.include_usage(), path),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    parts, finish, tokens = [], "length", 0
    watch = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        async for chunk in job.chunks():
            parts.append(chunk.text)
            finish, tokens = chunk.finish_reason or finish, chunk.tokens or tokens
    finally:
        job.cancelled.set()
        watch.cancel()
    return JSONResponse(render.whole("".join(parts), finish, len(ids), tokens), headers=headers)


def _names_default(live: LiveModel, settings: AppSettings, compositions: RequestCompositions,
                   model: Optional[str]) -> bool:
    """Whether a request's ``model`` means the default composition: none, the served name, or the base model (its
    built-in name or hub id); anything else is read as a composition of blocks."""
    from lorablocks.model.models import same_base_model

    if model in (None, "", settings.model_name):
        return True
    base = live.composed.model_id
    return bool(base) and same_base_model(model, base) and not compositions.is_block(model)


def _changed(report: ChangeReport) -> JSONResponse:
    active = [{"name": b.name, "weight": b.weight} for b in report.active]
    body = {"available": list(report.available), "active": active,
            "fingerprint": report.fingerprint, "seconds": report.seconds, "locked_seconds": report.locked_seconds}
    return JSONResponse(body, headers={FINGERPRINT_HEADER: report.fingerprint})


def add_routes(app: FastAPI, live: LiveModel, runner: Engine, settings: AppSettings) -> None:
    """Register every endpoint on ``app``."""
    tokenizer, started = live.composed.tokenizer, int(time.time())
    compositions = RequestCompositions(live, getattr(runner, "row_hooks", None), settings.max_compositions)

    @app.get("/health")
    def health() -> Any:
        failure = runner.failure  # the engine stopped (the scheduler's decoding thread): this server cannot answer
        if failure is not None:
            return JSONResponse({"status": "failed", "error": one_line(failure), "fingerprint": live.fingerprint},
                                status_code=500)
        return {"status": "ok", "fingerprint": live.fingerprint, "compositions": compositions.usage()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        """The server's model (its default composition) and, where requests may name compositions, each block
        (a composition of one; vLLM lists its LoRA adapters the same way, with ``parent``)."""
        blocks = live.library.names() if compositions.limit else []
        return {"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": started, "owned_by": "lorablocks"},
            *({"id": n, "object": "model", "created": started, "owned_by": "lorablocks",
               "parent": settings.model_name} for n in blocks)]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise RequestError(f"send one prompt per request, got {len(prompts)}", setting="prompt")
        params = sampling_params(req, req.max_tokens, settings.default_max_tokens, settings.max_tokens_limit)
        ids = await run_in_threadpool(encode_prompt, tokenizer, prompts[0], "raw")  # off the event loop
        params = _fit_context(live, len(ids), params, req.max_tokens, "prompt")
        return await _respond(live, runner, settings, compositions, ids, params, req, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        given = req.requested_max_tokens()
        params = sampling_params(req, given, settings.max_tokens_limit, settings.max_tokens_limit)
        ids = await run_in_threadpool(encode_chat, tokenizer, req.template_messages())  # off the event loop
        params = _fit_context(live, len(ids), params, given, "messages")
        return await _respond(live, runner, settings, compositions, ids, params, req, chat=True, request=request)

    @app.get("/v1/blocks")
    def get_blocks() -> JSONResponse:
        state = live.state()
        return JSONResponse(state, headers={FINGERPRINT_HEADER: state["fingerprint"]})

    @app.put("/v1/blocks")
    def put_blocks(body: PutBlocks) -> JSONResponse:
        return _changed(live.set_active([(b.name, b.weight) for b in body.active]))

    @app.post("/v1/blocks/{name:path}")
    def post_block(name: str, body: Optional[PostBlock] = None) -> JSONResponse:
        return _changed(live.add(name, (body or PostBlock()).weight))

    @app.delete("/v1/blocks/{name:path}")
    def delete_block(name: str) -> JSONResponse:
        return _changed(live.remove(name))
