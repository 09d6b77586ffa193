"""Batched generation for seq2seq and causal LMs (greedy or beam search)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peftlab.data.tasks import truncation_side
from peftlab.errors import PeftlabError
from peftlab.models import position_limit


@torch.no_grad()
def generate(model: nn.Module, tokenizer, sources: Sequence[str], task: str, batch_size: int = 8,
             max_new_tokens: int = 64, num_beams: int = 1, max_source_length: int = 512,
             on_batch=None) -> list[str]:
    """Decoded continuations of `sources`, in order; `on_batch(n)` is called after each batch (progress)."""
    ids = generate_ids(model, tokenizer, sources, task, batch_size, max_new_tokens, num_beams, max_source_length,
                       on_batch)
    return [o.strip() for o in tokenizer.batch_decode([i for i, _ in ids], skip_special_tokens=True)]


def end_tokens(model: nn.Module, tokenizer) -> set[int]:
    """The ids that end a generated sequence: the tokenizer's end of sequence and the model's generation config's
    (one id or a list, as Llama 3's)."""
    ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return {t for t in [tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends])] if t is not None}


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, sources: Sequence[str], task: str, batch_size: int = 8,
                 max_new_tokens: int = 64, num_beams: int = 1, max_source_length: int = 512, on_batch=None,
                 generator_kwargs: dict | None = None) -> list[tuple[list[int], int]]:
    """For each source: the new token ids (up to, not including, the end of sequence and padding) and the
    number of prompt tokens it was given. `generator_kwargs` go to HF generate (sampling settings)."""
    if max_new_tokens <= 0:
        raise PeftlabError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if task not in ("seq2seq", "causal"):
        raise PeftlabError(f"generation needs a seq2seq or causal model, this one is {task}: score it with "
                           "`peftlab eval -p CKPT` (its predictions.jsonl holds the predicted labels)")
    device = next(model.parameters()).device
    outputs: list[tuple[list[int], int]] = []
    side = "left" if task == "causal" else "right"  # a causal prompt ends where the output starts, and keeps its end
    tokenizer.padding_side = side
    _check_positions(model.config, tokenizer, sources, task, max_new_tokens, max_source_length, side)
    ends = end_tokens(model, tokenizer) | ({tokenizer.pad_token_id} - {None})
    for start in range(0, len(sources), batch_size):
        chunk = list(sources[start:start + batch_size])
        with truncation_side(tokenizer, side):
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_source_length,
                              return_tensors="pt").to(device)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   pad_token_id=tokenizer.pad_token_id,
                                   **(generator_kwargs or {"do_sample": False}))
        if task == "causal":
            generated = generated[:, batch["input_ids"].shape[1]:]
        elif model.config.decoder_start_token_id is not None:
            generated = generated[:, 1:]  # the decoder's start token is not output
        for row, prompt_tokens in zip(generated.tolist(), batch["attention_mask"].sum(1).tolist(), strict=True):
            cut = next((i for i, t in enumerate(row) if t in ends), len(row))
            outputs.append((row[:cut], int(prompt_tokens)))
        if on_batch:
            on_batch(len(chunk))
    return outputs


def _check_positions(config, tokenizer, sources: Sequence[str], task: str, max_new_tokens: int,
                     max_source_length: int, side: str) -> None:
    """Refuse, before generating anything, what the model cannot embed: a causal LM holds the longest prompt and
    every new token in one sequence, a seq2seq decoder the new tokens."""
    limit = position_limit(config)
    if limit is None:
        return
    if task == "seq2seq":
        if max_new_tokens >= limit:
            raise PeftlabError(f"--max-new-tokens {max_new_tokens} exceeds {config.model_type}'s {limit} decoder "
                               f"positions: use {limit - 1} or less")
        return
    with truncation_side(tokenizer, side):
        longest = max(len(ids) for ids in tokenizer(list(sources), truncation=True,
                                                    max_length=max_source_length)["input_ids"])
    if longest + max_new_tokens > limit:
        raise PeftlabError(f"the longest prompt ({longest} tokens) + --max-new-tokens {max_new_tokens} exceeds "
                           f"{config.model_type}'s {limit} positions: use --max-new-tokens {max(limit - longest, 1)} "
                           "or less, or shorter prompts (--max-source-length)")
