"""Turn rows into token ids and labels for each task: seq2seq, causal LM, classification."""

from __future__ import annotations

import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import PeftlabError

IGNORE_INDEX = -100  # label positions the loss skips (padding, prompts)


def required_columns(template: str | None, input_column: str, target_column: str | None) -> list[str]:
    """The columns a row must have: the template's fields (or the input column) and the target."""
    if not template:
        return [input_column] + ([target_column] if target_column else [])
    hint = "name columns as {column} and write a literal brace as {{ or }}"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise PeftlabError(f"template {template!r} is not a format string ({e}): {hint}") from None
    if unnamed := [f for f in fields if not f or f.isdigit()]:
        raise PeftlabError(f"template {template!r} has positional field(s) {['{' + f + '}' for f in unnamed]}: {hint}")
    if not fields:
        raise PeftlabError(f"template {template!r} names no column, so every example would get the same input: {hint}")
    return fields + ([target_column] if target_column else [])


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
    truncated: int = 0  # texts (sources, targets) cut to fit the maximum lengths

    def source(self, row: dict) -> str:
        return self.template.format(**row) if self.template else str(row[self.input_column])

    def _ids(self, text: str, limit: int, special: bool = True, side: str = "right") -> list[int]:
        # limit + 1 tells a text that fits from one that does not, without transformers' warning about
        # sequences longer than the model's maximum (the warning below counts what was cut)
        ids = self.tokenizer(text, add_special_tokens=special, truncation=True, max_length=limit + 1)["input_ids"]
        if len(ids) > limit:
            self.truncated += 1
            with truncation_side(self.tokenizer, side):
                ids = self.tokenizer(text, add_special_tokens=special, truncation=True, max_length=limit)["input_ids"]
        return ids

    def __call__(self, row: dict) -> dict[str, Any]:
        return getattr(self, f"_{self.task}")(row)

    def _seq2seq(self, row: dict) -> dict[str, Any]:
        return {"input_ids": self._ids(self.source(row), self.max_source_length),
                "labels": self._ids(str(row[self.target_column]), self.max_target_length)}

    def _causal(self, row: dict) -> dict[str, Any]:
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
        return {"input_ids": self._ids(self.source(row), self.max_source_length), "labels": self.label_ids[label]}

    @property
    def label_ids(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}
