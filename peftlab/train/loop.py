"""The training loop: plain PyTorch, one readable function per stage."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.data.batching import batch_order, batch_tokens, collate
from peftlab.errors import PeftlabError
from peftlab.eval.scoring import score
from peftlab.io import write_text
from peftlab.measure.memory import peak_memory_bytes
from peftlab.measure.sizes import trainable_line
from peftlab.models import load_model, resolve_task
from peftlab.train import setup
from peftlab.train.config import TrainConfig
from peftlab.train.loss import lm_loss, supports_chunked_loss
from peftlab.train.monitor import MetricsLog, ProgressReporter, is_finite, log_line, module_grad_norms
from peftlab.train.schedule import lr_multiplier
from peftlab.train.state import find_checkpoint, load_trainer_state, save_checkpoint, set_rng_state


@dataclass
class RunResult:
    output: Path
    steps: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None


class MicroBatches:
    """Micro-batches across epochs, with a position (epoch, index) that a checkpoint can restore."""

    def __init__(self, examples: list[dict], cfg: TrainConfig, pad_id: int) -> None:
        self.examples, self.cfg, self.pad_id = examples, cfg, pad_id
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.epoch, self.index = 0, 0
        self.batches = self._order()

    def _order(self) -> list[list[int]]:
        r = self.cfg.run
        return batch_order(self.lengths, r.batch_size, r.seed + self.epoch, self.cfg.data.group_by_length)

    def __len__(self) -> int:
        return len(self.batches)

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self.batches = self._order()

    def next(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self.batches):
            self.seek(self.epoch + 1, 0)
        batch = collate([self.examples[i] for i in self.batches[self.index]], self.pad_id)
        self.index += 1
        return batch

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.index / len(self.batches)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise PeftlabError("fp16 needs a CUDA device: use --precision bf16 or fp32 on this device")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train(cfg: TrainConfig, progress: bool | None = None) -> RunResult:
    """Run one training job as configured; returns where it wrote and what it logged."""
    cfg.validate()
    out = setup.prepare_output(cfg)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    device = setup.resolve_device(cfg.run.device)
    task = resolve_task(cfg.model.name, cfg.model.task)
    tables = setup.read_tables(cfg)
    labels = setup.label_set(cfg, tables[0]) if task == "classification" else []
    model, tokenizer = load_model(cfg.model.name, task=task, num_labels=max(len(labels), 2), seed=cfg.run.seed,
                                  overrides=cfg.model.overrides)
    data = setup.encode(cfg, tokenizer, task, tables, labels)
    model = setup.apply_method(model, cfg, task)
    if cfg.run.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.to(device).train()
    cfg.data.labels = labels or None
    write_text(out / "config.yaml", cfg.to_yaml())
    print(f"Config: {json.dumps(cfg.to_dict())}")
    for config in getattr(model, "peftlab_adapters", {}).values():
        print(f"Using {config.method.upper()}: {config}")
    print(trainable_line(model))
    return _fit(cfg, model, tokenizer, data, device, out, task, progress)


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int):
    o = cfg.optim
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, o.warmup_steps, total_steps, o.scheduler))
    return trainable, optimizer, scheduler


def _fit(cfg, model, tokenizer, data, device, out, task, progress) -> RunResult:
    r = cfg.run
    stream = MicroBatches(data.train, cfg, tokenizer.pad_token_id)
    steps_per_epoch = max(1, math.ceil(len(stream) / r.grad_accum))
    total = r.max_steps or max(1, math.ceil(r.epochs * steps_per_epoch))
    trainable, optimizer, scheduler = _optimizer(cfg, model, total)
    val_batches = [collate([data.validation[i] for i in b], tokenizer.pad_token_id)
                   for b in batch_order([len(e["input_ids"]) for e in data.validation], r.batch_size, 0, False)]
    result = RunResult(out, total)
    step = 0
    if r.resume:
        step = _resume(out, r.resume, model, optimizer, scheduler, stream, device)
    elif r.eval_before:
        result.eval_before = score(model, val_batches, device)
    log = MetricsLog(out / "metrics.jsonl", append=bool(r.resume))
    bar = ProgressReporter(total, start=step, enabled=progress)
    seq2seq = task == "seq2seq"
    compute_loss = lm_loss if r.chunked_loss and task != "classification" and supports_chunked_loss(model) \
        else (lambda m, b: m(**b).loss)
    window = LogWindow()
    try:
        while step < total:
            t0 = time.perf_counter()
            loss, tokens = _accumulate(cfg, model, stream, device, seq2seq, step, compute_loss)
            is_log_step = (step + 1) % r.logging_steps == 0 or step + 1 == total
            norms = module_grad_norms(model) if is_log_step else None
            grad_norm, learning_rate = _optimizer_step(cfg, trainable, optimizer, scheduler)
            step += 1
            window.add(loss, tokens, time.perf_counter() - t0)
            bar.advance()
            if is_log_step:
                record = _log_record(window, grad_norm, learning_rate, stream.fractional_epoch, step, norms, device)
                bar.print(log_line(record["loss"], grad_norm, learning_rate, record["epoch"]))
                log.write(record)
                result.logs.append(record)
                window = LogWindow()
            if r.eval_steps and step % r.eval_steps == 0 and step < total:
                metrics = {"step": step, **score(model, val_batches, device)}
                bar.print(str(metrics))
                log.write(metrics)
            if r.save_steps and step % r.save_steps == 0:
                state = {"step": step, "epoch": stream.epoch, "index": stream.index,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                save_checkpoint(out, step, model, setup.save_trained, state, r.save_total_limit)
    finally:
        bar.close()
    result.eval_after = score(model, val_batches, device)
    log.write({"step": step, "final": True, **result.eval_after})
    log.close()
    setup.save_trained(model, out, tokenizer)
    write_text(out / "results.json", json.dumps({"steps": step, "eval_before": result.eval_before,
                                                 "eval_after": result.eval_after}, indent=2))
    return result


@dataclass
class LogWindow:
    """What accumulates between two log lines."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds


