"""The training loop: plain PyTorch, one readable function per stage."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab import accel
from peftlab.accel.allocator import allocator_in_use
from peftlab.data.batching import batch_order, batch_tokens, collate
from peftlab.errors import PeftlabError, first_line
from peftlab.eval.generation import generate
from peftlab.eval.metrics import task_metrics
from peftlab.eval.scoring import score
from peftlab.io import output_lock, write_text
from peftlab.measure.estimate import measured_parts
from peftlab.measure.memory import peak_memory_bytes
from peftlab.measure.sizes import count_parameters, trainable_line
from peftlab.models import DEFAULT_SEED, RANDOM_PREFIX, check_lengths, default_task, load_model, resolve_task
from peftlab.train import distributed, setup
from peftlab.train.callbacks import Callback, Callbacks, MetricsFile, ProgressBar, RunInfo
from peftlab.train.config import TrainConfig
from peftlab.train.distributed import SINGLE, World
from peftlab.train.monitor import is_finite, module_grad_norms
from peftlab.train.schedule import lr_multiplier
from peftlab.train.state import (
    find_checkpoint,
    interrupted_hint,
    load_trainer_state,
    resume_hint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from peftlab.train.tracking import make_trackers


@dataclass
class RunResult:
    output: Path
    steps: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    model: Any = field(default=None, repr=False)  # the trained model, adapters in place (rank 0's, unwrapped)


class MicroBatches:
    """Micro-batches across epochs, with a position (epoch, index) that a checkpoint can restore."""

    def __init__(self, examples: list[dict], cfg: TrainConfig, pad_id: int, world: World = SINGLE) -> None:
        self.examples, self.cfg, self.pad_id, self.world = examples, cfg, pad_id, world
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

    def next(self) -> tuple[dict[str, torch.Tensor], bool]:
        """This process's part of the next micro-batch, and False when it is only a stand-in (weight 0)."""
        if self.index >= len(self.batches):
            self.seek(self.epoch + 1, 0)
        indices, real = distributed.shard(self.batches[self.index], self.world)
        self.index += 1
        return collate([self.examples[i] for i in indices], self.pad_id), real

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.index / len(self.batches)


@dataclass
class Inputs:
    """What a Python caller hands over instead of names in the config (None: built from the config)."""

    model: torch.nn.Module | None = None  # with or without a method applied
    tokenizer: Any = None
    train: Any = None  # a datasets.Dataset
    validation: Any = None
    compute_metrics: Any = None  # (predictions, references) -> {name: value}
    callbacks: list[Callback] = field(default_factory=list)


def train(cfg: TrainConfig, progress: bool | None = None, inputs: Inputs | None = None) -> RunResult:
    """Run one training job as configured; returns where it wrote and what it logged. Under torchrun every
    process calls this; rank 0 prints and writes."""
    inputs = inputs or Inputs()
    cfg.validate(data_given=inputs.train is not None)
    world = distributed.world_from_env(cfg.run.distributed)
    distributed.check_batch(world, cfg.run.batch_size)
    if cfg.run.recompute_linear and world.distributed and world.strategy == "fsdp":
        raise PeftlabError("run.recompute_linear does not work with FSDP, which frees each layer's weights after "
                           "its forward pass: use --distributed ddp, or turn run.recompute_linear off")
    quiet = contextlib.redirect_stdout(io.StringIO()) if not world.is_main else contextlib.nullcontext()
    # rank 0 writes the run, so it holds the output for all of them
    lock = output_lock(cfg.run.output, "train") if world.is_main else contextlib.nullcontext()
    trackers = make_trackers(cfg.run.report_to or []) if world.is_main else []  # only rank 0 reports
    events = Callbacks([MetricsFile(), ProgressBar(progress), *trackers, *inputs.callbacks] if world.is_main else [])
    device = distributed.start(world, setup.resolve_device(cfg.run.device))
    try:
        with quiet, lock:
            result = _train(cfg, world, device, inputs, events)
    except BaseException:
        distributed.stop(world, finished=False)
        raise
    distributed.stop(world)
    return result


