"""The README is short and its commands run: every `peftlab` line of its bash blocks, in order, and its Python
block, on tiny presets (the pretrained MiniLM becomes random:bert-tiny, step counts shrink)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from peftlab.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def tiny(command: str) -> str:
    command = command.replace("minilm", "random:bert-tiny")
    return re.sub(r"(--max-steps\s+|run\.max_steps=|\"max_steps\": )\d+", lambda m: m.group(1) + "4", command)


def test_the_readme_is_short_and_links_only_files_that_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (README.parent / link).exists(), link


def test_every_command_in_the_readme_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("peftlab ")]
    assert len(commands) >= 8
    for command in commands:
        assert main(shlex.split(tiny(command))[1:]) == 0, (command, capsys.readouterr().err)
    assert "Pick" in (tmp_path / "sweeps/r/summary.md").read_text()


@pytest.mark.parametrize("block", blocks("python"))
def test_the_readme_python_runs(tmp_path, monkeypatch, block):
    monkeypatch.chdir(tmp_path)
    exec(compile(tiny(block), "README.md", "exec"), {})
    assert (tmp_path / "runs/py/adapter_model.safetensors").is_file()
    assert (tmp_path / "merged/py/config.json").is_file()
