"""Read a table of examples with the `datasets` library: local files, or hub dataset ids when online."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets

from peftlab.errors import PeftlabError, first_line

datasets.disable_progress_bars()  # one bar per run is ours; tiny local files need none

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def load_table(source: str, split: str = "train", column_names: list[str] | None = None) -> datasets.Dataset:
    """A `datasets.Dataset` from a local file or a hub id (`name` or `name:split`); `column_names` names the
    columns of a CSV/TSV file that has no header row."""
    path = Path(source)
    if path.suffix in BUILDERS or path.exists():
        if not path.is_file():
            raise PeftlabError(f"data file {source} not found: check the path")
        builder = BUILDERS.get(path.suffix)
        if builder is None:
            raise PeftlabError(f"cannot read {source}: use a .jsonl, .json, .csv, .tsv or .parquet file")
        if path.stat().st_size == 0:
            raise PeftlabError(f"data file {source} is empty: it needs at least one example")
        # A TSV field holds any character but tab and newline, quotes included ('"Yes," she said'): GLUE's
        # files are read so, while CSV quoting would eat those quotes and change the text
        check_text_file(path)
        extra = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
        if column_names:
            if builder != "csv":
                raise PeftlabError(f"data.column_names names the columns of a CSV/TSV file without a header row; "
                                   f"{source} is {path.suffix[1:]}, whose rows name their own: drop column_names")
            extra["column_names"] = list(column_names)
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", **extra)
        except Exception as e:  # datasets raises many types for a malformed file
            raise PeftlabError(f"cannot parse {source} as {path.suffix[1:]} ({first_line(e)})") from None
    else:
        name, _, hub_split = source.partition(":")
        try:
            table = datasets.load_dataset(name, split=hub_split or split)
        except Exception as e:
            offline = " (offline: use a local file)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise PeftlabError(f"cannot load dataset {source!r}{offline}: {first_line(e)}") from None
    if len(table) == 0:
        raise PeftlabError(f"dataset {source} is empty: it needs at least one example")
    return table


def check_text_file(path: Path) -> None:
    """A text data file must be UTF-8, and a jsonl file one JSON object a line: the error names the line, which
    the `datasets` parser does not."""
    if path.suffix == ".parquet":
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PeftlabError(f"{path} line {number} is not UTF-8 text (byte {e.start} of the line): save the "
                                   "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if "\0" in line:
                raise PeftlabError(f"{path} line {number} holds a NUL byte: this looks like a binary file, not "
                                   f"{path.suffix[1:]} text")
            if path.suffix == ".jsonl" and line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise PeftlabError(f"{path} line {number} is not valid JSON ({first_line(e)}): fix or remove "
                                       "that line") from None
                if not isinstance(row, dict):
                    raise PeftlabError(f"{path} line {number} is a JSON {type(row).__name__}, not an object with "
                                       'named fields such as {"text": ..., "label": ...}')


TRAIN_COLUMNS_FIX = ("set --input-column / --target-column (or use --template; a causal LM learns the text alone "
                     "with --target-column '')")


def require_columns(table: datasets.Dataset, columns: list[str], source: str, fix: str = TRAIN_COLUMNS_FIX) -> None:
    """Refuse a table without the columns the task reads; `fix` says what the calling command can change."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise PeftlabError(f"{source} lacks column(s) {missing}; it has {table.column_names}: {fix}")