def _train(cfg: TrainConfig, world: World, device: torch.device, inputs: Inputs, events: Callbacks) -> RunResult:
    baseline_mb = peak_memory_bytes(device) / 2**20  # before the model: what the run itself adds is above this
    out = setup.check_output(cfg)  # only checked: bad data or config below leave it as it was
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    setup.absolute_local_paths(cfg)  # eval -p rebuilds the base and the held-out split from any directory
    model, tokenizer, task, tables, labels = _model_and_data(cfg, inputs)
    virtual = cfg.resolved_method().get("num_virtual_tokens", 0)  # a soft prompt's positions (prompt tuning)
    check_lengths(model.config, task, cfg.data.max_source_length, cfg.data.max_target_length, virtual)
    data = setup.encode(cfg, tokenizer, task, tables, labels)
    model = setup.apply_method(model, cfg, task)
    fast = accel.prepare(model, device, cfg.run, task, world.distributed, world.strategy == "fsdp")
    if cfg.run.gradient_checkpointing:
        # transformers 5.x renamed it; the old name warns and goes in v6
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
    model.to(device).train()
    cfg.data.labels = labels or None
    resumed = _resume_weights(out, cfg, model, world) if cfg.run.resume else None  # before anything is written
    validate = Validator(cfg, data, tokenizer, task, inputs.compute_metrics)
    with setup.replacing_output(cfg, world.is_main):  # --overwrite sets the old run aside only now
        if world.is_main:
            write_text(out / "config.yaml", cfg.to_yaml())
        with fast:
            _report(cfg, world, model, fast)
            return _fit(cfg, model, tokenizer, data, device, out, task, world, baseline_mb, resumed, events, validate,
                        fast)


def _model_and_data(cfg: TrainConfig, inputs: Inputs):
    """The model, tokenizer, task, (train, validation) tables and labels: the caller's where given, else built
    from the config's names."""
    if inputs.model is not None:
        model, tokenizer = inputs.model, inputs.tokenizer
        setup.describe_given_model(cfg, model)
        task = cfg.model.task or default_task(model.config)
    else:
        task = resolve_task(cfg.model.name, cfg.model.task)
    tables = setup.read_tables(cfg, inputs.train, inputs.validation)
    labels = setup.label_set(cfg, tables[0]) if task == "classification" else []
    if inputs.model is None:
        # A random preset names one model, the one eval, generate and merge rebuild from the adapter's base name:
        # run.seed seeds what the run adds to it, never its weights (for a pretrained model: a new head's init).
        base_seed = DEFAULT_SEED if cfg.model.name.startswith(RANDOM_PREFIX) else cfg.run.seed
        model, tokenizer = load_model(cfg.model.name, task=task, num_labels=max(len(labels), 2), seed=base_seed,
                                      overrides=cfg.model.overrides)
        if base_seed != cfg.run.seed:
            torch.manual_seed(cfg.run.seed)  # load_model seeded the preset's weights: the run's draws follow run.seed
    return model, tokenizer, task, tables, labels


def _report(cfg: TrainConfig, world: World, model, fast: accel.Accelerated) -> None:
    print(f"Config: {json.dumps(cfg.to_dict())}")
    for config in getattr(model, "peftlab_adapters", {}).values():
        print(f"Using {config.method.upper()}: {config}")
    print(trainable_line(model))
    if fast.switched:
        print(f"Lean kernels: {', '.join(fast.switched)}")
    print(f"Allocator: {allocator_in_use()}")
    if world.distributed:
        print(f"Distributed: {world.size} processes, {world.strategy.upper()}, "
              f"global batch {cfg.run.batch_size} x {cfg.run.grad_accum} accumulation")
    on = fast.switches
    print(f"Linear products: {'oneDNN' if on.onednn else 'torch'} (run.linear_backend={cfg.run.linear_backend})")
    for warning in fast.warnings:
        print(f"warning: {warning}")
    if off := on.off_here(cfg.run):
        print(f"Off on {fast.device.type} (measured on CPU only, peftlab/accel/policy.py): {', '.join(off)}")


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int, sharded: bool = False):
    o = cfg.optim
    trainable = [p for p in model.parameters() if p.requires_grad]
    # one fused kernel for all tensors (as HF Trainer's default); FSDP's sharded tensors take the plain loop
    fused = not sharded and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, o.warmup_steps, total_steps, o.scheduler))
    return trainable, optimizer, scheduler


