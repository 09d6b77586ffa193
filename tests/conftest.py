import copy
import functools

import pytest
import torch

import peftlab

# preset -> targets for its attention projections
ATTENTION_TARGETS = {
    "t5-tiny": ["q", "v"],
    "bart-tiny": ["q_proj", "v_proj"],
    "gpt2-tiny": ["c_attn"],
    "llama-tiny": ["q_proj", "v_proj"],
    "bert-tiny": ["query", "value"],
}


@functools.cache
def _base(preset: str):
    return peftlab.load_model(f"random:{preset}")


def fresh_base(preset: str):
    """A private copy of a seeded random preset (loading once per session keeps the suite fast)."""
    model, tokenizer = _base(preset)
    return copy.deepcopy(model).eval(), tokenizer


def example_batch(model, tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small batch with labels that fits the model's task."""
    texts = ["the movie was not good at all", "a fine, quiet film", "what a day"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    if model.config.is_encoder_decoder:
        batch["labels"] = tokenizer(["bad", "good", "meh"], padding=True, return_tensors="pt")["input_ids"]
    elif type(model).__name__.endswith("ForSequenceClassification"):
        batch["labels"] = torch.tensor([0, 1, 1])
    else:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def randomize_lora_B(model, seed: int = 0) -> None:
    """Give B non-zero values so adapters change the output (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.fixture
def tiny_t5():
    return fresh_base("t5-tiny")


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory):
    """A small learnable JSONL data set (test_train.seq_rows) for runs in a subprocess."""
    from test_train import seq_rows

    from peftlab.data.synth import write_jsonl

    return write_jsonl(seq_rows(50), tmp_path_factory.mktemp("data") / "seq.jsonl")
