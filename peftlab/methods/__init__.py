"""PEFT methods: one module each, sharing the injection machinery in `inject`."""

from peftlab.methods.lora import LoraConfig, LoraLayer

METHODS = {"lora": LoraConfig}

__all__ = ["METHODS", "LoraConfig", "LoraLayer", "build_config", "parse_targets"]


def parse_targets(text: str) -> list[str] | str:
    """CLI form of targets: 'q,v' -> ['q', 'v']; 'all-linear' and regexes (e.g. '.*\\.(q|v)') stay strings."""
    if text == "all-linear" or any(c in text for c in "*()[]|^$\\+?"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def build_config(method: str, **fields):
    """The config of `method` from keyword fields; a one-line error for an unknown method."""
    from peftlab.errors import PeftlabError

    if method not in METHODS:
        raise PeftlabError(f"unknown method {method!r}: choose one of {sorted(METHODS)}")
    return METHODS[method](**{k: v for k, v in fields.items() if v is not None})
