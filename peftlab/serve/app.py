"""The HTTP API: OpenAI's completions and chat completions, vLLM's adapter loading and classify shapes, health
and Prometheus metrics. Every bad request gets its status code and a one-line message; none stops the server."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftlab.errors import PeftlabError
from peftlab.methods.inject import BASE_NAME
from peftlab.serve.engine import Engine, QueueFull, check_under_root
from peftlab.serve.engine import Request as Job


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class Sampling(BaseModel):
    """What completions and chat completions share (OpenAI's defaults)."""

    model: str
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # {"include_usage": true}: a last chunk with the usage


class CompletionBody(Sampling):
    prompt: str | list[str]
    max_tokens: int = 16


class ChatBody(Sampling):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    lora_name: str


class ClassifyBody(BaseModel):
    model: str
    input: str | list[str]


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("peftlab_requests", "requests by endpoint, adapter and status",
                                ["endpoint", "adapter", "status"], registry=self.registry)
        self.tokens = Counter("peftlab_generated_tokens", "completion tokens generated", ["adapter"],
                              registry=self.registry)
        self.latency = Histogram("peftlab_request_seconds", "request latency", ["endpoint"], registry=self.registry)
        self.queue = Gauge("peftlab_queue_length", "requests waiting for the model", registry=self.registry)
        self.batch = Histogram("peftlab_batch_size", "requests per generated batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))


def build_app(engine: Engine, api_key: str | None = None, allow_loading: bool = False,
              adapter_root: str | None = None, request_timeout: float = 300) -> FastAPI:
    """The FastAPI application over `engine`."""
    app = FastAPI(title="peftlab serve")
    metrics = Metrics()
    seen_batches = [0]

    def error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, kind), status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return error(e.status, e.message, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), "invalid_request_error")

    @app.middleware("http")
    async def authorize_and_count(request: Request, call_next):
        started = time.perf_counter()
        if api_key and request.url.path not in ("/health", "/metrics"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error")
        response = await call_next(request)
        metrics.latency.labels(request.url.path).observe(time.perf_counter() - started)
        return response

    def adapter_of(name: str) -> str:
        if name == engine.base_name or name == BASE_NAME:
            return BASE_NAME
        if name not in engine.adapters:
            raise ApiError(404, f"model {name!r} is not served; served: {[engine.base_name, *engine.adapters]}",
                           "not_found_error")
        return name

    def count(endpoint: str, adapter: str, status: int) -> None:
        metrics.requests.labels(endpoint, adapter, str(status)).inc()

    def submit(jobs: list[Job]) -> None:
        """All of the jobs queued, or none (503 when the queue is full)."""
        for i, job in enumerate(jobs):
            try:
                engine.submit(job)
            except QueueFull as e:
                for queued in jobs[:i]:
                    queued.cancel()
                raise ApiError(503, str(e), "server_busy", {"Retry-After": "1"}) from None
        metrics.queue.set(engine.queue.qsize())

    def observe_batches() -> None:
        for size in engine.batch_sizes[seen_batches[0]:]:
            metrics.batch.observe(size)
        seen_batches[0] = len(engine.batch_sizes)

    async def run(jobs: list[Job]) -> list:
        submit(jobs)
        try:
            results = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)),
                                             request_timeout)
        except TimeoutError:
            for job in jobs:
                job.cancel()
            raise ApiError(504, f"the request took longer than {request_timeout} s", "timeout") from None
        except PeftlabError as e:
            raise ApiError(400, str(e)) from None
        observe_batches()
        return results

    def jobs_for(prompts: list[str], adapter: str, body) -> list[Job]:
        max_tokens = body.max_tokens if isinstance(body, CompletionBody) else (
            body.max_completion_tokens or body.max_tokens or min(256, engine.max_tokens))
        if not 1 <= max_tokens <= engine.max_tokens:
            raise ApiError(400, f"max_tokens must be from 1 to {engine.max_tokens}, got {max_tokens}")
        for prompt in prompts:
            if (n := engine.prompt_tokens(prompt)) > engine.max_prompt_tokens:
                raise ApiError(400, f"the prompt has {n} tokens, more than --max-prompt-tokens "
                                    f"{engine.max_prompt_tokens}: shorten it")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return [Job(p, adapter, max_tokens, body.temperature, body.top_p,
                    None if body.seed is None else body.seed + i, stop)
                for p in prompts for i in range(body.n)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.set(engine.queue.qsize())
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        base = {"id": engine.base_name, "object": "model", "created": created, "owned_by": "peftlab",
                "root": engine.base_name, "parent": None}
        return {"object": "list", "data": [base, *({"id": name, "object": "model", "created": created,
                                                    "owned_by": "peftlab", "root": engine.base_name,
                                                    "parent": engine.base_name} for name in engine.adapters)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if engine.task not in ("seq2seq", "causal"):
            raise ApiError(400, f"this base is a {engine.task} model: use POST /classify")
        adapter = adapter_of(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is empty: send a string or a list of strings")
        jobs = jobs_for(prompts, adapter, body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return stream(jobs, body, head, "completions",
                          lambda i, piece, reason=None: {"index": i, "text": piece, "logprobs": None,
                                                         "finish_reason": reason})
        try:
            results = await run(jobs)
        except ApiError as e:
            count("completions", body.model, e.status)
            raise
        count("completions", body.model, 200)
        metrics.tokens.labels(body.model).inc(sum(r.completion_tokens for r in results))
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        return head | {"choices": choices, "usage": usage_of(results, body.n)}

    def usage_of(results, n: int) -> dict[str, int]:
        prompt_tokens = sum(r.prompt_tokens for r in results[::n])  # each prompt once, whatever n
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        adapter = adapter_of(body.model)
        if engine.task != "causal" or not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, f"{engine.base_name} has no chat template (chat needs a causal LM whose tokenizer "
                                "has one): use POST /v1/completions")
        try:
            prompt = engine.tokenizer.apply_chat_template(body.messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise ApiError(400, f"messages cannot be formatted: {' '.join(str(e).split())[:200]}") from None
        jobs = jobs_for([prompt], adapter, body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return stream(jobs, body, head | {"object": "chat.completion.chunk"}, "chat",
                          lambda i, piece, reason=None: {"index": i, "delta": {"content": piece} if piece else {},
                                                         "logprobs": None, "finish_reason": reason},
                          first=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None})
        results = await run(jobs)
        count("chat", body.model, 200)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        return head | {"choices": choices, "usage": usage_of(results, body.n)}

    def stream(jobs: list[Job], body: Sampling, head: dict, endpoint: str, choice, first=None) -> StreamingResponse:
        """Server-sent events as the tokens come: pieces of each choice's text (`choice(index, piece)`), its finish
        reason when it ends, the usage if asked, then [DONE]. A client that goes away cancels its jobs."""
        loop, arrivals = asyncio.get_running_loop(), asyncio.Queue()

        def arrive(i: int, piece_or_future) -> None:  # called from the engine's worker thread
            loop.call_soon_threadsafe(arrivals.put_nowait, (i, piece_or_future))

        for i, job in enumerate(jobs):
            job.on_text = functools.partial(arrive, i)
            job.future.add_done_callback(functools.partial(arrive, i))
        try:
            submit(jobs)
        except ApiError as e:
            count(endpoint, body.model, e.status)
            raise

        def event(choices: list, **extra) -> str:
            return f"data: {json.dumps(head | {'choices': choices} | extra)}\n\n"

        async def events():
            results, deadline = {}, loop.time() + request_timeout
            status = 499  # unless it ends below: the client went away
            try:
                for i in range(len(jobs) if first else 0):
                    yield event([first(i)])
                while len(results) < len(jobs):
                    i, arrival = await asyncio.wait_for(arrivals.get(), max(deadline - loop.time(), 0))
                    if isinstance(arrival, str):
                        yield event([choice(i, arrival)])
                        continue
                    results[i] = arrival.result()
                    yield event([choice(i, "", results[i].finish_reason)])
                ordered = [results[i] for i in range(len(jobs))]
                metrics.tokens.labels(body.model).inc(sum(r.completion_tokens for r in ordered))
                if (body.stream_options or {}).get("include_usage"):
                    yield event([], usage=usage_of(ordered, body.n))
                status = 200
            except TimeoutError:
                status = 504
                yield f"data: {json.dumps(error_body(status, f'the request took longer than {request_timeout} s'))}\n\n"
            except Exception as e:  # the answer failed after the stream began: said in the stream, as vLLM does
                status = 400 if isinstance(e, PeftlabError) else 500
                yield f"data: {json.dumps(error_body(status, ' '.join(str(e).split())))}\n\n"
            finally:
                for job in jobs:
                    job.cancel()  # nothing for finished ones; frees the batch's place of those still decoding
                count(endpoint, body.model, status)
                observe_batches()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/classify")
    async def classify(body: ClassifyBody):
        if engine.task != "classification":
            raise ApiError(400, f"this base is a {engine.task} model: use POST /v1/completions")
        adapter = adapter_of(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        probabilities = await asyncio.to_thread(engine.classify, texts, adapter)
        data = []
        for i, probs in enumerate(probabilities):
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": engine.labels[best] if best < len(engine.labels) else str(best),
                         "probs": probs, "num_classes": len(probs)})
        count("classify", body.model, 200)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model, "data": data,
                "usage": {"prompt_tokens": sum(engine.prompt_tokens(t) for t in texts), "total_tokens": 0}}

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody):
        if not allow_loading:
            raise ApiError(403, "loading adapters at run time is off: start the server with --allow-adapter-loading")
        try:
            path = check_under_root(body.lora_path, adapter_root)
            await asyncio.to_thread(engine.load, body.lora_name, path)
        except PeftlabError as e:
            raise ApiError(400, str(e)) from None
        return PlainTextResponse(f"Success: adapter {body.lora_name!r} loaded")

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody):
        if not allow_loading:
            raise ApiError(403, "unloading adapters at run time is off: start the server with --allow-adapter-loading")
        try:
            await asyncio.to_thread(engine.unload, body.lora_name)
        except PeftlabError as e:
            raise ApiError(404, str(e), "not_found_error") from None
        return PlainTextResponse(f"Success: adapter {body.lora_name!r} unloaded")

    return app

