"""PEFT methods: one module each, sharing the injection machinery in `inject`."""

from peftlab.methods.lora import LoraConfig, LoraLayer

METHODS = {"lora": LoraConfig}

__all__ = ["METHODS", "LoraConfig", "LoraLayer"]