def _fit(cfg, model, tokenizer, data, device, out, task, world: World, baseline_mb: float,
         state: dict[str, Any] | None, events: Callbacks, validate: Validator, fast: accel.Accelerated) -> RunResult:
    r = cfg.run
    stream = MicroBatches(data.train, cfg, tokenizer.pad_token_id, world)
    steps_per_epoch = max(1, math.ceil(len(stream) / r.grad_accum))
    total = r.max_steps or max(1, math.ceil(r.epochs * steps_per_epoch))
    result = RunResult(out, total, model=model)
    wrapped = distributed.wrap(model, fast.loss, world, device)
    trainable, optimizer, scheduler = _optimizer(cfg, model, total, sharded=world.strategy == "fsdp")
    step = 0
    if state is not None:
        step = _resume_state(state, model, optimizer, scheduler, stream, world)
    else:
        if world.distributed:  # same init everywhere (above); different dropout draws per process from here
            torch.manual_seed(r.seed + world.rank)
    # what a resumed run's first log line averages over: the steps since the last line, before the checkpoint too
    window = LogWindow(**state.get("log_window", {})) if state is not None else LogWindow()
    events.on_train_begin(RunInfo(out, total, step, cfg, model))
    try:
        if state is None and r.eval_before:
            result.eval_before = validate(model, device, events)
            events.on_evaluate(result.eval_before)
        while step < total:
            t0 = time.perf_counter()
            loss, tokens = _accumulate(cfg, wrapped, model, stream, device, world, task, fast)
            if not is_finite(loss):
                raise PeftlabError(f"loss became {loss} at step {step + 1}: lower --lr or check the data; "
                                   f"{resume_hint(out)}")
            is_log_step = (step + 1) % r.logging_steps == 0 or step + 1 == total
            grad_norm, learning_rate, norms = _optimizer_step(cfg, model, trainable, optimizer, scheduler, fast,
                                                              module_norms=is_log_step)
            step += 1
            window.add(loss, tokens, time.perf_counter() - t0)
            events.on_step_end(step)
            if is_log_step:
                record = _log_record(window, grad_norm, learning_rate, stream.fractional_epoch, step, norms,
                                     device, world)
                events.on_log(record)
                result.logs.append(record)
                window = LogWindow()
            if r.eval_steps and step % r.eval_steps == 0 and step < total:
                events.on_evaluate({"step": step, **validate(model, device, events)})
            if r.save_steps and step % r.save_steps == 0:
                checkpoint = _save_checkpoint(cfg, out, step, model, optimizer, scheduler, stream, world, window)
                events.on_save(checkpoint)
        result.eval_after = validate(model, device, events)
        events.on_evaluate({"step": step, "final": True, **result.eval_after})
    except KeyboardInterrupt:
        if world.is_main:
            print(interrupted_hint(out, step), file=sys.stderr)
        raise
    finally:
        events.close()
    peak_above_baseline = peak_memory_bytes(device) - baseline_mb * 2**20
    memory = measured_parts(peak_above_baseline, model, optimizer)  # this process's share under FSDP
    with distributed.full_weights(model, world):
        if world.is_main:
            setup.save_final(model, out, tokenizer)
            trainable, total = count_parameters(model)
            results = {"steps": step, "eval_before": result.eval_before, "eval_after": result.eval_after,
                       "trainable_params": trainable, "all_params": total, "baseline_memory_mb": baseline_mb,
                       "peak_memory_mb": max((r["peak_memory_mb"] for r in result.logs), default=None),
                       "memory_mb": memory.as_mb(), "allocator": allocator_in_use()}
            write_text(out / "results.json", json.dumps(results, indent=2))
            events.on_train_end(results)
    return result


