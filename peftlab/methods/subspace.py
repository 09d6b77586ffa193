"""Intrinsic-dimension subspace fine-tuning (Li et al. 2018, arXiv 1804.08838; Aghajanyan et al. 2020,
arXiv 2012.13255): every trained tensor moves only inside a random d-dimensional subspace,

    DID:  θ_i = θ0_i + P_i θ_d          SAID: θ_i = θ0_i + λ_i P_i θ_d   (one trainable λ per tensor)

P_i is a Fastfood transform S·H·G·Π·H·B (H: Walsh-Hadamard, G: Gaussian, Π: permutation, B: random signs),
applied in O(L log L) from factors drawn from a per-tensor seed: no D×d matrix exists. The factors are drawn
once per tensor and kept compactly (9 bytes per padded entry: drawing them was most of a step's cost), and are
not saved: the seed rebuilds them. The weights are computed on the fly through `torch.nn.utils.parametrize`:
the original θ0 is the only full copy. The adapter file holds θ_d and the λs; the seed in its config rebuilds every P_i.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftlab.errors import PeftlabError
from peftlab.methods.inject import AdapterLayer, MethodConfig, is_target

SUBSPACE_ATTR = "peftlab_subspace"


@functools.cache
def sylvester_matrix(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The size x size Walsh-Hadamard matrix (size a power of two), entries ±1."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def hadamard_transform(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform of a vector whose length is a power of two.

    H_L is a Kronecker product of small Sylvester matrices, one per group of index bits, so each pass is one
    (batched) GEMM over an axis of a reshaped view instead of log2(L) elementwise passes."""
    length = x.shape[-1]
    after = 1  # the product of the axes to the right of the one being transformed
    while after < length:
        k = min(length // after, block)
        h = sylvester_matrix(k, x.device)
        x = x.reshape(-1, k) @ h if after == 1 else torch.matmul(h, x.reshape(-1, k, after))
        after *= k
    return x.reshape(length)


class Fastfood:
    """The random factors of one d -> D Fastfood projection, drawn from `seed` on the device."""

    def __init__(self, d: int, size: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.d, self.size = d, size
        self.length = 1 << max(math.ceil(math.log2(max(size, d))), 1)
        generator = torch.Generator(device=device).manual_seed(seed)
        # kept compact (9 bytes per entry): drawing them is most of the cost, so Subspace builds each once
        self.signs = (torch.randint(0, 2, (self.length,), generator=generator, device=device) * 2 - 1).to(torch.int8)
        self.permutation = torch.randperm(self.length, generator=generator, device=device).int()
        self.gaussian = torch.randn(self.length, generator=generator, device=device)
        # unit-norm columns: H G Π H B has column norm sqrt(L Σ G²); keeping D of L rows shrinks it by sqrt(D / L)
        self.scale = 1 / math.sqrt(self.length * float(self.gaussian.square().sum()) * size / self.length)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(theta, (0, self.length - self.d)) * self.signs
        x = hadamard_transform(x)[self.permutation] * self.gaussian
        return hadamard_transform(x)[: self.size] * self.scale

    def transpose(self, grad: torch.Tensor) -> torch.Tensor:
        """P^T grad (D -> d): the same factors in reverse order (H is symmetric, Π^T scatters)."""
        x = hadamard_transform(torch.nn.functional.pad(grad * self.scale, (0, self.length - self.size)))
        unpermuted = torch.empty_like(x)
        unpermuted[self.permutation] = x * self.gaussian
        return (hadamard_transform(unpermuted) * self.signs)[: self.d]


class ScaledProjection(torch.autograd.Function):
    """λ P θ for one tensor, saving θ, λ and P θ (for λ's gradient): backward applies P^T from the same
    factors (autograd through the transform would keep several L-sized intermediates per tensor)."""

    @staticmethod
    def forward(ctx, theta, scale, projection: Fastfood):
        projected = projection(theta)
        ctx.save_for_backward(theta, scale, projected if ctx.needs_input_grad[1] else None)
        ctx.projection = projection
        return projected * scale

    @staticmethod
    def backward(ctx, grad):
        theta, scale, projected = ctx.saved_tensors
        projection = ctx.projection
        grad_theta = projection.transpose(grad.reshape(-1)) * scale if ctx.needs_input_grad[0] else None
        grad_scale = (grad.reshape(-1) @ projected).reshape(scale.shape) if ctx.needs_input_grad[1] else None
        return grad_theta, grad_scale, None


@dataclass(repr=False)
class SubspaceConfig(MethodConfig):
    d: int = 1000
    said: bool = True  # one trainable scale per tensor (SAID); False: DID
    seed: int = 0
    parameters: list[str] | str = ".*"  # the parameters to move: names or suffixes, or a regex (full match)

    method: ClassVar[str] = "said"
    peft_type: ClassVar[str] = "INTRINSIC_DIM"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.d, int) or self.d <= 0:
            raise PeftlabError(f"the subspace dimension d must be a positive integer, got {self.d!r}: use e.g. d=1000")

    def prepare(self, model: nn.Module, adapter: str) -> None:
        if getattr(model, SUBSPACE_ATTR, None) is not None:
            raise PeftlabError("the model already has a subspace adapter: remove it first (one per model)")
        probe = MethodConfig(targets=self.parameters, exclude=self.exclude, modules_to_save=self.modules_to_save)
        names = [n for n, _ in model.named_parameters() if is_target(probe, n)]
        if not names:
            raise PeftlabError(f"parameters {self.parameters!r} match no parameter of {type(model).__name__}")
        model.add_module(SUBSPACE_ATTR, Subspace(model, names, adapter, self))

    def extra_tensors(self, model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
        subspace = getattr(model, SUBSPACE_ATTR, None)
        if subspace is None or adapter not in subspace.theta:
            return {}
        tensors = {"intrinsic.theta": subspace.theta[adapter]}
        if self.said:
            tensors["intrinsic.lambdas"] = subspace.lambdas[adapter]
        return tensors

    def unload(self, model: nn.Module) -> None:
        for module, name in Subspace.parametrized(model):
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)

    def to_peft(self) -> dict[str, Any]:
        return {"base_model_name_or_path": self.base_model_name_or_path, "d": self.d, "exclude_modules": self.exclude,
                "inference_mode": True, "modules_to_save": self.modules_to_save, "peft_type": self.peft_type,
                "parameters": self.parameters, "said": self.said, "seed": self.seed, "task_type": self.task_type}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> SubspaceConfig:
        config_class = SubspaceConfig if raw.get("said", True) else DIDConfig
        return config_class(d=raw.get("d", 1000), seed=raw.get("seed", 0), parameters=raw.get("parameters", ".*"),
                            exclude=raw.get("exclude_modules"), modules_to_save=raw.get("modules_to_save"),
                            base_model_name_or_path=raw.get("base_model_name_or_path"),
                            task_type=raw.get("task_type"))


@dataclass(repr=False)
class DIDConfig(SubspaceConfig):
    said: bool = False

    method: ClassVar[str] = "did"


class Offset(nn.Module):
    """Parametrization θ0 -> θ0 + λ_i P_i θ_d for one tensor (reads θ_d and λ from the shared Subspace)."""

    def __init__(self, subspace: Subspace, index: int, size: int, seed: int) -> None:
        super().__init__()
        self.__dict__["subspace"] = subspace  # not a submodule: the model holds it once
        self.index, self.size, self.seed = index, size, seed

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        delta = self.subspace.delta(self.index, self.size, self.seed, original.device)
        return original if delta is None else original + delta.view_as(original).to(original.dtype)


class Subspace(AdapterLayer):
    """θ_d and the λs of the subspace adapter, held at `model.peftlab_subspace`."""

    def __init__(self, model: nn.Module, names: list[str], adapter: str, config: SubspaceConfig) -> None:
        super().__init__()
        self.base_layer = None
        self.said = config.said
        self.theta = nn.ParameterDict({adapter: nn.Parameter(torch.zeros(config.d))})
        self.lambdas = nn.ParameterDict({adapter: nn.Parameter(torch.ones(len(names)))} if config.said else {})
        self.active_adapters, self.merged_adapters = [adapter], []
        self.batch_adapters: list[str] | None = None
        self.__dict__["offsets"] = []  # (module, tensor name, Offset): the model owns the modules
        self.__dict__["projections"] = {}  # (index, device) -> Fastfood, built on first use
        # tied tensors (e.g. input embeddings and LM head) move together: every owner gets the same offset
        owners: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(name)
        for index, name in enumerate(names):
            module_name, _, tensor = name.rpartition(".")
            size = model.get_parameter(name).numel()
            offset = Offset(self, index, size, zlib.crc32(f"{config.seed}:{name}".encode()))
            for alias in owners[id(model.get_parameter(name))]:
                module_name, _, tensor = alias.rpartition(".")
                module = model.get_submodule(module_name)
                if not (parametrize.is_parametrized(module, tensor)):  # a module shared under two names
                    parametrize.register_parametrization(module, tensor, offset)
            self.offsets.append((module, tensor, offset))

    @staticmethod
    def parametrized(model: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(m, name) for m in model.modules() if parametrize.is_parametrized(m)
                for name, chain in m.parametrizations.items() if any(isinstance(p, Offset) for p in chain)]

    def delta(self, index: int, size: int, seed: int, device: torch.device) -> torch.Tensor | None:
        if not self.active_adapters or self.merged_adapters:
            return None
        name = self.active_adapters[0]
        theta = self.theta[name].to(device)
        scale = self.lambdas[name][index].to(device) if self.said else torch.ones((), device=device)
        key = (index, str(device))
        if key not in self.projections:
            self.projections[key] = Fastfood(theta.numel(), size, seed, device)
        return ScaledProjection.apply(theta, scale, self.projections[key])

    def adapter_names(self) -> list[str]:
        return list(self.theta)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {}  # saved under their own names by SubspaceConfig.extra_tensors

    def remove_adapter(self, name: str) -> None:
        raise PeftlabError("a subspace adapter cannot be removed in place: reload the base model")

    @torch.no_grad()
    def merge(self) -> None:
        """Write θ0 + λ P θ_d into the stored originals (the parametrization then adds nothing)."""
        if self.merged_adapters or not self.active_adapters:
            return
        self._shift_originals(+1)
        self.merged_adapters.append(self.active_adapters[0])

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_adapters:
            self.merged_adapters.clear()
            self._shift_originals(-1)

    def _shift_originals(self, sign: int) -> None:
        for module, tensor, offset in self.offsets:
            original = module.parametrizations[tensor].original
            original += sign * self.delta(offset.index, offset.size, offset.seed, original.device).view_as(original)
