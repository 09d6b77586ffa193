"""BART: encoder-decoder with learned absolute positions; its LM head adds a bias (final_logits_bias)."""

from peftlab.archs import TINY_INIT_STD, Arch, Tokens


def bart_tiny():
    from transformers import BartConfig

    return BartConfig(vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                      max_position_embeddings=512, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=2, init_std=TINY_INIT_STD)


SPEC = Arch(
    model_types=("bart",), task="seq2seq",
    targets={"lora": ["q_proj", "v_proj"], "ia3": ["q_proj", "v_proj", "fc2"],
             "ln_tuning": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
             "houlsby": ["out_proj", "fc2"]},
    ia3_feedforward=["fc2"], attention="BartAttention", attention_dropout="attention_dropout",
    presets={"bart-tiny": bart_tiny},
    tokens=Tokens(specials={"<s>": "bos_token_id", "<pad>": "pad_token_id", "</s>": "eos_token_id"},
                  extra=("<unk>", "<mask>"), template=("<s> $A </s>", "<s> $A </s> </s> $B </s>"),
                  roles={"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                         "mask_token": "<mask>"}))
