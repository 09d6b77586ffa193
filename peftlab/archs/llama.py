"""Llama: decoder-only, rotary positions, RMSNorm, gated MLP, grouped-query attention (SDPA kept: it trains
without attention dropout)."""

from peftlab.archs import TINY_INIT_STD, Arch, Tokens

# The byte tokenizer of the Llama-style tiny presets (Mistral and Qwen2 reuse it: their real tokenizers differ,
# but a random preset only needs ids that fit its config).
LLAMA_TOKENS = Tokens(specials={"<unk>": "pad_token_id", "<s>": "bos_token_id", "</s>": "eos_token_id"},
                      template=("<s> $A", "<s> $A <s> $B"),
                      roles={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"})
TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False, initializer_range=TINY_INIT_STD)


def llama_tiny():
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_SHAPE)


# peft's defaults for Llama, and for Mistral (the same module names)
LLAMA_TARGETS = {"lora": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "down_proj"],
                 "ln_tuning": ["input_layernorm", "post_attention_layernorm", "norm"],
                 "houlsby": ["o_proj", "down_proj"]}

SPEC = Arch(
    model_types=("llama",), task="causal", targets=LLAMA_TARGETS,
    ia3_feedforward=["down_proj"], plain_lm_head=True, rms_norms={"LlamaRMSNorm": "llama"},
    presets={"llama-tiny": llama_tiny}, tokens=LLAMA_TOKENS)
