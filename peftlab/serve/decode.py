"""Iteration-level batching: sequences join the running batch at the next decoding step and leave it when done.

Each sequence keeps its own key/value cache. A new request is prefilled alone (for T5 and BART the encoder
runs once, here); then every step stacks the active sequences' caches into one batch, left-padded to the
longest (the padding masked, each row at its own position), runs one decoding step with each row through its
own adapter, and appends each row's new keys and values to its own cache. A row's tokens are computed from
its own tokens only, so a greedy answer does not depend on what else is in the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from peftlab.data.tasks import truncation_side
from peftlab.methods.inject import per_example_adapters
from peftlab.models import position_limit

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape (1, heads, length, head size)


@dataclass
class Sequence:
    """One request being decoded."""

    request: Any  # engine.Request
    prompt_tokens: int
    self_kv: KV
    length: int  # positions in self_kv
    next_token: int
    generator: torch.Generator | None = None
    encoder: torch.Tensor | None = None  # (1, source length, hidden): seq2seq only
    cross_kv: KV | None = None
    tokens: list[int] = field(default_factory=list)


@dataclass
class Batch:
    """The running sequences' caches as one batch, carried from step to step while the members stay."""

    members: list[Sequence]
    cache: Any  # DynamicCache (causal) or EncoderDecoderCache; the decoder's part left-padded
    mask: torch.Tensor  # (rows, cached positions): 0 at the padding
    encoder: torch.Tensor | None = None  # seq2seq: the encoder's outputs, right-padded
    encoder_mask: torch.Tensor | None = None


