"""The HTTP API: OpenAI's completions and chat completions, vLLM's adapter loading and classify shapes, health
and Prometheus metrics. Every bad request gets its status code and a one-line message; none stops the server."""

from __future__ import annotations

import asyncio
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
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)

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

    async def run(jobs: list[Job]) -> list:
        for job in jobs:
            try:
                engine.submit(job)
            except QueueFull as e:
                raise ApiError(503, str(e), "server_busy", {"Retry-After": "1"}) from None
        metrics.queue.set(engine.queue.qsize())
        try:
            results = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)),
                                             request_timeout)
        except TimeoutError:
            for job in jobs:
                job.future.cancel()
            raise ApiError(504, f"the request took longer than {request_timeout} s", "timeout") from None
        except PeftlabError as e:
            raise ApiError(400, str(e)) from None
        for size in engine.batch_sizes[seen_batches[0]:]:
            metrics.batch.observe(size)
        seen_batches[0] = len(engine.batch_sizes)
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
        try:
            results = await run(jobs)
        except ApiError as e:
            count("completions", body.model, e.status)
            raise
        count("completions", body.model, 200)
        metrics.tokens.labels(body.model).inc(sum(r.completion_tokens for r in results))
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        usage = usage_of(results, len(body.prompt) if isinstance(body.prompt, list) else 1, body.n)
        reply = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                 "model": body.model, "choices": choices, "usage": usage}
        if body.stream:
            return stream(reply, lambda c, piece: {**c, "text": piece}, "text_completion")
        return reply

    def usage_of(results, prompts: int, n: int) -> dict[str, int]:
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
        results = await run(jobs_for([prompt], adapter, body))
        count("chat", body.model, 200)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                 "model": body.model, "choices": choices, "usage": usage_of(results, 1, body.n)}
        if body.stream:
            return stream(reply, lambda c, piece: {"index": c["index"], "delta": {"content": piece},
                                                   "logprobs": None, "finish_reason": None}, "chat.completion.chunk")
        return reply

    def stream(reply: dict, piece_of, kind: str) -> StreamingResponse:
        """Server-sent events: each choice's text in word-sized pieces, then the finish reasons, then [DONE]."""
        async def events():
            for choice in reply["choices"]:
                text = choice.get("text", choice.get("message", {}).get("content", ""))
                pieces = [p for p in _pieces(text)] or [""]
                for piece in pieces:
                    chunk = {"id": reply["id"], "object": kind, "created": reply["created"], "model": reply["model"],
                             "choices": [piece_of(choice, piece) | {"finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                last = piece_of(choice, "") | {"finish_reason": choice["finish_reason"]}
                if kind == "chat.completion.chunk":
                    last["delta"] = {}
                yield f"data: {json.dumps({**chunk, 'choices': [last]})}\n\n"
            yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': reply['usage']})}\n\n"
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


def _pieces(text: str) -> list[str]:
    """Word-sized pieces that join to `text` exactly."""
    import re

    return re.findall(r"\s*\S+|\s+$", text)
