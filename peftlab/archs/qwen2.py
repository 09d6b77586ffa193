"""Qwen2: Llama's layout with biases on q, k and v. peft's IA3 and LN tuning defaults for it differ from
Llama's (q_proj, not k_proj; only post_attention_layernorm): kept as peft has them, so adapters match."""

from peftlab.archs import Arch
from peftlab.archs.llama import LLAMA_TOKENS, TINY_SHAPE


def qwen2_tiny():
    from transformers import Qwen2Config

    return Qwen2Config(**TINY_SHAPE)


SPEC = Arch(
    model_types=("qwen2",), task="causal",
    targets={"lora": ["q_proj", "v_proj"], "ia3": ["q_proj", "v_proj", "down_proj"],
             "ln_tuning": ["post_attention_layernorm"], "houlsby": ["o_proj", "down_proj"]},
    ia3_feedforward=["down_proj"], plain_lm_head=True, rms_norms={"Qwen2RMSNorm": "llama"},
    presets={"qwen2-tiny": qwen2_tiny}, tokens=LLAMA_TOKENS)
