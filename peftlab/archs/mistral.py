"""Mistral: Llama's layout (module names, RMSNorm, gated MLP) with sliding-window attention."""

from peftlab.archs import Arch
from peftlab.archs.llama import LLAMA_TARGETS, LLAMA_TOKENS, TINY_SHAPE


def mistral_tiny():
    from transformers import MistralConfig

    return MistralConfig(**TINY_SHAPE)


SPEC = Arch(
    model_types=("mistral",), task="causal", targets=LLAMA_TARGETS,
    ia3_feedforward=["down_proj"], plain_lm_head=True, rms_norms={"MistralRMSNorm": "llama"},
    presets={"mistral-tiny": mistral_tiny}, tokens=LLAMA_TOKENS)
