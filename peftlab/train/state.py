"""Checkpoints: `checkpoint-<step>/` = the trained weights (peft format for adapters) + trainer_state.pt
(optimizer, scheduler, RNG, data position), written to a temporary directory and renamed."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftlabError, first_line
from peftlab.io import finalize_tree, fsync_path

STATE_NAME = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model: nn.Module, save_weights, trainer_state: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint-<step> atomically, then delete all but the newest `keep` checkpoints."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(model, tmp)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_NAME)
        finalize_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_path(out)
    finally:  # a full disk leaves no half-written checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume == "latest":
        checkpoints = list_checkpoints(out)
        if not checkpoints:
            raise PeftlabError(f"--resume latest: {out} has no checkpoint-* directory; train with --save-steps N")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise PeftlabError(f"--resume {resume}: no {STATE_NAME} there; point to a checkpoint-<step> directory")
    return path


def resume_hint(out: Path) -> str:
    """Where a stopped run can continue from, for the message that stops it."""
    checkpoints = list_checkpoints(out) if out.is_dir() else []
    if not checkpoints:
        return "no checkpoint was saved (train with --save-steps N to keep some)"
    return f"the last saved checkpoint {checkpoints[-1]} is untouched (resume from it with --resume latest)"


def interrupted_hint(out: Path, step: int) -> str:
    """What a user stopping a run (Ctrl-C) needs next: where it can continue from."""
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        return f"interrupted after step {step}; no checkpoint was saved (train with --save-steps N to keep some)"
    return (f"interrupted after step {step}; {checkpoints[-1]} is saved: run the same command with "
            "--resume latest to continue from it")


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PeftlabError(f"{checkpoint / STATE_NAME} cannot be read ({first_line(e)}): "
                           "resume from an earlier checkpoint") from None
