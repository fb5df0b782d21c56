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


class IncrementalDecoder:
    """The decoded text of a growing list of token ids, decoding only the last few tokens.

    `text` is `tokenizer.decode(ids, skip_special_tokens=True)` up to the last token that
    completed a character; `pending()` is the rest (an incomplete character decodes as U+FFFD),
    so `text + pending()` is the whole decoding. Each new token decodes the tokens since the
    previous settled one, with one settled token before them as context (so tokenizers that
    strip a leading space or join pieces decode the seam as in the whole sequence): the cost
    per token does not grow with the output.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._pending = ""
        self._prefix = 0  # first token decoded as context
        self._read = 0  # first token whose text is not in `text` yet

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, token_id: int) -> str:
        """Append a token; return the text it settles ("" while a character is incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        new = after[len(before) :]
        if not new or after.endswith("\ufffd"):
            self._pending = new
            return ""
        self.text += new
        self._pending = ""
        self._prefix, self._read = self._read, len(self.ids)
        return new

    def pending(self) -> str:
        """Decoded text of the tokens after `text` (U+FFFD for an incomplete character)."""
        return self._pending


@dataclass
class StopStringMatcher:
    """Finds stop strings of any length in the decoded text (they may span many tokens).

    Incremental: each token decodes only the last few tokens (`IncrementalDecoder`) and only the
    text that can still hold a new stop string is searched (the new text and the last
    `len(longest stop) - 1` characters before it), so matching costs the same per token however
    long the output grows. The result is that of searching the whole decoded text (an incomplete
    last character included, as U+FFFD, as `decode` shows it).
    """

    tokenizer: object
    stop_strings: Sequence[str]
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._decoder = IncrementalDecoder(self.tokenizer)
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._hit: int | None = None

    def add(self, token_id: int) -> int | None:
        """Append a token; return the character offset where a stop string starts, if any."""
        self.token_ids.append(token_id)
        if self._hit is not None:
            return self._hit
        # The text up to the previous token held no stop string, and its settled part stays:
        # a new one ends after it, so it starts at most len(longest) - 1 characters before.
        start = max(0, len(self._decoder.text) - self._longest + 1)
        self._decoder.add(token_id)
        tail = self._decoder.text[start:] + self._decoder.pending()
        hits = [i for s in self.stop_strings if (i := tail.find(s)) >= 0]
        self._hit = start + min(hits) if hits else None
        return self._hit

    @property
    def text(self) -> str:
        """The whole decoded text so far (an incomplete last character as U+FFFD)."""
        return self._decoder.text + self._decoder.pending()


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
