"""The serving engine: one base model, many adapters, and a worker thread that batches waiting requests across
adapters (each example of a batch through its own adapter: `per_example_adapters`).

Batching is per request: the worker takes every waiting request that fits (greedy ones together, up to
`max_batch_size`; a sampled one with its own seed alone) and generates for the batch at once. Greedy
continuations do not depend on the batch: each row is computed from its own tokens (padding is masked), and a
row's answer is cut at its own `max_tokens` and stop strings.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import PeftlabError
from peftlab.eval.generation import generate_ids
from peftlab.methods.checkpoint import load_adapter, read_adapter_config
from peftlab.methods.inject import BASE_NAME, per_example_adapters, remove_adapter


@dataclass
class Request:
    """One prompt to complete (an OpenAI request with n > 1 or a list of prompts is several)."""

    prompt: str
    adapter: str  # an adapter's name, or BASE_NAME
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    future: Future = field(default_factory=Future)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class QueueFull(PeftlabError):
    """More requests wait than --max-queue allows."""


class Engine:
    """The model, its adapters and the batching worker."""

    def __init__(self, model: Any, tokenizer: Any, task: str, base_name: str, max_batch_size: int = 16,
                 max_queue: int = 256, max_prompt_tokens: int = 512, max_tokens: int = 256,
                 labels: list[str] | None = None) -> None:
        self.model, self.tokenizer, self.task, self.base_name = model.eval(), tokenizer, task, base_name
        self.labels = labels or []  # a classification run's class names, in the head's order
        self.max_batch_size, self.max_prompt_tokens, self.max_tokens = max_batch_size, max_prompt_tokens, max_tokens
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()  # the model: adapters load and unload between batches
        self.batch_sizes: list[int] = []  # for /metrics
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=self._work, name="peftlab-serve-worker", daemon=True)
        self.worker.start()

    # ---- adapters ----------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peftlab_adapters", {}))

    def load(self, name: str, path: str | Path) -> None:
        """Load an adapter under `name`; one that cannot join a mixed batch, or does not fit the base, is refused
        and the served ones keep working."""
        if name in self.adapters or name in (BASE_NAME, self.base_name):
            raise PeftlabError(f"an adapter named {name!r} is already served: unload it first or choose another name")
        config = read_adapter_config(path)
        if not config.can_mix():
            raise PeftlabError(f"this {config.method} adapter cannot share a batch with other adapters, so the server "
                               "cannot serve it beside them: merge it (peftlab merge) and serve the merged model")
        with self.lock:
            load_adapter(self.model, path, name)
            self.model.eval()

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise PeftlabError(f"no adapter named {name!r} is served; served: {self.adapters}")
        with self.lock:
            remove_adapter(self.model, name)

    # ---- requests ----------------------------------------------------------------------------------------------
    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    def submit(self, request: Request) -> Future:
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are waiting: retry shortly") from None
        return request.future

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while first.greedy and len(batch) < self.max_batch_size:
                try:
                    request = self.queue.get_nowait()
                except queue.Empty:
                    break
                if not request.greedy:  # a sampled request runs alone, with its own seed
                    self.queue.put(request)
                    break
                batch.append(request)
            self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        live = [r for r in batch if not r.future.cancelled() and r.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes.append(len(live))
        try:
            with self.lock:
                results = self._generate(live)
        except Exception as e:  # a request that breaks the model fails alone; the server keeps serving
            for request in live:
                request.future.set_exception(e)
            return
        for request, result in zip(live, results, strict=True):
            request.future.set_result(result)

    def _generate(self, batch: list[Request]) -> list[Completion]:
        first = batch[0]
        options = {"do_sample": False}
        if not first.greedy:
            if first.seed is not None:
                torch.manual_seed(first.seed)
            options = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
        longest = max(r.max_tokens for r in batch)
        adapters = [r.adapter for r in batch]
        context = per_example_adapters(self.model, adapters) if self.adapters else _nothing()
        with context:
            outputs = generate_ids(self.model, self.tokenizer, [r.prompt for r in batch], self.task, len(batch),
                                   longest, 1, self.max_prompt_tokens, generator_kwargs=options)
        return [self._finish(r, ids, prompt_tokens) for r, (ids, prompt_tokens) in zip(batch, outputs, strict=True)]

    def _finish(self, request: Request, ids: list[int], prompt_tokens: int) -> Completion:
        """Cut a row at its own max_tokens and stop strings."""
        ids = ids[:request.max_tokens]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        reason = "length" if len(ids) == request.max_tokens else "stop"
        for stop in request.stop:
            if stop and stop in text:
                text, reason = text[:text.index(stop)], "stop"
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Completion(text, prompt_tokens, len(ids), reason)

    def classify(self, texts: list[str], adapter: str) -> list[list[float]]:
        """Class probabilities of each text through `adapter` (a classification model)."""
        with self.lock, torch.no_grad():
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_prompt_tokens,
                                   return_tensors="pt").to(next(self.model.parameters()).device)
            context = per_example_adapters(self.model, [adapter] * len(texts)) if self.adapters else _nothing()
            with context:
                logits = self.model(**batch).logits
        return torch.softmax(logits.float(), -1).tolist()

    def close(self, timeout: float = 30) -> None:
        """Finish what is queued, then stop the worker."""
        deadline = time.time() + timeout
        while not self.queue.empty() and time.time() < deadline:
            time.sleep(0.05)
        self.stopping.set()
        self.worker.join(timeout=max(deadline - time.time(), 1))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def check_under_root(path: str, root: str | None) -> Path:
    """An adapter path to load at run time: a directory under `root`, after resolving links and '..'."""
    if root is None:
        raise PeftlabError("loading adapters at run time needs --adapter-root DIR: only directories under it load")
    resolved, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if resolved != base and base not in resolved.parents:
        raise PeftlabError(f"{path} is outside --adapter-root {root}: only adapters under it can be loaded")
    if not resolved.is_dir():
        raise PeftlabError(f"{path} is not a directory: an adapter is a directory with adapter_config.json")
    return resolved
