"""Recompute instead of keep: backward reads some activations that are cheap to rebuild, exactly, from tensors
it keeps anyway (RMSNorm's output from x and 1/rms; T5's dropout(GELU(gate) * up) from gate, up and the
dropout mask). A module marks such an output `recomputable`; under `recomputing()` autograd then keeps the
recipe in its place and runs it when backward reads the tensor. Unlike gradient checkpointing nothing runs
twice but these elementwise recipes, and the gradients are bit for bit the same. `recomputing(redraw_masks=
True)` (`run.redraw_masks`) also redraws dropout masks drawn by numpy (CPU) from their seeds: that trades a
second draw of every mask for the masks' packed bits (bench/RESULTS.md, the +redraw rows).

A recipe holds tensors that the graph keeps anyway (a marked input enters as its own recipe), or, for a
dropout mask, its bits packed eight to a byte (`lean.keep_mask`); it checks their versions as autograd checks
what it saved, and runs under the autocast state the forward pass had.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

RECIPE = "_peftlab_recipe"  # a marked tensor's attribute: (Recipe, the tensor's version when marked)


class Recipe:
    """compute(*inputs, *args) under the autocast state of the forward pass; each input is a tensor (with the
    version it had) or another Recipe. Backward may read one marked tensor several times (q, k and v read one
    normalised x): the first read computes it, the last one drops it."""

    def __init__(self, compute: Callable[..., torch.Tensor], inputs: tuple, versions: tuple, args: tuple,
                 autocast: tuple[str, bool, torch.dtype]) -> None:
        self.compute, self.inputs, self.versions, self.args = compute, inputs, versions, args
        self.autocast = autocast  # device type, enabled, dtype
        self.unread = 0  # saved references that backward has not read yet
        self.value: torch.Tensor | None = None

    def packed(self) -> None:
        self.unread += 1

    def tensors(self) -> Iterator[torch.Tensor]:
        """The tensors this recipe (and those it reads) holds."""
        for x in self.inputs:
            yield from x.tensors() if isinstance(x, Recipe) else (x,)

    def current(self) -> torch.Tensor:
        """The value a read in progress computed, else a fresh one, kept for a read still to come (a dropout
        mask is an input of the dropped-out tensor's recipe as well as saved itself)."""
        if self.value is not None:
            return self.value
        value = self()
        if self.unread > 0:
            self.value = value
        return value

    def read(self) -> torch.Tensor:
        value = self.current()
        self.unread -= 1
        self.value = value if self.unread > 0 else None  # a second backward (retain_graph) recomputes each read
        return value

    def __call__(self) -> torch.Tensor:
        values = []
        for x, version in zip(self.inputs, self.versions, strict=True):
            if isinstance(x, Recipe):
                x = x.current()
            elif x._version != version:
                raise RuntimeError("a tensor needed to recompute a saved activation was modified in place "
                                   "after the forward pass: run backward before changing it")
            values.append(x)
        device, enabled, dtype = self.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return self.compute(*values, *self.args)


def recomputable(out: torch.Tensor, compute: Callable[..., torch.Tensor], inputs: tuple, *args) -> torch.Tensor:
    """Mark `out`, just computed as compute(*inputs, *args), for `recomputing()`; returns `out`. An input that
    is marked, or a view of a marked tensor, enters as its recipe, not as the tensor."""
    device = out.device.type
    autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    parts = tuple(_input_recipe(x, autocast) or x for x in inputs)
    versions = tuple(None if isinstance(x, Recipe) else x._version for x in parts)
    setattr(out, RECIPE, (Recipe(compute, parts, versions, args, autocast), out._version))
    return out


def _input_recipe(x: torch.Tensor, autocast: tuple[str, bool, torch.dtype]) -> Recipe | None:
    """The recipe of x, or of the view x is of a marked tensor (as `_pack` keeps a saved view)."""
    recipe = _recipe_of(x)
    if recipe is not None or x._base is None or (base := _recipe_of(x._base)) is None or x._base.dtype != x.dtype:
        return recipe
    return Recipe(torch.as_strided, (base,), (None,), (x.shape, x.stride(), x.storage_offset()), autocast)


def is_recomputable(t: torch.Tensor) -> bool:
    """Whether t, or the tensor t is a view of, is marked (what `recomputable` takes as a recipe)."""
    return _recipe_of(t if t._base is None else t._base) is not None


def _recipe_of(t: torch.Tensor) -> Recipe | None:
    marked = getattr(t, RECIPE, None)
    return marked[0] if marked is not None and marked[1] == t._version else None  # not after an in-place change


@dataclass(frozen=True, eq=False)
class _Recomputed:
    """What backward keeps for a marked tensor, or a view of one: the recipe and the view's geometry."""

    recipe: Recipe
    view: tuple[torch.Size, tuple[int, ...], int] | None


_kept_observers: list[Callable[[torch.Tensor], None]] = []


def _pack(t: torch.Tensor):
    base = t if t._base is None else t._base
    recipe = _recipe_of(base)
    if recipe is None or base.dtype != t.dtype:
        for observe in _kept_observers:
            observe(t)
        return t
    recipe.packed()
    for observe in _kept_observers:
        for kept in recipe.tensors():
            observe(kept)
    return _Recomputed(recipe, None if base is t else (t.shape, t.stride(), t.storage_offset()))


def _unpack(saved) -> torch.Tensor:
    if not isinstance(saved, _Recomputed):
        return saved
    value = saved.recipe.read()
    return value if saved.view is None else value.as_strided(*saved.view)


_redrawing_masks = contextvars.ContextVar("peftlab_redraw_masks", default=False)


@contextlib.contextmanager
def recomputing(redraw_masks: bool = False) -> Iterator[None]:
    """Inside, autograd keeps the recipe of a marked tensor instead of the tensor. Harmless where nothing is
    marked; gradient checkpointing's own hooks take over inside a checkpointed block. `redraw_masks`: dropout
    masks are marked too (`lean.keep_mask`), and backward draws them again: less memory, the draw time twice."""
    token = _redrawing_masks.set(redraw_masks)
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _redrawing_masks.reset(token)


def redraws_masks() -> bool:
    """Whether dropout masks drawn now are to be redrawn in backward (inside `recomputing(redraw_masks=True)`)."""
    return _redrawing_masks.get()


@contextlib.contextmanager
def observing_kept(observe: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Inside, `recomputing()` hands `observe` each tensor that backward keeps: those saved as they are and
    those the recipes kept in place of others hold (a tensor may come more than once: count storages)."""
    _kept_observers.append(observe)
    try:
        yield
    finally:
        _kept_observers.remove(observe)
