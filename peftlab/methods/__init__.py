"""PEFT methods: one module each, sharing the injection machinery in `inject`."""

import re

from peftlab.errors import PeftlabError
from peftlab.methods.bitfit import BitFitConfig
from peftlab.methods.dora import DoraConfig
from peftlab.methods.full import FullConfig
from peftlab.methods.houlsby import HoulsbyConfig
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.inject import MethodConfig
from peftlab.methods.ln_tuning import LNTuningConfig
from peftlab.methods.lora import LoraConfig, LoraLayer
from peftlab.methods.prompt_tuning import PromptTuningConfig
from peftlab.methods.qlora import QLoraConfig
from peftlab.methods.subspace import DIDConfig, SubspaceConfig

METHODS = {c.method: c for c in (LoraConfig, DoraConfig, IA3Config, LNTuningConfig, BitFitConfig, HoulsbyConfig,
                                QLoraConfig, PromptTuningConfig, SubspaceConfig, DIDConfig, FullConfig)}

__all__ = ["METHODS", "BitFitConfig", "DIDConfig", "DoraConfig", "FullConfig", "HoulsbyConfig", "IA3Config",
           "LNTuningConfig", "LoraConfig", "LoraLayer", "PromptTuningConfig", "QLoraConfig", "SubspaceConfig",
           "build_config", "parse_targets"]


def parse_targets(text: str) -> list[str] | str:
    """CLI form of targets: 'q,v' -> ['q', 'v']; 'all-linear' and regexes (e.g. '.*\\.(q|v)') stay strings."""
    if text == "all-linear" or any(c in text for c in "*()[]|^$\\+?"):
        return check_pattern(text)
    return [t.strip() for t in text.split(",") if t.strip()]


def check_pattern(targets: list[str] | str | None, key: str = "targets") -> list[str] | str | None:
    """A regex given as targets must compile: a typo such as '(' is an input error, not a traceback later."""
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            raise PeftlabError(f"{key} {targets!r} is not a valid regular expression ({e}): write names such as "
                               "q,v or a regex like '.*\\.(q|v)'") from None
    return targets


def build_config(method: str, model_type: str | None = None, **fields) -> MethodConfig:
    """The config of `method` from keyword fields (those the method does not use are ignored; None means the
    default), with `model_type`'s default targets where none are given. A one-line error for an unknown
    method."""
    if method not in METHODS:
        raise PeftlabError(f"unknown method {method!r}: choose one of {sorted(METHODS)}")
    cls = METHODS[method]
    if model_type is not None:
        fields = cls.defaults_for(model_type, fields)
    return cls(**{k: v for k, v in fields.items() if v is not None and k in cls.field_names()})