def _optimizer_step(cfg, trainable, optimizer, scheduler) -> tuple[float, float]:
    """Clip, step, advance the schedule; returns the pre-clip grad norm and the rate this step used."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm or math.inf))
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, learning_rate


def _accumulate(cfg, model, stream, device, seq2seq: bool, step: int, compute_loss) -> tuple[float, int]:
    """Forward and backward over grad_accum micro-batches; returns the step's loss and tokens."""
    accum = cfg.run.grad_accum
    total_loss, tokens = 0.0, 0
    for _ in range(accum):
        batch = {k: v.to(device) for k, v in stream.next().items()}
        with autocast(device, cfg.run.precision):
            loss = compute_loss(model, batch) / accum
        if not is_finite(loss):
            raise PeftlabError(f"loss became {loss.item() * accum} at step {step + 1}: lower --lr or check the data; "
                               "the last saved checkpoint is untouched (resume from it with --resume latest)")
        loss.backward()
        total_loss += loss.item()
        tokens += batch_tokens(batch, seq2seq)
    return total_loss, tokens


def _log_record(window: LogWindow, grad_norm, learning_rate, epoch, step, norms, device) -> dict[str, Any]:
    return {"step": step, "loss": window.loss / window.steps, "grad_norm": grad_norm,
            "learning_rate": learning_rate, "epoch": epoch,
            "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
            "step_time_s": window.seconds / window.steps,
            "peak_memory_mb": peak_memory_bytes(device) / 2**20, "grad_norms": norms}


def _resume(out: Path, resume: str, model, optimizer, scheduler, stream: MicroBatches, device) -> int:
    checkpoint = find_checkpoint(out, resume)
    state = load_trainer_state(checkpoint)
    setup.load_trained(model, checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.seek(state["epoch"], state["index"])
    set_rng_state(state["rng"])
    print(f"Resumed from {checkpoint} at step {state['step']}")
    return state["step"]
