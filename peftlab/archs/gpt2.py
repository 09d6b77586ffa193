"""GPT-2: decoder-only, Conv1D projections (weights stored in x out), fused q/k/v in c_attn."""

from peftlab.archs import TINY_INIT_STD, Arch, Tokens


def gpt2_tiny():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=512, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                      bos_token_id=511, eos_token_id=511, initializer_range=TINY_INIT_STD)


SPEC = Arch(
    model_types=("gpt2",), task="causal",
    targets={"lora": ["c_attn"], "ia3": ["c_attn", "mlp.c_proj"], "ln_tuning": ["ln_1", "ln_2", "ln_f"],
             "houlsby": ["c_proj"]},
    ia3_feedforward=["mlp.c_proj"], plain_lm_head=True, attention="GPT2Attention", attention_dropout="attn_pdrop",
    presets={"gpt2-tiny": gpt2_tiny},
    tokens=Tokens(specials={"<|endoftext|>": "eos_token_id"},
                  roles={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
