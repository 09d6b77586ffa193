"""Length-grouped, deterministic batches with dynamic padding."""

from __future__ import annotations

from typing import Any

import torch

from peftlab.data.tasks import IGNORE_INDEX


def batch_order(lengths: list[int], batch_size: int, seed: int, group_by_length: bool) -> list[list[int]]:
    """Example indices per batch for one epoch: shuffled by `seed`; with grouping, similar lengths share a
    batch (sorted within windows of 50 batches) so padding stays small while order stays random."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = batch_size * 50
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch; labels padded with -100 (ignored by the loss)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, :len(e["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in examples[0]:  # a text pair: padding is segment 0, as the tokenizer pads
        batch["token_type_ids"] = torch.zeros_like(input_ids)
        for row, e in enumerate(examples):
            batch["token_type_ids"][row, :len(e["token_type_ids"])] = torch.tensor(e["token_type_ids"])
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        label_width = max(len(e["labels"]) for e in examples)
        labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            labels[row, :len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch


def batch_tokens(batch: dict[str, torch.Tensor], seq2seq: bool) -> int:
    """Tokens the step processes (encoder inputs plus decoder targets): the unit of tokens/s."""
    tokens = int(batch["attention_mask"].sum())
    if seq2seq:
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    return tokens
