"""Turn rows into token ids and labels for each task: seq2seq, causal LM, classification."""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import PeftlabError

IGNORE_INDEX = -100  # label positions the loss skips (padding, prompts)


def required_columns(template: str | None, input_column: str, target_column: str | None,
                     pair_column: str | None = None) -> list[str]:
    """The columns a row must have: the template's fields (or the input column), the pair's and the target."""
    others = [c for c in (pair_column, target_column) if c]
    if not template:
        return [input_column] + others
    hint = "name columns as {column} and write a literal brace as {{ or }}"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise PeftlabError(f"template {template!r} is not a format string ({e}): {hint}") from None
    if unnamed := [f for f in fields if not f or f.isdigit()]:
        raise PeftlabError(f"template {template!r} has positional field(s) {['{' + f + '}' for f in unnamed]}: {hint}")
    if not fields:
        raise PeftlabError(f"template {template!r} names no column, so every example would get the same input: {hint}")
    return fields + others


@contextmanager
def truncation_side(tokenizer: Any, side: str) -> Iterator[None]:
    """Truncate from `side` inside the block; the tokenizer is shared (training, eval, saved runs)."""
    before, tokenizer.truncation_side = tokenizer.truncation_side, side
    try:
        yield
    finally:
        tokenizer.truncation_side = before


@dataclass
class Formatter:
    """Everything needed to turn one row into model inputs."""

    task: str
    tokenizer: Any
    input_column: str
    target_column: str | None
    template: str | None = None
    max_source_length: int = 128
    max_target_length: int = 64
    labels: list[str] = field(default_factory=list)
    pair_column: str | None = None  # classification: the second text of a pair (RTE's sentence2)
    pack: bool = False  # causal LM on text alone: texts joined (EOS after each), cut into max_source_length blocks
    truncated: int = 0  # texts (sources, targets) cut to fit the maximum lengths

    def __post_init__(self) -> None:
        if self.pair_column and self.task != "classification":
            raise PeftlabError(f"data.pair_column is for classification of text pairs, this task is {self.task}: "
                               "name both columns in --template instead")
        if self.pack and (self.task != "causal" or self.target_column):
            raise PeftlabError(f"data.pack joins the texts of a causal LM trained on text alone, this is a {self.task} "
                               f"task with target column {self.target_column!r}: use --target-column '' or drop pack")

    @classmethod
    def for_data(cls, task: str, tokenizer: Any, data: Any, labels: list[str]) -> Formatter:
        """The formatter a config's data section asks for (training and eval build the same one)."""
        return cls(task, tokenizer, data.input_column, data.target_column, data.template, data.max_source_length,
                   data.max_target_length, labels, data.pair_column, data.pack)

    def encode_all(self, rows: Iterable[dict]) -> list[dict[str, Any]]:
        """Every row's example; with `pack`, the rows' tokens as one stream cut into blocks (the last one shorter),
        as HF's run_clm groups texts, so no text is cut short and no block holds padding but the last."""
        examples = [self(row) for row in rows]
        if not self.pack:
            return examples
        stream = [i for e in examples for i in e["input_ids"]]
        size = self.max_source_length
        return [{"input_ids": stream[s:s + size], "labels": stream[s:s + size]} for s in range(0, len(stream), size)]

    def source(self, row: dict) -> str:
        return self.template.format(**row) if self.template else str(row[self.input_column])

    def _ids(self, text: str, limit: int, special: bool = True, side: str = "right") -> list[int]:
        return self._encode(text, limit, special, side)["input_ids"]

    def _encode(self, text: str, limit: int, special: bool = True, side: str = "right",
                pair: str | None = None) -> dict[str, list[int]]:
        """input_ids (and for a pair, the tokenizer's token_type_ids), cut to `limit` tokens from `side`;
        a pair is cut from its longer text first."""
        # limit + 1 tells a text that fits from one that does not, without transformers' warning about
        # sequences longer than the model's maximum (training warns with its own count of what was cut)
        encoded = self.tokenizer(text, pair, add_special_tokens=special, truncation=True, max_length=limit + 1)
        if len(encoded["input_ids"]) > limit:
            self.truncated += 1
            with truncation_side(self.tokenizer, side):
                encoded = self.tokenizer(text, pair, add_special_tokens=special, truncation=True, max_length=limit)
        keys = ("input_ids", "token_type_ids") if pair is not None else ("input_ids",)
        return {k: encoded[k] for k in keys if k in encoded}

    def __call__(self, row: dict) -> dict[str, Any]:
        return getattr(self, f"_{self.task}")(row)

    def _seq2seq(self, row: dict) -> dict[str, Any]:
        return {"input_ids": self._ids(self.source(row), self.max_source_length),
                "labels": self._ids(str(row[self.target_column]), self.max_target_length)}

    def _causal(self, row: dict) -> dict[str, Any]:
        if self.pack:  # the whole text and an EOS that ends it; encode_all cuts the stream into blocks
            ids = self.tokenizer(self.source(row), verbose=False)["input_ids"]
            return {"input_ids": ids + [self.tokenizer.eos_token_id], "labels": []}
        if not self.target_column:  # plain language modelling on the text
            text = self._ids(self.source(row), self.max_source_length)
            return {"input_ids": text, "labels": list(text)}
        # A prompt keeps its end (the template's response cue leads into the response) and its special tokens.
        prompt = self._ids(self.source(row), self.max_source_length, side="left")
        response = self._ids(str(row[self.target_column]), self.max_target_length - 1, special=False)
        response.append(self.tokenizer.eos_token_id)
        return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}

    def _classification(self, row: dict) -> dict[str, Any]:
        label = str(row[self.target_column])
        if label not in self.label_ids:
            raise PeftlabError(f"label {label!r} is not in the known set {self.labels}: fix the data or list all "
                               "labels in data.labels")
        pair = str(row[self.pair_column]) if self.pair_column else None
        return {**self._encode(self.source(row), self.max_source_length, pair=pair), "labels": self.label_ids[label]}

    @property
    def label_ids(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}