class Decoder:
    """Prefill and batched decoding steps for one model (seq2seq or causal)."""

    def __init__(self, model, tokenizer, task: str, max_prompt_tokens: int) -> None:
        self.model, self.tokenizer, self.task, self.max_prompt_tokens = model, tokenizer, task, max_prompt_tokens
        self.device = next(model.parameters()).device
        config = model.generation_config
        self.ends = {t for t in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)) if t is not None}
        self.forced_bos = getattr(config, "forced_bos_token_id", None)
        self.forced_eos = getattr(config, "forced_eos_token_id", None)
        # A seq2seq decoder with learned positions (BART) takes each row's position from the batch's cache length,
        # not from position_ids: its rows are stepped in groups of one length. T5's relative positions and causal
        # LMs' position_ids take left padding.
        self.pads = task == "causal" or position_limit(model.config) is None
        self.batch: Batch | None = None

    def adapters(self, names: list[str]):
        return adapters_for(self.model, names)

    @torch.no_grad()
    def prefill(self, request) -> Sequence:
        side = "left" if self.task == "causal" else "right"  # a causal prompt keeps its end
        with truncation_side(self.tokenizer, side):
            ids = self.tokenizer(request.prompt, truncation=True, max_length=self.max_prompt_tokens,
                                 return_tensors="pt")["input_ids"].to(self.device)
        generator = None
        if not request.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        with self.adapters([request.adapter]):
            if self.task == "causal":
                out = self.model(input_ids=ids, use_cache=True)
                sequence = Sequence(request, ids.shape[1], _layers(out.past_key_values), ids.shape[1], 0, generator)
            else:
                encoder = self.model.get_encoder()(input_ids=ids).last_hidden_state
                start = torch.tensor([[self.model.config.decoder_start_token_id]], device=self.device)
                out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder), decoder_input_ids=start,
                                 use_cache=True)
                cache = out.past_key_values
                sequence = Sequence(request, ids.shape[1], _layers(cache.self_attention_cache), 1, 0, generator,
                                    encoder, _layers(cache.cross_attention_cache))
        sequence.next_token = self.choose(sequence, out.logits[0, -1])
        return sequence

    def step(self, sequences: list[Sequence]) -> None:
        """One decoding step for every sequence: each gets its next token. While the running sequences stay the
        same, the batched cache carries from step to step; it is rebuilt only when one joins or leaves."""
        if not self.pads:
            groups: dict[int, list[Sequence]] = {}
            for sequence in sequences:  # grouped before any steps: a stepped sequence's length changes
                groups.setdefault(sequence.length, []).append(sequence)
            for group in groups.values():
                batch = self._build(group)
                self._run(batch)
                self._unpack(batch, group)
            return
        if self.batch is None or [id(s) for s in self.batch.members] != [id(s) for s in sequences]:
            if self.batch is not None:
                self._unpack(self.batch, sequences)
            self.batch = self._build(sequences)
        self._run(self.batch)

    def _build(self, sequences: list[Sequence]) -> Batch:
        """The sequences' own caches as one batch: the decoder's left-padded, the encoder's right-padded."""
        longest = max(s.length for s in sequences)
        cache = _stack([s.self_kv for s in sequences], [longest - s.length for s in sequences], left=True)
        mask = torch.tensor([[0] * (longest - s.length) + [1] * s.length for s in sequences], device=self.device)
        if self.task == "causal":
            return Batch(list(sequences), cache, mask)
        source = max(s.encoder.shape[1] for s in sequences)
        pads = [source - s.encoder.shape[1] for s in sequences]
        cross = _stack([s.cross_kv for s in sequences], pads, left=False)
        both = EncoderDecoderCache(cache, cross)
        for layer in range(len(sequences[0].cross_kv)):
            both.is_updated[layer] = True  # the cross-attention keys and values are there already
        encoder = torch.cat([F.pad(s.encoder, (0, 0, 0, p)) for s, p in zip(sequences, pads, strict=True)])
        encoder_mask = torch.tensor([[1] * s.encoder.shape[1] + [0] * p for s, p in zip(sequences, pads, strict=True)],
                                    device=self.device)
        return Batch(list(sequences), both, mask, encoder, encoder_mask)

    @torch.no_grad()
    def _run(self, batch: Batch) -> None:
        rows = batch.members
        tokens = torch.tensor([[s.next_token] for s in rows], device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], 1)
        with self.adapters([s.request.adapter for s in rows]):
            if self.task == "causal":
                positions = torch.tensor([[s.length] for s in rows], device=self.device)
                out = self.model(input_ids=tokens, attention_mask=batch.mask, position_ids=positions,
                                 past_key_values=batch.cache, use_cache=True)
            else:
                out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=batch.encoder),
                                 attention_mask=batch.encoder_mask, decoder_input_ids=tokens,
                                 decoder_attention_mask=batch.mask, past_key_values=batch.cache, use_cache=True)
        batch.cache = out.past_key_values
        for row, sequence in enumerate(rows):
            sequence.length += 1
            sequence.next_token = self.choose(sequence, out.logits[row, -1])

    def _unpack(self, batch: Batch, keep: list[Sequence]) -> None:
        """Each row of `batch` that is in `keep` gets its own cache back, without the padding."""
        cache = batch.cache.self_attention_cache if self.task != "causal" else batch.cache
        layers, longest = _layers(cache), cache.get_seq_length()
        kept = {id(s) for s in keep}
        for row, sequence in enumerate(batch.members):
            if id(sequence) in kept:
                pad = longest - sequence.length
                sequence.self_kv = [(k[row:row + 1, :, pad:], v[row:row + 1, :, pad:]) for k, v in layers]

    def choose(self, sequence: Sequence, logits: torch.Tensor) -> int:
        """The next token: greedy, or sampled with the request's temperature, top_p and seed; the model's forced
        first and last tokens (BART's) as HF generate forces them."""
        step, request = len(sequence.tokens), sequence.request
        if step == 0 and self.forced_bos is not None:
            return int(self.forced_bos)
        if step == request.max_tokens - 1 and self.forced_eos is not None:
            return int(self.forced_eos)
        if request.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / request.temperature, -1)
        if request.top_p < 1:
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < request.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        return int(torch.multinomial(probs, 1, generator=sequence.generator))

    def done(self, sequence: Sequence) -> bool:
        """Take the chosen token; whether the sequence ends here (end of sequence, or max_tokens reached)."""
        if sequence.next_token in self.ends:
            return True
        sequence.tokens.append(sequence.next_token)
        return len(sequence.tokens) >= sequence.request.max_tokens or self._stopped(sequence)

    def _stopped(self, sequence: Sequence) -> bool:
        stops = [s for s in sequence.request.stop if s]
        return bool(stops) and any(s in self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
                                   for s in stops)


def _layers(cache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _stack(per_sequence: list[KV], pads: list[int], left: bool) -> DynamicCache:
    """One cache of the sequences' caches, each padded by its own amount along the length (left or right)."""
    cache = DynamicCache()
    for layer in range(len(per_sequence[0])):
        keys, values = [], []
        for kv, pad in zip(per_sequence, pads, strict=True):
            shape = (0, 0, pad, 0) if left else (0, 0, 0, pad)
            keys.append(F.pad(kv[layer][0], shape))
            values.append(F.pad(kv[layer][1], shape))
        cache.update(torch.cat(keys), torch.cat(values), layer)
    return cache


def adapters_for(model, names: list[str]):
    """Each example through its own adapter; a base without adapters runs as it is."""
    if getattr(model, "peftlab_adapters", None):
        return per_example_adapters(model, names)
    return contextlib.nullcontext()
