"""Iteration-level batching: sequences join the running batch at the next decoding step and leave it when done.

Each sequence keeps its own key/value cache. A new request is prefilled alone (for T5 and BART the encoder
runs once, here); then every step stacks the active sequences' caches into one batch, left-padded to the
longest (the padding masked, each row at its own position), runs one decoding step with each row through its
own adapter, and appends each row's new keys and values to its own cache. A row's tokens are computed from
its own tokens only, so a greedy answer does not depend on what else is in the batch.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.modeling_outputs import BaseModelOutput

from peftlab.data.tasks import truncation_side
from peftlab.eval.generation import end_tokens
from peftlab.methods.inject import adapter_layers, per_example_adapters
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
    context: list[int] = field(default_factory=list)  # what generate's processors see before `tokens`
    decoded: tuple[int, str] = (0, "")  # (token count, their text): `Decoder.text`


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
        self.ends = end_tokens(model, tokenizer)
        self.forced_bos = getattr(config, "forced_bos_token_id", None)
        self.forced_eos = getattr(config, "forced_eos_token_id", None)
        self.processors = generation_processors(config, self.ends)
        self.min_new_tokens = getattr(config, "min_new_tokens", None) or 0
        # transformers 5 renamed past_key_values to cache; either is accepted, the newer one preferred
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.layers: list | None = None  # the model's adapter layers, found again after an adapter loads
        # A seq2seq decoder with learned positions (BART) takes each row's position from the batch's cache length,
        # not from position_ids: its rows are stepped in groups of one length. T5's relative positions and causal
        # LMs' position_ids take left padding.
        self.pads = task == "causal" or position_limit(model.config) is None
        self.batch: Batch | None = None

    def adapters(self, names: list[str]):
        if self.layers is None:
            self.layers = list(adapter_layers(self.model).values())
        return adapters_for(self.model, names, self.layers)

    def adapters_changed(self) -> None:
        self.layers = None

    @torch.no_grad()
    def prefill(self, requests: list) -> list[Sequence]:
        """The prompts of newly admitted requests, run as one padded batch (each row through its own adapter):
        each gets its own cache, without the padding, and its first token."""
        side = "left" if self.task == "causal" else "right"  # a causal prompt keeps its end
        with truncation_side(self.tokenizer, side):
            prompts = [self.tokenizer(r.prompt, truncation=True, max_length=self.max_prompt_tokens)["input_ids"]
                       for r in requests]
        lengths = [len(p) for p in prompts]
        pads = [max(lengths) - n for n in lengths]
        filler = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor(_padded(prompts, filler, side), device=self.device)
        mask = torch.tensor(_padded([[1] * n for n in lengths], 0, side), device=self.device)
        with self.adapters([r.adapter for r in requests]):
            if self.task == "causal":
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                 use_cache=True)
                kv = _layers(self._cache(out))
                sequences = [Sequence(r, n, _rows(kv, row, slice(pad, None)), n, 0, _generator(r, self.device),
                                      context=p)
                             for row, (r, n, pad, p) in enumerate(zip(requests, lengths, pads, prompts, strict=True))]
            else:
                encoder = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                start = [self.model.config.decoder_start_token_id]
                out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder), attention_mask=mask,
                                 decoder_input_ids=torch.tensor([start] * len(requests), device=self.device),
                                 use_cache=True)
                cache = self._cache(out)
                own, cross = _layers(cache.self_attention_cache), _layers(cache.cross_attention_cache)
                sequences = [Sequence(r, n, _rows(own, row, slice(None)), 1, 0, _generator(r, self.device),
                                      encoder[row:row + 1, :n], _rows(cross, row, slice(0, n)), context=start)
                             for row, (r, n) in enumerate(zip(requests, lengths, strict=True))]
        for row, sequence in enumerate(sequences):
            sequence.next_token = self.choose(sequence, out.logits[row, -1])
        return sequences

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
                                 use_cache=True, **{self.cache_arg: batch.cache})
            else:
                out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=batch.encoder),
                                 attention_mask=batch.encoder_mask, decoder_input_ids=tokens,
                                 decoder_attention_mask=batch.mask, use_cache=True, **{self.cache_arg: batch.cache})
        batch.cache = self._cache(out)
        logits = out.logits[:, -1]
        best = logits.argmax(-1).tolist()  # one call for every greedy row
        for row, sequence in enumerate(rows):
            sequence.length += 1
            sequence.next_token = self.choose(sequence, logits[row], best[row])

    def _cache(self, out):
        return getattr(out, self.cache_arg)

    def _unpack(self, batch: Batch, keep: list[Sequence]) -> None:
        """Each row of `batch` that is in `keep` gets its own cache back, without the padding."""
        cache = batch.cache.self_attention_cache if self.task != "causal" else batch.cache
        layers, longest = _layers(cache), cache.get_seq_length()
        kept = {id(s) for s in keep}
        for row, sequence in enumerate(batch.members):
            if id(sequence) in kept:
                sequence.self_kv = _rows(layers, row, slice(longest - sequence.length, None))

    def choose(self, sequence: Sequence, logits: torch.Tensor, best: int | None = None) -> int:
        """The next token: greedy, or sampled with the request's temperature, top_p and seed, after the model's
        generation config (repetition penalty, n-gram blocking, minimum length; forced first and last tokens, as
        BART's) as HF generate applies it. `best`: the logits' argmax, when already taken."""
        step, request = len(sequence.tokens), sequence.request
        if step == 0 and self.forced_bos is not None:
            return int(self.forced_bos)
        if step == request.max_tokens - 1 and self.forced_eos is not None:
            return int(self.forced_eos)
        if self.processors:
            ids = torch.tensor([sequence.context + sequence.tokens], device=logits.device)
            logits, best = self.processors(ids, logits[None].float())[0], None
        if step < self.min_new_tokens and self.ends:
            logits, best = logits.float().index_fill(-1, torch.tensor(sorted(self.ends), device=logits.device),
                                                     -float("inf")), None
        if request.greedy:
            return int(logits.argmax()) if best is None else best
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
        return bool(stops) and any(s in self.text(sequence) for s in stops)

    def text(self, sequence: Sequence) -> str:
        """The sequence's tokens decoded, once per token (the stop check and streaming both read it)."""
        if sequence.decoded[0] != len(sequence.tokens):
            sequence.decoded = (len(sequence.tokens), self.tokenizer.decode(sequence.tokens, skip_special_tokens=True))
        return sequence.decoded[1]


def _layers(cache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _rows(kv: KV, row: int, positions: slice) -> KV:
    """One row's keys and values (and only `positions` of them) out of a batch's."""
    return [(k[row:row + 1, :, positions], v[row:row + 1, :, positions]) for k, v in kv]


def _padded(rows: list[list[int]], filler: int, side: str) -> list[list[int]]:
    """The rows padded with `filler` to the longest, on the left or the right."""
    longest = max(len(row) for row in rows)
    return [[filler] * (longest - len(row)) + row if side == "left" else row + [filler] * (longest - len(row))
            for row in rows]


def _generator(request, device: torch.device) -> torch.Generator | None:
    """A sampled request's own random stream (its seed, or a fresh one)."""
    if request.greedy:
        return None
    generator = torch.Generator(device)
    generator.manual_seed(request.seed if request.seed is not None else torch.seed())
    return generator


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


def adapters_for(model, names: list[str], layers: list | None = None):
    """Each example through its own adapter; a base without adapters runs as it is."""
    if getattr(model, "peftlab_adapters", None):
        return per_example_adapters(model, names, layers)
    return contextlib.nullcontext()


def generation_processors(config, ends: set[int]) -> LogitsProcessorList:
    """The model's generation-config settings that change a greedy or sampled answer, as HF generate's own
    processors, applied to each sequence's tokens (a causal prompt included, as generate counts it)."""
    processors = LogitsProcessorList()
    eos = sorted(ends)
    if (penalty := getattr(config, "repetition_penalty", None)) not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    if ngram := getattr(config, "no_repeat_ngram_size", None):
        processors.append(NoRepeatNGramLogitsProcessor(ngram))
    if eos and (least := getattr(config, "min_length", None)):
        processors.append(MinLengthLogitsProcessor(least, eos))
    return processors
