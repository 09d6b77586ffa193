"""Prompt tuning (Lester et al. 2021, arXiv 2104.08691): n trainable "virtual token" embeddings prepended
to the input; the model itself stays frozen. Same tensor, file and numerics as peft's PROMPT_TUNING.

peft wraps the model's forward; peftlab keeps the model's own forward (so the training loop, chunked loss
and `generate` are unchanged) and prepends the prompt with hooks on the module that embeds the input:
- seq2seq: the encoder; the model-level attention mask (used by cross-attention) gets n leading ones;
- causal LM: the decoder stack; the n virtual positions are cut from its output, so logits and labels keep
  the caller's length (peft's logits have n extra leading positions with label -100: the same loss);
- classification: the encoder stack (its pooled first position is then a virtual token, as in peft).
The caller's attention mask never includes the virtual tokens.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache

from peftlab.archs import task_of_model
from peftlab.errors import PeftlabError
from peftlab.methods.inject import AdapterLayer, MethodConfig

INITS = ("sample_vocab", "random")


@dataclass(repr=False)
class PromptTuningConfig(MethodConfig):
    num_virtual_tokens: int = 20
    init: str = "sample_vocab"  # embeddings of random vocabulary tokens, or N(0, 1) (peft's RANDOM)

    method: ClassVar[str] = "prompt_tuning"
    mergeable: ClassVar[bool] = False  # a soft prompt is input, not a weight
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.targets = None  # nothing is wrapped: the prompt enters through hooks
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise PeftlabError(f"prompt tuning needs num_virtual_tokens > 0, got {self.num_virtual_tokens!r}: "
                               "use e.g. num_virtual_tokens=20")
        if self.init not in INITS:
            raise PeftlabError(f"prompt tuning init must be one of {INITS}, got {self.init!r}")

    def prepare(self, model: nn.Module, adapter: str) -> None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embeddings, nn.Embedding):
            raise PeftlabError(f"prompt tuning needs a model with an input embedding layer; "
                               f"{type(model).__name__} has none: pick another method, e.g. lora")
        layer = getattr(model, PROMPT_ATTR, None)
        if layer is None:
            layer = SoftPrompt(model)
            model.add_module(PROMPT_ATTR, layer)
        elif layer.num_virtual_tokens != self.num_virtual_tokens:
            raise PeftlabError(f"the model already has a {layer.num_virtual_tokens}-token prompt adapter: every "
                               f"prompt adapter on one model needs the same length, not {self.num_virtual_tokens}")
        layer.add_adapter(adapter, self.num_virtual_tokens, self.init)

    def extra_tensors(self, model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
        layer = getattr(model, PROMPT_ATTR, None)
        return {"prompt_embeddings": layer.prompts[adapter]} if layer is not None and adapter in layer.prompts else {}

    def to_peft(self) -> dict[str, Any]:
        return {"auto_mapping": None, "base_model_name_or_path": self.base_model_name_or_path,
                "inference_mode": True, "modules_to_save": self.modules_to_save,
                "num_virtual_tokens": self.num_virtual_tokens, "peft_type": self.peft_type,
                "prompt_tuning_init": "SAMPLE_VOCAB" if self.init == "sample_vocab" else "RANDOM",
                "prompt_tuning_init_text": None, "revision": None, "task_type": self.task_type,
                "tokenizer_kwargs": None, "tokenizer_name_or_path": None}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> PromptTuningConfig:
        return cls(num_virtual_tokens=raw.get("num_virtual_tokens", 20), modules_to_save=raw.get("modules_to_save"),
                   init="random" if raw.get("prompt_tuning_init") == "RANDOM" else "sample_vocab",
                   base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"))


PROMPT_ATTR = "peftlab_prompt"


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    """`cls.forward`'s signature without `self`."""
    signature = inspect.signature(cls.forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _kind(model: nn.Module) -> str:
    return task_of_model(model) or "causal"


class SoftPrompt(AdapterLayer):
    """The virtual-token embeddings of every prompt adapter and the hooks that put the active one in front of
    the input. Held at `model.peftlab_prompt`; removing the last adapter removes the hooks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.kind = _kind(model)
        self.base_layer = None  # wraps no module: removing the last adapter leaves nothing in its place
        self.prompts = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.batch_adapters: list[str] | None = None
        self.num_virtual_tokens = 0
        # plain attributes, not submodules: the model owns these modules
        self.__dict__["embed"] = model.get_input_embeddings()
        inner = model.get_encoder() if self.kind == "seq2seq" else model.base_model
        self.__dict__["inner"] = inner
        self._cut = False
        self._handles = [inner.register_forward_pre_hook(self._before_inner, with_kwargs=True)]
        if self.kind == "seq2seq":
            self._handles.append(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        if self.kind == "causal":
            self._handles.append(inner.register_forward_hook(self._after_inner))

    def add_adapter(self, name: str, num_virtual_tokens: int, init: str) -> None:
        # peft keeps one prompt per transformer stack (2 for encoder-decoders) though prompt tuning only
        # uses the first: the same shape keeps files and counts identical
        rows = num_virtual_tokens * (2 if self.kind == "seq2seq" else 1)
        weight = self.embed.weight
        if init == "sample_vocab":
            ids = torch.randint(0, weight.shape[0], (rows,), device=weight.device)
            values = weight.detach()[ids].clone()
        else:
            values = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        self.prompts[name] = nn.Parameter(values)
        self.num_virtual_tokens = num_virtual_tokens
        self.active_adapters = [name]

    def adapter_names(self) -> list[str]:
        return list(self.prompts)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {}  # saved under peft's top-level name by PromptTuningConfig.extra_tensors

    def remove_adapter(self, name: str) -> None:
        del self.prompts[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        if not self.prompts:
            for handle in self._handles:
                handle.remove()

    def merge(self) -> None:
        if self.active_adapters:
            raise PeftlabError("a soft prompt cannot be merged into the weights: keep the adapter "
                               "(peftlab load_adapter) instead of merging or exporting")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def _prompt(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.batch_adapters is not None:
            raise PeftlabError("prompt tuning cannot run a mixed batch of adapters: use one adapter at a time")
        if not self.active_adapters:
            return None
        prompt = self.prompts[self.active_adapters[0]][: self.num_virtual_tokens]
        return prompt.to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def _ones(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([mask.new_ones(mask.shape[0], self.num_virtual_tokens), mask], dim=1)

    @staticmethod
    def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Every argument of a call by name (callers pass input_ids positionally or not)."""
        if not args:
            return dict(kwargs)
        signature = _forward_signature(type(module))
        arguments = signature.bind_partial(*args, **kwargs).arguments
        var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        return {**arguments, **(arguments.pop(var_keyword, {}) if var_keyword else {})}

    def _before_model(self, module, args, kwargs):
        """seq2seq: cross-attention reads the model-level mask, which must cover the virtual tokens."""
        if not self.active_adapters:
            return None
        kwargs = self._bound(module, args, kwargs)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = self._ones(kwargs["attention_mask"])
        return (), kwargs

    def _before_inner(self, module, args, kwargs):
        self._cut = False
        kwargs = self._bound(module, args, kwargs)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        # the key-value cache (named past_key_values or cache, by model): once filled, it holds the prompt
        past = next((v for v in kwargs.values() if isinstance(v, Cache)), None)
        if not self.active_adapters:
            return None
        if past is not None and past.get_seq_length() > 0:  # a later generation step: the cache holds the prompt
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = self._ones(kwargs["attention_mask"])
            if kwargs.get("cache_position") is not None:
                kwargs["cache_position"] = kwargs["cache_position"] + self.num_virtual_tokens
            kwargs["position_ids"] = None  # positions continue from the cache, as the first step counted them
            return (), kwargs
        if embeds is None:
            embeds = self.embed(ids)
        length = embeds.shape[1]
        kwargs["input_ids"], kwargs["inputs_embeds"] = None, torch.cat([self._prompt(len(embeds), embeds.dtype),
                                                                        embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] == length:  # (seq2seq: the model-level hook may have done it)
            kwargs["attention_mask"] = self._ones(mask)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(len(embeds), self.num_virtual_tokens), types], dim=1)
        kwargs["position_ids"] = None  # as peft: positions 0, 1, ... over prompt and input (padding included)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(length + self.num_virtual_tokens, device=embeds.device)
        self._cut = self.kind == "causal"
        return (), kwargs

    def _after_inner(self, module, args, output):
        if self._cut:
            self._cut = False
            output.last_hidden_state = output.last_hidden_state[:, self.num_virtual_tokens:]
        return output
