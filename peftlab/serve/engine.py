"""The serving engine: one base model, many adapters, and a worker thread that decodes every running request
together, each through its own adapter (`per_example_adapters`). Batching is per decoding step (decode.py): a
request joins at the next step and leaves when it is done, up to `max_batch_size` running at once.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import PeftlabError
from peftlab.methods.checkpoint import load_adapter, read_adapter_config
from peftlab.methods.inject import BASE_NAME, remove_adapter
from peftlab.serve.decode import Decoder, Sequence, adapters_for


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
    on_text: Callable[[str], None] | None = None  # streaming: called (from the worker) with each new piece of text
    future: Future = field(default_factory=Future)
    sent: str = ""  # the text streamed so far
    abandoned: bool = False  # its client is gone: the worker drops it at the next step

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def cancel(self) -> None:
        """Stop working on it, whether it waits or runs (a running Future cannot be cancelled itself)."""
        self.abandoned = True
        self.future.cancel()


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
        self.batch_sizes: list[int] = []  # sequences per decoding step, for /metrics
        self.decoder = Decoder(self.model, tokenizer, task, max_prompt_tokens) if task != "classification" else None
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
            raise PeftlabError(unbatchable(config, "this"))
        with self.lock:
            load_adapter(self.model, path, name)
            self.model.eval()
            if self.decoder:
                self.decoder.adapters_changed()

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise PeftlabError(f"no adapter named {name!r} is served; served: {self.adapters}")
        with self.lock:
            remove_adapter(self.model, name)
            if self.decoder:
                self.decoder.adapters_changed()

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
        """Admit waiting requests into the running batch, take one decoding step for all, retire the finished."""
        active: list[Sequence] = []
        while not (self.stopping.is_set() and not active and self.queue.empty()):
            waiting = self._admit(self.max_batch_size - len(active), block=not active)
            with self.lock:
                active += [s for s in self._prefilled(waiting) if not self._retired(s)]
                served = {*self.adapters, BASE_NAME}
                for gone in [s for s in active if s.request.adapter not in served]:
                    self._fail(gone.request, PeftlabError(f"adapter {gone.request.adapter!r} was unloaded"))
                active = [s for s in active if s.request.adapter in served and not s.request.abandoned]
                if not active:
                    continue
                self.batch_sizes.append(len(active))
                if self._guarded([s.request for s in active], functools.partial(self.decoder.step, active)) is None:
                    active.clear()  # those requests failed; the server goes on with the next
                    continue
                active = [s for s in active if not self._retired(s)]
                for sequence in active:
                    self._stream(sequence)

    def _prefilled(self, requests: list[Request]) -> list[Sequence]:
        """The requests' prompts run as one batch; if that fails, each alone, so only a bad one fails."""
        if not requests:
            return []
        try:
            return self.decoder.prefill(requests)
        except Exception as e:
            if len(requests) == 1:
                self._fail(requests[0], e)
                return []
        alone = [self._guarded([r], functools.partial(self.decoder.prefill, [r])) for r in requests]
        return [s[0] for s in alone if s is not None]

    def _admit(self, room: int, block: bool) -> list[Request]:
        """Up to `room` waiting requests (waiting briefly for one when nothing runs)."""
        admitted: list[Request] = []
        while len(admitted) < room:
            try:
                request = self.queue.get(timeout=0.1) if block and not admitted else self.queue.get_nowait()
            except queue.Empty:
                break
            if not request.abandoned and request.future.set_running_or_notify_cancel():
                admitted.append(request)
        return admitted

    def _guarded(self, requests: list[Request], action):
        """`action()`, or on an error each of `requests` fails with it and None is returned: one bad request never
        stops the server."""
        try:
            return action() or True
        except Exception as e:
            for request in requests:
                self._fail(request, e)
            return None

    @staticmethod
    def _fail(request: Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)

    def _retired(self, sequence: Sequence) -> bool:
        """Whether the sequence is finished now; if so its request gets its answer."""
        if not self.decoder.done(sequence):
            return False
        if not sequence.request.future.done():
            completion = self._finish(sequence.request, sequence.tokens, sequence.prompt_tokens)
            self._stream(sequence, completion.text)
            sequence.request.future.set_result(completion)
        return True

    def _stream(self, sequence: Sequence, final: str | None = None) -> None:
        """A streaming request gets the text it gained since its last piece: while decoding, only what later
        tokens cannot change (up to the last space, short of a partial character or the start of a stop
        string), so the pieces join to the final text; at the end, the rest."""
        request = sequence.request
        if request.on_text is None:
            return
        text = final if final is not None else settled(self.decoder.text(sequence), request.stop)
        if len(text) > len(request.sent) and text.startswith(request.sent):
            request.on_text(text[len(request.sent):])
            request.sent = text

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
            with adapters_for(self.model, [adapter] * len(texts)):
                logits = self.model(**batch).logits
        return torch.softmax(logits.float(), -1).tolist()

    def close(self, timeout: float = 30) -> None:
        """Finish what is queued, then stop the worker."""
        deadline = time.time() + timeout
        while not self.queue.empty() and time.time() < deadline:
            time.sleep(0.05)
        self.stopping.set()
        self.worker.join(timeout=max(deadline - time.time(), 1))


def settled(text: str, stops: list[str]) -> str:
    """The part of a partial answer that more tokens will not change: up to its last whitespace (a word or a
    multi-byte character may still be growing), and short of any ending that could begin a stop string."""
    text = text[:max(text.rfind(" "), text.rfind("\n")) + 1]
    for stop in (s for s in stops if s):
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                text = text[:-k]
                break
    return text


def unbatchable(config, which: str) -> str:
    """Why an adapter cannot be served beside others, and what to do instead (asking the method, not its name)."""
    first = f"{which} {config.method} adapter cannot share a batch with other adapters"
    if config.mergeable:
        return f"{first}: merge it (peftlab merge) and serve the merged model with --model"
    return (f"{first} and cannot be merged into the weights: use it with peftlab generate -p RUN, one adapter at a "
            "time")


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
