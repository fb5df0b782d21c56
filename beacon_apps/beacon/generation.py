"""Decoding with a beacon model: greedy or sampled, streaming one token at a time.

There is no KV cache to manage: each new token is simply the next raw token of the open window,
fed through `BeaconForCausalLM.forward`, so windows keep condensing during generation exactly as
in the reference. Logit processing reuses transformers' processors (repetition penalty,
temperature, top-k, top-p) so sampling means what users already know it means.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .model import BeaconForCausalLM


@dataclass
class GenerationSettings:
    """How to pick tokens. `temperature == 0` or `do_sample=False` means greedy."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    seed: int | None = None
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (got {self.top_k})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: must be > 0 (got {self.repetition_penalty})")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings: empty stop string")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def processors(self) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


@dataclass
class StopStringMatcher:
    """Finds stop strings of any length in the decoded text (they may span many tokens)."""

    tokenizer: object
    stop_strings: Sequence[str]
    token_ids: list[int] = field(default_factory=list)

    def add(self, token_id: int) -> int | None:
        """Append a token; return the character offset where a stop string starts, if any."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop_strings if s in text]
        return min(hits) if hits else None


def generate_tokens(
    model: BeaconForCausalLM,
    input_ids: torch.Tensor,
    settings: GenerationSettings,
    *,
    tokenizer=None,
    reset: bool = True,
) -> Iterator[int]:
    """Yield new token ids one by one (batch of one). Stops at eos, a stop string or the limit.

    The prompt is read through the memory first (after `memory.reset()` unless `reset=False`,
    which continues the current stream). An eos token is yielded; text-level trimming of stop
    strings is the caller's job (the engine does it).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError("generate: one sequence at a time (batch size 1)")
    if settings.stop_strings and tokenizer is None:
        raise ValueError("stop_strings: a tokenizer is needed to match stop strings")
    if reset:
        model.memory.reset()
    generator = None
    if not settings.greedy:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    processors = settings.processors()
    eos = set(settings.eos_token_ids)
    matcher = StopStringMatcher(tokenizer, settings.stop_strings) if settings.stop_strings else None
    history = input_ids.to(model.device)
    logits = model(input_ids, logits_to_keep=1).logits[:, -1]
    for step in range(settings.max_new_tokens):
        if step < settings.min_new_tokens and eos:
            logits[:, list(eos)] = float("-inf")
        scores = processors(history, logits)
        if settings.greedy:
            token = int(scores.argmax(-1))
        else:
            probabilities = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probabilities, 1, generator=generator))
        yield token
        if token in eos or (matcher is not None and matcher.add(token) is not None):
            return
        if step + 1 == settings.max_new_tokens:
            return
        next_ids = torch.tensor([[token]], device=model.device)
        history = torch.cat([history, next_ids], dim=1)
        logits = model(next_ids, logits_to_keep=1).logits[:, -1]


def generate(
    model: BeaconForCausalLM,
    input_ids: torch.Tensor,
    settings: GenerationSettings | None = None,
    *,
    tokenizer=None,
    reset: bool = True,
    **overrides,
) -> list[int]:
    """All new token ids at once (see `generate_tokens`)."""
    settings = settings or GenerationSettings(**overrides)
    return list(generate_tokens(model, input_ids, settings, tokenizer=tokenizer, reset=reset))