class Validator:
    """Scores the validation set: the loss (and perplexity, or accuracy), and with run.eval_metrics the task's own
    metrics (ROUGE and exact match from greedy generation for seq2seq and causal LMs, accuracy and macro-F1 for
    classification) and a user's `compute_metrics(predictions, references)`."""

    def __init__(self, cfg: TrainConfig, data, tokenizer, task: str, compute_metrics=None) -> None:
        pad = tokenizer.pad_token_id
        self.batches = [collate([data.validation[i] for i in b], pad) for b in
                        batch_order([len(e["input_ids"]) for e in data.validation], cfg.run.batch_size, 0, False)]
        self.cfg, self.data, self.tokenizer, self.task = cfg, data, tokenizer, task
        self.compute_metrics = compute_metrics
        self.predicts = cfg.run.eval_metrics and bool(cfg.data.target_column) and not cfg.data.pack

    def __call__(self, model, device: torch.device, events: Callback) -> dict[str, float]:
        with events.phase("validation", len(self.batches)) as advance:
            metrics = score(model, self.batches, device, on_batch=advance)
        if self.predicts:
            predictions, references = self.predictions(model, device)
            found = task_metrics(self.task, predictions, references)
            if self.compute_metrics is not None:
                found |= {k: float(v) for k, v in self.compute_metrics(predictions, references).items()}
            metrics |= {f"eval_{k.removeprefix('eval_')}": v for k, v in found.items()}
        return metrics

    def predictions(self, model, device: torch.device) -> tuple[list[str], list[str]]:
        rows, d = self.data.validation_rows, self.cfg.data
        references = [str(row[d.target_column]) for row in rows]
        was_training = model.training
        model.eval()
        try:
            if self.task == "classification":
                with torch.no_grad():
                    ids = [i for b in self.ordered_batches() for i in
                           model(**{k: v.to(device) for k, v in b.items()}).logits.argmax(-1).tolist()]
                return [self.data.formatter.labels[i] for i in ids], references
            sources = [self.data.formatter.source(row) for row in rows]
            outputs = generate(model, self.tokenizer, sources, self.task, self.cfg.run.batch_size,
                               d.max_target_length, 1, d.max_source_length)
            return outputs, references
        finally:
            model.train(was_training)

    def ordered_batches(self) -> list[dict[str, torch.Tensor]]:
        """The validation examples in their rows' order (score's batches are grouped by length)."""
        size, pad = self.cfg.run.batch_size, self.tokenizer.pad_token_id
        return [collate(self.data.validation[s:s + size], pad) for s in range(0, len(self.data.validation), size)]


def _save_checkpoint(cfg, out: Path, step: int, model, optimizer, scheduler, stream, world: World,
                     window: LogWindow) -> Path:
    rng_by_rank = distributed.all_gather_object(rng_state(), world)
    optimizer_state = distributed.optimizer_state(model, optimizer, world)
    with distributed.full_weights(model, world):
        if world.is_main:
            state = {"step": step, "epoch": stream.epoch, "index": stream.index, "world_size": world.size,
                     "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng_by_rank": rng_by_rank,
                     "log_window": asdict(window)}
            save_checkpoint(out, step, model, setup.save_trained, state, cfg.run.save_total_limit)
    distributed.barrier(world)
    return out / f"checkpoint-{step}"

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


