"""`peftlab.evaluate` and `peftlab.generate`: what `peftlab eval` and `peftlab generate` do, as functions."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError


def evaluate(checkpoint: str | Path, data: Any = None, batch_size: int = 8, max_new_tokens: int = 64,
             num_beams: int = 1, output: str | Path | None = None, compare_base: bool = False,
             limit: int | None = None, model: str | None = None, show: bool = False) -> dict[str, dict]:
    """Score a run directory, one of its checkpoints or a peft adapter directory on `data` (a file, a Dataset or
    a list of dicts; default: the run's validation data); writes predictions.jsonl and metrics.json under
    `output` (default CHECKPOINT/eval) and returns {"adapter": metrics} (and "base" with `compare_base`)."""
    from peftlab.eval.evaluate import EvalOptions
    from peftlab.eval.evaluate import evaluate as evaluate_run
    from peftlab.eval.runs import load_run

    options = EvalOptions(data, batch_size, max_new_tokens, num_beams, None if output is None else str(output),
                          compare_base, limit)
    return evaluate_run(load_run(checkpoint, model), Path(checkpoint), options, show=show)


def generate(checkpoint: str | Path, texts: Sequence[str] = (), rows: Sequence[dict] | None = None,
             adapters: dict[str, str | Path] | None = None, use: str | None = None, batch_size: int = 8,
             max_new_tokens: int = 64, num_beams: int = 1, max_source_length: int | None = None,
             model: str | None = None, source: str = "rows") -> list[str]:
    """Continuations from a checkpoint, in order. `texts` are used as given; `rows` (dicts, e.g. from a jsonl
    file) are filled into the run's template when they have its columns, else their "input" (or "text") field,
    and a row's "adapter" field picks its adapter. `adapters` loads more adapters on the same base
    ({name: path}); `use` picks one for every input ("__base__": none; default the last loaded). Prompts are cut
    at the run's data.max_source_length, as in training."""
    from peftlab.eval.generation import generate as generate_batches
    from peftlab.eval.runs import load_run
    from peftlab.methods.checkpoint import load_adapter, read_adapter_config
    from peftlab.methods.inject import BASE_NAME, adapters_disabled, per_example_adapters, set_active

    if not texts and not rows:
        raise PeftlabError('nothing to generate from: pass texts ("summarize: ...") or --file inputs.jsonl')
    run = load_run(checkpoint, model)
    data = run.config.data if run.config else None
    prompts = prompts_of(rows, data and data.template, source) if rows else list(texts)
    for name, path in (adapters or {}).items():
        others = [read_adapter_config(path), *getattr(run.model, "peftlab_adapters", {}).values()]
        if unmixable := next((c for c in others if not c.can_mix()), None):
            raise PeftlabError(f"a {unmixable.method} adapter cannot share a base with other adapters (it changes "
                               "what they share, or its layers hold one adapter at a time): generate with each alone")
        load_adapter(run.model, path, name)
    if use and use != BASE_NAME:
        set_active(run.model, use)
    if rows and any("adapter" in r for r in rows):
        context = per_example_adapters(run.model, row_adapters(rows, use or last_loaded(run.model), source))
    elif use == BASE_NAME:
        context = adapters_disabled(run.model)
    else:
        context = contextlib.nullcontext()
    with context:
        return generate_batches(run.model, run.tokenizer, prompts, run.task, batch_size, max_new_tokens, num_beams,
                                max_source_length or (data.max_source_length if data else 512))


def prompts_of(rows: Sequence[dict], template: str | None, source: str) -> list[str]:
    """A row's prompt: the run's template filled from the row's columns when it has them all (as in training),
    otherwise its "input" (or "text") field as given."""
    from peftlab.data.tasks import required_columns

    fields = required_columns(template, "input", None) if template else []
    if fields and all(f in rows[0] for f in fields):
        return [template.format(**r) for r in rows]
    field = next((f for f in ("input", "text") if f in rows[0]), None)
    if field is None:
        wanted = f"the run's template fields {fields} or " if fields else ""
        raise PeftlabError(f"{source} needs {wanted}an 'input' or 'text' field; it has {sorted(rows[0])}")
    return [str(r[field]) for r in rows]


def last_loaded(model) -> str:
    from peftlab.methods.inject import BASE_NAME

    return next(reversed(getattr(model, "peftlab_adapters", {}) or {BASE_NAME: None}))


def row_adapters(rows: Sequence[dict], default: str, source: str) -> list[str]:
    """Each row's adapter: its 'adapter' field, or for a row without one `default`."""
    names = []
    for number, row in enumerate(rows, 1):
        name = row.get("adapter") or default
        if not isinstance(name, str):
            raise PeftlabError(f"{source} row {number}: 'adapter' must be an adapter's name, got {name!r}")
        names.append(name)
    return names
