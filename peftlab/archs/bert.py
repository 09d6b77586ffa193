"""BERT and RoBERTa encoders (sequence classification): post-norm LayerNorm, no LM head."""

from peftlab.archs import TINY_INIT_STD, Arch, Tokens


def bert_tiny():
    from transformers import BertConfig

    return BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, pad_token_id=0,
                      initializer_range=TINY_INIT_STD)


TARGETS = {"lora": ["query", "value"], "ia3": ["key", "value", "output.dense"], "ln_tuning": ["LayerNorm"],
           "houlsby": ["output.dense"]}

SPECS = [
    Arch(model_types=("bert",), task="classification", targets=TARGETS, ia3_feedforward=["output.dense"],
         presets={"bert-tiny": bert_tiny},
         tokens=Tokens(specials={"[PAD]": "pad_token_id"}, extra=("[UNK]", "[CLS]", "[SEP]", "[MASK]"),
                       template=("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"),
                       # segment ids tell a text pair's two texts apart, as BERT's own tokenizer returns them
                       input_names=("input_ids", "token_type_ids", "attention_mask"),
                       roles={"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                              "mask_token": "[MASK]"})),
    Arch(model_types=("roberta",), task="classification", targets=TARGETS, ia3_feedforward=["output.dense"]),
]