def _optimizer_step(cfg, model, trainable, optimizer, scheduler, fast: accel.Accelerated,
                    module_norms: bool) -> tuple[float, float, dict[str, float] | None]:
    """Clip, step, advance the schedule; returns the pre-clip grad norm, the rate this step used and, where
    `module_norms`, each trainable tensor's gradient norm (from the pass the clip takes)."""
    learning_rate = scheduler.get_last_lr()[0]
    norms = fast.gradient_norms(optimizer, trainable)
    named = module_grad_norms(model, norms) if module_norms else None
    grad_norm = fast.step(optimizer, trainable, cfg.optim.max_grad_norm or math.inf, norms)
    scheduler.step()
    return float(distributed.local_tensor(grad_norm)), learning_rate, named


def _accumulate(cfg, wrapped, model, stream, device, world: World, task: str,
                fast: accel.Accelerated) -> tuple[float, int]:
    """Forward and backward over grad_accum micro-batches; returns the step's loss and tokens (all processes),
    the gradients left in the parameters (a large embedding table's sparse on one CPU process: `clipped_step`).

    In several processes each loss is scaled by this process's share of the micro-batch's loss units, times
    the world size, so the gradient average equals the single-process gradient of the whole micro-batch."""
    accum = cfg.run.grad_accum
    total_loss, tokens = 0.0, 0
    with fast.backward_scope(model):
        for i in range(accum):
            batch, real = stream.next()
            batch = {k: v.to(device) for k, v in batch.items()}
            weight = 1.0
            if world.distributed:
                units = distributed.loss_units(batch, task == "causal") if real else 0
                weight = units * world.size / max(distributed.all_reduce([units], world)[0], 1)
            with distributed.gradient_sync(wrapped, model, world, enabled=i == accum - 1):
                with fast.autocast():
                    loss = wrapped(batch) * (weight / accum)
                fast.backward(loss)
            total_loss += loss.item()
            tokens += batch_tokens(batch, task == "seq2seq") if real else 0
    total_loss, tokens = distributed.all_reduce([total_loss / world.size, tokens], world)
    return total_loss, int(tokens)


def _log_record(window: LogWindow, grad_norm, learning_rate, epoch, step, norms, device,
                world: World) -> dict[str, Any]:
    peak_mb = peak_memory_bytes(device) / 2**20
    peak_max, peak_sum = distributed.all_reduce([peak_mb], world, "max")[0], distributed.all_reduce([peak_mb], world)[0]
    record = {"step": step, "loss": window.loss / window.steps, "grad_norm": grad_norm,
              "learning_rate": learning_rate, "epoch": epoch,
              "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
              "step_time_s": window.seconds / window.steps,
              "peak_memory_mb": peak_max, "grad_norms": norms}
    if world.distributed:
        record["peak_memory_mb_all_processes"] = peak_sum
    return record


def _resume_weights(out: Path, cfg: TrainConfig, model, world: World) -> dict[str, Any]:
    """Trained weights back into the model before it is wrapped; returns the trainer state for the rest."""
    checkpoint = find_checkpoint(out, cfg.run.resume)
    setup.check_resumable(cfg, checkpoint)
    state = load_trainer_state(checkpoint)
    saved_world = state.get("world_size", 1)
    if saved_world != world.size:
        raise PeftlabError(f"{checkpoint} was saved by {saved_world} process(es), this run has {world.size}: "
                           f"resume with --nproc {saved_world} (the data order depends on the world size)")
    setup.load_trained(model, checkpoint)
    print(f"Resumed from {checkpoint} at step {state['step']}")
    return state


def _resume_state(state: dict[str, Any], model, optimizer, scheduler, stream: MicroBatches, world: World) -> int:
    try:
        distributed.load_optimizer_state(model, optimizer, state["optimizer"], world)
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise PeftlabError(f"the checkpoint's optimizer state does not fit this run's trainable parameters "
                           f"({first_line(e)}): resume from a checkpoint of this run") from None
    stream.seek(state["epoch"], state["index"])
    rngs = state.get("rng_by_rank") or [state["rng"]]
    set_rng_state(rngs[world.rank])
    return state["step"]
