"""T5 and flan-t5 (and mT5): encoder-decoder, relative position buckets, RMSNorm without a bias."""

from peftlab.archs import Arch, Tokens


def flan_t5_small():
    from transformers import T5Config

    # google/flan-t5-small's config.json; tie_word_embeddings=False also turns off decoder output scaling.
    return T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                    num_heads=6, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    dropout_rate=0.1, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def t5_tiny():
    from transformers import T5Config

    return T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                    num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


SPECS = [
    Arch(model_types=("t5",), task="seq2seq",
         targets={"lora": ["q", "v"], "ia3": ["k", "v", "wo"], "ln_tuning": ["layer_norm", "final_layer_norm"],
                  "houlsby": ["o", "wo"]},
         ia3_feedforward=["wo"], plain_lm_head=True, attention="T5Attention", rms_norms={"T5LayerNorm": "t5"},
         presets={"flan-t5-small": flan_t5_small, "t5-tiny": t5_tiny}, untied_lm_head=True,
         tokens=Tokens(specials={"<pad>": "pad_token_id", "</s>": "eos_token_id"}, extra=("<unk>",),
                       template=("$A </s>", "$A </s> $B </s>"),
                       roles={"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})),
    Arch(model_types=("mt5",), task="seq2seq",
         targets={"lora": ["q", "v"], "ia3": ["k", "v", "wi_1"], "ln_tuning": ["layer_norm", "final_layer_norm"],
                  "houlsby": ["o", "wo"]},
         ia3_feedforward=[], plain_lm_head=True, attention="MT5Attention"),
]
