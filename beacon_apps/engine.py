"""The beacon engine: one loaded model answering questions about whole documents.

Every front end (CLI, Gradio app, LangChain and LlamaIndex adapters, notebooks) calls this module
and none of them touches the model. The engine owns:

* prompts built with the model's chat template (document first, then the question), so the
  document's tokens form a prefix shared by every question about it;
* the compression ratio, chosen per document so the condensed memory fits the model's reach and
  an optional byte budget, then pinned (so a cached prefix stays valid);
* the condensed-document cache (`beacon_apps.cache`): a prompt is always read in window-aligned
  pieces, the memory is snapshotted at the last window boundary before the question, and a later
  prompt with the same prefix restores it. Reading in window-aligned pieces is what makes cached
  and uncached answers bit-identical;
* one request at a time per model (a lock), with the memory reset or restored per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .beacon import GenerationSettings, generate_tokens, load_beacon_model, resolve_model_dir
from .beacon.generation import StopStringMatcher
from .beacon.model import BeaconForCausalLM, max_positions
from .cache import CondensedCache, prefix_digests
from .default_model import default_model, resolve_alias
from .documents import Document, Page, documents_text, load_documents
from .ratio_plan import question_schedule as plan_schedule

logger = logging.getLogger(__name__)

QA_SYSTEM_PROMPT = (
    "You answer questions about the document the user gives you. Use only the document. "
    "Cite the pages you rely on as [page N]. If the document does not say, answer that it "
    "does not say."
)
SUMMARY_INSTRUCTIONS = {
    "short": ("Summarize the document above in 3 to 5 sentences.", 256),
    "medium": ("Summarize the document above in two or three paragraphs, citing pages.", 512),
    "long": (
        "Write a detailed summary of the document above, section by section, citing pages.",
        1024,
    ),
}
Progress = Callable[[int, int], None]
# A prompt (not a document) is cached up to this many tokens before its end: room for the next
# question, so a follow-up that shares the prefix finds the condensed document.
FOLLOW_UP_SLACK = 256


class DocumentTooLongError(ValueError):
    """The document does not fit the model at the ratio it must use (or even at the strongest).

    `tokens` is its length, `ratio` the ratio tried last, `limit` the most tokens that fit there
    (the model's reach and memory budget, less the room kept for the question and answer).
    """

    def __init__(self, message: str, *, tokens: int = 0, ratio: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.tokens, self.ratio, self.limit = tokens, ratio, limit


@dataclass
class Answer:
    """A finished answer with what it cost; front ends show these numbers."""

    text: str
    # "stop" (eos or stop string), "length", "cancelled"; "condensed" from condense()
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    compression_ratio: int
    cached_tokens: int  # prompt tokens restored from the condensed-document cache
    prefill_seconds: float
    total_seconds: float
    memory_entries: int  # KV entries per layer after the answer
    memory_bytes: int
    token_ids: list[int] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    ratio_plan: str = "uniform"  # "question": windows condensed by relevance to the question
    window_ratios: list[int] = field(default_factory=list)  # question plan: ratio of each window

    @property
    def cache_hit(self) -> bool:
        return self.cached_tokens > 0

    def metadata(self) -> dict[str, Any]:
        """Every number about the answer (not its text), for adapters' response metadata."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("text", "token_ids")}
        data["cache_hit"] = self.cache_hit
        return data


class AnswerStream:
    """Text deltas as they are generated; `.answer` holds the `Answer` once iteration ends.

    Nothing runs until the first delta is asked for (tokenizing a book, condensing it and, for
    map-reduce summaries, the section passes all happen inside the iteration), so async callers
    can iterate it in a worker thread. `cancel()` may be called from any thread: the request
    stops at the next window or token with finish_reason "cancelled" and frees the engine.
    """

    def __init__(self) -> None:
        self._deltas: Iterator[str] = iter(())
        self._cancelled = threading.Event()
        self.notices: list[str] = []
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def __next__(self) -> str:
        return next(self._deltas)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def close(self) -> None:
        """Stop from the iterating thread (or when done); other threads use `cancel()`."""
        self._deltas.close()

    def consume(self) -> Answer:
        """Read the rest of the stream; return the finished `Answer`."""
        for _ in self._deltas:
            pass
        return self.answer


async def aiterate(stream: AnswerStream) -> AsyncIterator[str]:
    """Iterate a stream from async code without blocking the event loop.

    The model runs in a worker thread; deltas cross over through an asyncio queue. If the
    consumer stops early (or is cancelled), the stream is cancelled at its next window or token,
    which frees the engine for the next request.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def produce() -> None:
        try:
            for delta in stream:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
        except BaseException as error:  # re-raised in the consumer
            loop.call_soon_threadsafe(queue.put_nowait, error)
        finally:
            stream.close()
            loop.call_soon_threadsafe(queue.put_nowait, done)

    worker = loop.run_in_executor(None, produce)
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stream.cancel()
        await worker


@dataclass
class DocumentInfo:
    """What reading a set of documents will take, before reading it."""

    names: list[str]
    pages: int
    characters: int
    tokens: int
    compression_ratio: int
    memory_entries: int  # KV entries per layer at most: condensed document + one open window
    memory_bytes: int  # all layers, keys + values
    fits: bool


def as_documents(
    documents: Document | str | os.PathLike | Sequence[Document | str | os.PathLike],
) -> list[Document]:
    """Documents from Document objects and/or file paths."""
    if isinstance(documents, (Document, str, os.PathLike)):
        documents = [documents]
    loaded = list(documents)
    paths = [d for d in loaded if not isinstance(d, Document)]
    if paths:
        by_path = iter(load_documents(paths))
        loaded = [d if isinstance(d, Document) else next(by_path) for d in loaded]
    return loaded


def text_document(text: str, name: str = "text") -> Document:
    """A one-page document from a string (for callers that already hold the text)."""
    return Document(source=name, name=name, pages=[Page(1, text, "1")], metadata={})


class BeaconEngine:
    """One beacon model + tokenizer, serving document QA, summaries and chat, one request at a time."""

    def __init__(
        self,
        model: str | os.PathLike | BeaconForCausalLM | None = None,
        tokenizer: Any = None,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str = "sdpa",
        ratio: int | str = "auto",
        memory_budget_bytes: int | None = None,
        cache: CondensedCache | None = None,
        cache_dir: str | os.PathLike | None = None,
        question_allowance: int | None = None,
        **beacon_overrides: Any,
    ) -> None:
        if model is None:  # the released model, or offline the bundled demo model
            model = default_model()
        elif not isinstance(model, BeaconForCausalLM):
            model = resolve_alias(model)
        if isinstance(model, BeaconForCausalLM):
            if tokenizer is None:
                raise ValueError("tokenizer: give the tokenizer that goes with the model object")
            self.model, self.model_name = (
                model,
                getattr(model.config, "_name_or_path", "") or "beacon",
            )
            fingerprint = self.model_name
        else:
            directory = resolve_model_dir(model)
            self.model = load_beacon_model(
                directory,
                device=device,
                dtype=dtype,
                attn_implementation=attn_implementation,
                **beacon_overrides,
            )
            self.model_name = str(model)
            fingerprint = _folder_fingerprint(directory)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(directory)
        self.tokenizer = tokenizer
        self.beacon_config = self.model.beacon_config
        self.ratio = ratio
        if ratio != "auto":
            self._check_ratio(int(ratio))
        self.memory_budget_bytes = memory_budget_bytes
        # Tokens kept free after a document for the question and the answer, so the ratio (and
        # the cached condensed document) depends on the document alone. Default: 1024, or half
        # the native window of a small model, where 1024 raw tokens would force a harder ratio.
        if question_allowance is None:
            question_allowance = min(1024, max_positions(self.model.config) // 2)
        self.question_allowance = question_allowance
        self.cache = cache if cache is not None else CondensedCache(directory=cache_dir)
        self._fingerprint = (
            f"{fingerprint}|{self.model.dtype}|{self.model.device.type}|"
            f"{self.model.attn_implementation}"
        )
        self._lock = threading.Lock()
        self.eos_token_ids = _eos_ids(self.model, tokenizer)

    # ------------------------------------------------------------------ facts
    @property
    def window(self) -> int:
        return self.beacon_config.beacon_window

    @property
    def native_context(self) -> int:
        return max_positions(self.model.config)

    @property
    def context_window(self) -> int:
        """Tokens the model can read (the extended context), within the memory budget if set.

        At the fixed ratio when there is one (the engine's `ratio`, or the model's
        `beacon_ratio_mix = fixed-N`), else at the strongest trained compression.
        """
        fixed = self.fixed_ratio
        if fixed is not None:
            return self._capacity(fixed)
        return max(self._capacity(r) for r in self.beacon_config.beacon_ratio)

    @property
    def fixed_ratio(self) -> int | None:
        """The ratio every request uses: the engine's `ratio`, else the model's `fixed-N` mix."""
        if self.ratio != "auto":
            return int(self.ratio)
        return self.beacon_config.fixed_ratio

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _reach(self, ratio: int) -> int:
        positions, window = self.native_context, self.window
        return (positions - window) * ratio + window if ratio > 0 else positions

    def _entries(self, tokens: int, ratio: int) -> int:
        """KV entries per layer after reading `tokens`: condensed windows + one open window."""
        return (-(-tokens // ratio) if ratio else tokens) + self.window

    def _capacity(self, ratio: int) -> int:
        """The most tokens readable at `ratio`: the model's reach, and the memory budget if set.

        Exactly the largest `t` with `t <= reach` and `_entries(t, ratio)` within the budget.
        """
        capacity = self._reach(ratio)
        if self.memory_budget_bytes:
            entries = self.memory_budget_bytes // self._entry_bytes() - self.window
            capacity = min(capacity, entries * ratio if ratio > 0 else entries)
        return max(0, capacity)

    def _entry_bytes(self) -> int:
        config = self.model.config
        heads = config.num_key_value_heads
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        element = torch.finfo(self.model.dtype).bits // 8
        return 2 * heads * head_dim * element * config.num_hidden_layers

    def _check_ratio(self, ratio: int) -> None:
        if ratio < 0 or (ratio > 0 and self.beacon_config.beacon_stride % ratio):
            raise ValueError(
                f"ratio: {ratio} must be 0 or divide the beacon window "
                f"({self.beacon_config.beacon_stride})"
            )

    def choose_ratio(self, tokens: int, room: int | None = None, subject: str | None = None) -> int:
        """The smallest trained ratio whose condensed memory holds `tokens` + `room` to answer.

        Smaller ratios keep more detail; the limit is the model's positional reach and the
        optional memory budget. `room` defaults to `question_allowance`. A fixed ratio (see
        `fixed_ratio`) is the only candidate. Raises DocumentTooLongError (naming `subject`,
        the documents, if given) if no candidate fits.
        """
        return self._fitting_ratio(tokens, room, self.fixed_ratio, subject)

    def _fitting_ratio(
        self, tokens: int, room: int | None, fixed: int | None, subject: str | None
    ) -> int:
        room = self.question_allowance if room is None else room
        ratios = self.beacon_config.beacon_ratio
        if fixed is not None:
            candidates = [fixed]
        else:
            candidates = sorted(r for r in ratios if r > 0) + ([0] if 0 in ratios else [])
        for ratio in candidates:
            if tokens + room <= self._capacity(ratio):
                return ratio
        ratio = candidates[-1] if fixed is not None else max(ratios)
        limit = max(0, self._capacity(ratio) - room)
        reach = f"the model's reach at ratio {ratio}"
        if self.memory_budget_bytes:
            reach += f" within the memory budget of {self.memory_budget_bytes} bytes"
        kept = "the answer" if subject is None else "the question and the answer"
        higher = [r for r in sorted(ratios) if r > ratio and self._capacity(r) >= tokens + room]
        advice = [f"a higher ratio ({higher[0]} fits)"] if higher else []
        if subject is None:
            advice.append("a shorter prompt")
        else:
            advice += ["fewer or shorter documents", "a summary (map-reduce over sections)"]
        raise DocumentTooLongError(
            f"{subject or 'the prompt'}: {tokens} tokens do not fit this model "
            f"{'at' if fixed is not None else 'even at'} ratio {ratio}: at most {limit} tokens "
            f"fit ({reach}, less {room} tokens kept for {kept}). Try "
            f"{', '.join(advice[:-1])}{' or ' if len(advice) > 1 else ''}{advice[-1]}.",
            tokens=tokens,
            ratio=ratio,
            limit=limit,
        )

    def max_prompt_tokens(self, max_new_tokens: int = 0) -> int:
        """The longest prompt that leaves room for `max_new_tokens` (what adapters advertise).

        `context_window` less the answer: at the fixed ratio if there is one, within the
        memory budget if set.
        """
        return self.context_window - max_new_tokens

    def question_schedule(
        self, ids: Sequence[int], question: str, ratio: int, text_end: int | None = None
    ) -> list[int]:
        """Ratio of every window the memory will condense in `ids`, planned for `question`.

        Windows whose text (up to `text_end`, the document) best matches the question under
        BM25 get the lowest ratios (down to the smallest trained one), the rest the stride
        itself (one beacon per window), with no more condensed entries in all than uniform
        `ratio` leaves, so whatever `ratio` was chosen to fit still fits.
        """
        return plan_schedule(
            self.beacon_config, ids, question, self.tokenizer.decode, ratio, text_end=text_end
        )

    def _resolve_ratio(
        self,
        ratio: int | str | None,
        tokens: int,
        room: int | None = None,
        subject: str | None = None,
    ) -> int:
        """The ratio for a request (`ratio` if given, checked to fit, else `choose_ratio`)."""
        if ratio is None or ratio == "auto":
            return self.choose_ratio(tokens, room, subject)
        self._check_ratio(int(ratio))
        return self._fitting_ratio(tokens, room, int(ratio), subject)

    def info(self, documents, *, ratio: int | str | None = None) -> DocumentInfo:
        """Pages, characters, tokens, the ratio that would be used and the memory it needs.

        `fits` is False when the documents overflow the model's reach or the memory budget at
        that ratio (given, fixed, or even the strongest); the ratio shown is then that one.
        """
        documents = as_documents(documents)
        tokens = self.count_tokens(documents_text(documents))
        try:
            ratio, fits = self._resolve_ratio(ratio, tokens), True
        except DocumentTooLongError as error:
            ratio, fits = error.ratio, False
        entries = self._entries(tokens, ratio)
        return DocumentInfo(
            names=[d.name for d in documents],
            pages=sum(d.num_pages for d in documents),
            characters=sum(d.num_chars for d in documents),
            tokens=tokens,
            compression_ratio=ratio,
            memory_entries=entries,
            memory_bytes=entries * self._entry_bytes(),
            fits=fits,
        )

    # ------------------------------------------------------------------ prompts
    def render_messages(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat messages (the model's chat template, ready to answer)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n\n".join(lines) + "\n\nassistant:"

    def count_message_tokens(self, messages: list[dict[str, str]]) -> int:
        return self.count_tokens(self.render_messages(messages))

    def _document_prompt(
        self, document: str, turns: list[dict[str, str]], system: str | None
    ) -> tuple[list[int], int, int]:
        """Prompt ids, the token length of the document prefix, and the document's tokens.

        The document goes at the start of the first user turn; the prompt text is tokenized as
        two pieces split right after the document, so its tokens are identical across questions.
        """
        marker = "\u0000DOCUMENT_END\u0000"
        first = dict(turns[0])
        first["content"] = f"{document}{marker}\n\n{first['content']}"
        messages = ([{"role": "system", "content": system}] if system else []) + [first, *turns[1:]]
        head, tail = self.render_messages(messages).split(marker, 1)
        head_ids = self.tokenizer.encode(head, add_special_tokens=False)
        tail_ids = self.tokenizer.encode(tail, add_special_tokens=False)
        return head_ids + tail_ids, len(head_ids), self.count_tokens(document)

    # ------------------------------------------------------------------ public requests
    def ask(self, documents, question: str, **generation: Any) -> Answer:
        return self.stream_ask(documents, question, **generation).consume()

    def stream_ask(
        self,
        documents,
        question: str,
        *,
        on_progress: Progress | None = None,
        ratio: int | str | None = None,
        ratio_plan: str = "uniform",
        **generation: Any,
    ) -> AnswerStream:
        """Answer `question` from the whole of `documents` (Document objects or paths).

        `ratio_plan="question"` condenses the windows most relevant to the question (BM25) at
        low ratios and the rest hard, with no more condensed entries than the uniform ratio
        would leave (`beacon_apps.ratio_plan`); such a reading is never cached.
        """
        if not question.strip():
            raise ValueError("question: empty question")
        turns = [{"role": "user", "content": question}]
        return self._document_stream(
            documents, turns, on_progress, ratio, generation, question=_plan(ratio_plan, question)
        )

    def chat(self, documents, history: list[dict[str, str]], **generation: Any) -> Answer:
        return self.stream_chat(documents, history, **generation).consume()

    def stream_chat(
        self,
        documents,
        history: list[dict[str, str]],
        *,
        on_progress: Progress | None = None,
        ratio: int | str | None = None,
        ratio_plan: str = "uniform",
        **generation: Any,
    ) -> AnswerStream:
        """Multi-turn chat about documents; `history` alternates user/assistant, ends with user.

        `ratio_plan="question"`: as for `stream_ask`, planned for the last user message.
        """
        if not history or history[-1].get("role") != "user":
            raise ValueError("history: must end with a user message")
        question = _plan(ratio_plan, history[-1].get("content", ""))
        return self._document_stream(
            documents, list(history), on_progress, ratio, generation, question=question
        )

    def summarize(self, documents, length: str = "medium", **generation: Any) -> Answer:
        return self.stream_summarize(documents, length, **generation).consume()

    def stream_summarize(
        self,
        documents,
        length: str = "medium",
        *,
        on_progress: Progress | None = None,
        ratio: int | str | None = None,
        **generation: Any,
    ) -> AnswerStream:
        """One pass over the whole document; map-reduce over sections if it cannot fit at all.

        The prompt starts like a question's (same system prompt, document first), so a
        document condensed for questions is reused for its summary and the other way round.
        """
        if length not in SUMMARY_INSTRUCTIONS:
            raise ValueError(f"length: choose one of {', '.join(SUMMARY_INSTRUCTIONS)}")
        instruction, budget = SUMMARY_INSTRUCTIONS[length]
        generation.setdefault("max_new_tokens", budget)
        settings = self._settings(generation)
        stream = AnswerStream()
        stream._deltas = self._summary_deltas(
            stream, documents, instruction, settings, on_progress, ratio, generation.get("timeout")
        )
        return stream

    def condense(
        self, documents, *, on_progress: Progress | None = None, ratio: int | str | None = None
    ) -> Answer:
        """Read documents into the cache without answering (the app's upload step).

        Reads the prompt prefix that every question about the documents shares, up to its last
        window boundary (the rest of the document is read with the question), and caches it; a
        later question restores it. The returned Answer has no text and finish_reason
        "condensed" ("cancelled" if stopped); `prompt_tokens` is the tokens condensed (restored
        ones included), the other numbers say what condensing took.
        """
        turns = [{"role": "user", "content": ""}]
        stream = self._document_stream(
            documents, turns, on_progress, ratio, {"max_new_tokens": 1}, generate=False
        )
        return stream.consume()

    def complete(self, prompt: str, **generation: Any) -> Answer:
        return self.stream_complete(prompt, **generation).consume()

    def stream_complete(
        self,
        prompt: str,
        *,
        on_progress: Progress | None = None,
        ratio: int | str | None = None,
        **generation: Any,
    ) -> AnswerStream:
        """Plain text continuation (no chat template): LangChain `LLM`, LlamaIndex `complete`."""
        if not prompt:
            raise ValueError("prompt: empty prompt")

        def build():
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            return ids, len(ids) - FOLLOW_UP_SLACK, len(ids)

        return self._stream(build, on_progress, ratio, generation, room_is_answer=True)

    def chat_messages(self, messages: list[dict[str, str]], **generation: Any) -> Answer:
        return self.stream_chat_messages(messages, **generation).consume()

    def stream_chat_messages(
        self,
        messages: list[dict[str, str]],
        *,
        on_progress: Progress | None = None,
        ratio: int | str | None = None,
        **generation: Any,
    ) -> AnswerStream:
        """Chat over arbitrary messages (documents inside them); long shared prefixes are cached."""
        if not messages:
            raise ValueError("messages: at least one message is needed")

        def build():
            ids = self.tokenizer.encode(self.render_messages(messages), add_special_tokens=False)
            return ids, len(ids) - FOLLOW_UP_SLACK, len(ids)

        return self._stream(build, on_progress, ratio, generation, room_is_answer=True)

    # ------------------------------------------------------------------ the one request path
    def _document_stream(
        self, documents, turns, on_progress, ratio, generation, generate: bool = True, question=None
    ) -> AnswerStream:
        loaded: list[Document] = []

        def build():
            loaded[:] = as_documents(documents)
            return self._document_prompt(documents_text(loaded), turns, QA_SYSTEM_PROMPT)

        def subject() -> str:  # names the documents in DocumentTooLongError
            return ", ".join(d.name for d in loaded) or "the documents"

        return self._stream(
            build,
            on_progress,
            ratio,
            generation,
            generate=generate,
            question=question,
            subject=subject,
        )

    def _settings(self, generation: dict[str, Any]) -> GenerationSettings:
        generation = dict(generation)
        stop = generation.pop("stop", None)
        if stop is not None:
            generation["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
        temperature = generation.get("temperature")
        if temperature and "do_sample" not in generation:
            generation["do_sample"] = True
        generation.setdefault("eos_token_ids", self.eos_token_ids)
        known = {f.name for f in dataclasses.fields(GenerationSettings)} | {"timeout"}
        unknown = sorted(set(generation) - known)
        if unknown:
            raise ValueError(
                f"{unknown[0]}: not a generation setting; known: {', '.join(sorted(known))}"
            )
        return GenerationSettings(**{k: v for k, v in generation.items() if k != "timeout"})

    def _stream(
        self,
        build: Callable[[], tuple[list[int], int, int]],
        on_progress: Progress | None,
        ratio: int | str | None,
        generation: dict[str, Any],
        *,
        generate: bool = True,
        room_is_answer: bool = False,
        question: str | None = None,
        subject: Callable[[], str] | None = None,
    ) -> AnswerStream:
        """A lazy stream for the prompt `build()` returns: (ids, stable length, ratio basis).

        `subject()` names the documents when they do not fit (None: the prompt). A `timeout`
        in `generation` counts from the first delta asked for.

        With a `question`, the windows before `stable length` (the document) get a
        question-aware ratio schedule at the overall ratio otherwise pinned.
        """
        settings = self._settings(generation)
        timeout = generation.get("timeout")
        stream = AnswerStream()

        def deltas() -> Iterator[str]:
            deadline = time.monotonic() + timeout if timeout else None
            ids, stable, basis = build()
            room = settings.max_new_tokens if room_is_answer else None
            pinned = self._resolve_ratio(ratio, basis, room, subject() if subject else None)
            schedule = None
            if question is not None:
                schedule = self.question_schedule(ids, question, pinned, text_end=stable)
            yield from self._run(
                stream, ids, stable, pinned, settings, on_progress, deadline, generate, schedule
            )

        stream._deltas = deltas()
        return stream

    def _check(self, stream: AnswerStream, deadline: float | None) -> bool:
        """True if the request must stop now (cancelled); raises when past its deadline."""
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the request took longer than its timeout")
        return stream.cancelled

    @contextlib.contextmanager
    def _turn(self, stream: AnswerStream, deadline: float | None) -> Iterator[bool]:
        """Hold the engine for one request: True once it is this request's turn, False if the
        request was cancelled before (or while waiting for) it; raises past its deadline."""
        if self._check(stream, deadline):
            yield False
            return
        while not self._lock.acquire(timeout=0.05):  # returns as soon as the lock is free
            if self._check(stream, deadline):
                yield False
                return
        try:
            yield True
        finally:
            self._lock.release()

    def _run(
        self, stream, ids, stable_length, ratio, settings, on_progress, deadline, generate, plan
    ) -> Iterator[str]:
        with self._turn(stream, deadline) as turn:
            if not turn:  # cancelled before its turn: nothing is read or generated
                stream.answer = Answer(
                    text="",
                    finish_reason="cancelled",
                    prompt_tokens=len(ids),
                    completion_tokens=0,
                    compression_ratio=ratio,
                    cached_tokens=0,
                    prefill_seconds=0.0,
                    total_seconds=0.0,
                    memory_entries=0,
                    memory_bytes=0,
                    notices=stream.notices,
                )
                return
            started = time.perf_counter()
            model, memory = self.model, self.model.memory
            memory.config = self.beacon_config.replace(beacon_ratio_mix=f"fixed-{ratio}")
            memory.reset()
            memory.set_ratio_schedule(plan)  # None: uniform; a schedule bypasses the cache
            cached, position = self._prefill(
                stream, ids, stable_length, on_progress, deadline, document_only=not generate
            )
            prefill_done = time.perf_counter()
            tokens: list[int] = []
            decoder = _TextDecoder(self.tokenizer, settings.stop_strings)
            finish = "length" if generate else "condensed"
            if stream.cancelled:
                finish = "cancelled"
            elif generate:
                tail = torch.tensor([ids[position:]])
                decoding = dataclasses.replace(
                    settings, stop_strings=()
                )  # the decoder matches text
                for token in generate_tokens(model, tail, decoding, reset=False):
                    tokens.append(token)
                    if token in settings.eos_token_ids:
                        finish = "stop"
                        break
                    delta, stopped = decoder.add(token)
                    if delta:
                        yield delta
                    if stopped:
                        finish = "stop"
                        break
                    if self._check(stream, deadline):
                        finish = "cancelled"
                        break
                rest = decoder.flush()
                if rest:
                    yield rest
            sink, beacons, raw = memory.size()
            stream.answer = Answer(
                text=decoder.text,
                finish_reason=finish,
                prompt_tokens=len(ids) if generate else position,  # condense(): what it read
                completion_tokens=len(tokens),
                compression_ratio=ratio,
                cached_tokens=cached,
                prefill_seconds=prefill_done - started,
                total_seconds=time.perf_counter() - started,
                memory_entries=sink + beacons + raw,
                memory_bytes=memory.nbytes(),
                token_ids=tokens,
                notices=stream.notices,
                ratio_plan="uniform" if plan is None else "question",
                window_ratios=[] if plan is None else list(memory.ratios),
            )

    def _prefill(
        self, stream, ids, stable_length, on_progress, deadline, document_only: bool = False
    ) -> tuple[int, int]:
        """Read the prompt step by step up to the last step boundary before its end.

        Step boundaries are where the memory closes a window: W, W + S, W + 2S, ... (window W,
        stride S), so these pieces are exactly the steps one call would take, and progress and
        cancellation are checked between them. With S == W the longest cached prefix is restored
        first and a snapshot is stored at the last boundary before the question
        (`stable_length`), where the next question about the same document will find it.
        `document_only` (condense) stops at that boundary. Returns (tokens restored from the
        cache, tokens read).
        """
        config = self.beacon_config
        window, stride = config.beacon_window, config.beacon_stride

        def boundary(limit: int) -> int:  # the last step boundary at or before `limit`
            return 0 if limit < window else window + (limit - window) // stride * stride

        end = boundary(len(ids) - 1)
        store_at = min(end, boundary(max(0, stable_length)))
        if document_only:
            end = store_at
        total = end if document_only else len(ids)
        header = f"{self._fingerprint}|{sorted(self.model.memory.config.to_dict().items())}"
        # Cache keys sit at window multiples: steps only line up with them when windows do not
        # overlap. A question-specific reading neither restores nor stores: its ratios differ.
        use_cache = stride == window and self.model.memory.ratio_schedule is None
        candidates = prefix_digests(header, ids, window, end) if end and use_cache else []
        cached = (
            self.cache.restore_longest(candidates, self.model.memory, self.model.device)
            if end and use_cache
            else 0
        )
        position = cached
        with torch.no_grad():
            while position < end:
                if self._check(stream, deadline):
                    return cached, position
                step = window if position == 0 else stride
                self.model(torch.tensor([ids[position : position + step]]), logits_to_keep=0)
                position += step
                if use_cache and position == store_at and store_at > cached:
                    self.cache.store(candidates[store_at // window - 1][1], self.model.memory)
                if on_progress:
                    on_progress(position, total)
        if on_progress:
            on_progress(total, total)
        return cached, position

    def _summary_deltas(
        self, stream, documents, instruction, settings, on_progress, ratio, timeout=None
    ):
        """The whole document in one pass, or (if it cannot fit) sections, then their summary.

        `timeout` covers the whole summary: every pass gets the time that is left.
        """
        deadline = time.monotonic() + timeout if timeout else None
        documents = as_documents(documents)
        text = documents_text(documents)
        turns = [{"role": "user", "content": instruction}]
        generation = _Budgeted(dataclasses.asdict(settings), deadline)
        names = ", ".join(d.name for d in documents)
        try:
            self._resolve_ratio(ratio, self.count_tokens(text), subject=names)
        except DocumentTooLongError as error:
            why = (
                f"{names}: {error.tokens} tokens do not fit at ratio {error.ratio} (at most "
                f"{error.limit})"
            )
            yield from self._map_reduce(
                stream, documents, instruction, why, generation, on_progress, ratio
            )
            return
        inner = self._document_stream(documents, turns, on_progress, ratio, generation.left())
        yield from self._follow(stream, inner)

    def _follow(self, outer: AnswerStream, inner: AnswerStream) -> Iterator[str]:
        """Relay `inner`'s deltas, answer and cancellation through `outer`."""
        inner._cancelled = outer._cancelled
        try:
            yield from inner
        finally:
            inner.close()
        if inner.answer is not None:
            inner.answer.notices = outer.notices
        outer.answer = inner.answer

    def _map_reduce(self, stream, documents, instruction, why, generation, on_progress, ratio):
        """Summaries of sections that fit (at `ratio` if one is given), then their summary."""
        pages = [p for d in documents for p in d.pages]
        explicit = ratio is not None and ratio != "auto"
        capacity = self._capacity(int(ratio)) if explicit else self.context_window
        limit = capacity - 2 * self.question_allowance
        sections: list[list[Page]] = [[]]
        used = 0
        for page in pages:
            size = self.count_tokens(page.text) + 8
            if sections[-1] and used + size > limit:
                sections.append([])
                used = 0
            sections[-1].append(page)
            used += size
        notice = f"{why}; summarizing in {len(sections)} sections, then combining (map-reduce)."
        logger.info(notice)
        stream.notices.append(notice)
        partials = []
        section_prompt = [{"role": "user", "content": SUMMARY_INSTRUCTIONS["medium"][0]}]
        for number, section in enumerate(sections, start=1):
            part = Document(f"section {number}", f"section {number}", section, {})
            inner = self._document_stream(
                [part], section_prompt, on_progress, ratio, generation.left()
            )
            inner._cancelled = stream._cancelled
            answer = inner.consume()
            if answer.finish_reason == "cancelled":
                stream.answer = answer
                return
            partials.append(answer.text)
        combined = text_document(
            "\n\n".join(f"Section {i + 1}: {t}" for i, t in enumerate(partials)),
            "section summaries",
        )
        final = [{"role": "user", "content": instruction}]
        yield from self._follow(
            stream,
            self._document_stream([combined], final, on_progress, ratio, generation.left()),
        )


class _Budgeted:
    """Generation settings shared by the passes of one request under one deadline."""

    def __init__(self, generation: dict[str, Any], deadline: float | None) -> None:
        self.generation, self.deadline = generation, deadline

    def left(self) -> dict[str, Any]:
        """The settings for the next pass, its `timeout` the time left (raises if none is)."""
        if self.deadline is None:
            return dict(self.generation)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than its timeout")
        return {**self.generation, "timeout": left}


class _TextDecoder:
    """Incremental detokenization that never emits half a character or part of a stop string.

    Decoding and stop-string search are `StopStringMatcher`'s (incremental: the cost per token
    does not grow with the answer); this adds what may be shown yet.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.stop_strings = list(stop_strings)
        self._matcher = StopStringMatcher(tokenizer, self.stop_strings)
        self.text = ""
        self.emitted = 0

    def add(self, token: int) -> tuple[str, bool]:
        cut = self._matcher.add(token)
        full = self._matcher.text
        if cut is not None:
            self.text = full[:cut]
            return self._emit(len(self.text)), True
        self.text = full
        safe = len(full.rstrip("\ufffd"))
        for stop in self.stop_strings:  # hold back a possible start of a stop string
            for k in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:k]):
                    safe = min(safe, len(full) - k)
                    break
        return self._emit(safe), False

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

    def flush(self) -> str:
        return self._emit(len(self.text))


RATIO_PLANS = ("uniform", "question")


def _plan(ratio_plan: str, question: str) -> str | None:
    """The question to plan ratios for, or None for a uniform ratio."""
    if ratio_plan not in RATIO_PLANS:
        raise ValueError(f"ratio_plan: choose one of {', '.join(RATIO_PLANS)} (got {ratio_plan!r})")
    return question if ratio_plan == "question" else None


def _eos_ids(model: BeaconForCausalLM, tokenizer) -> list[int]:
    ids: set[int] = set()
    for source in (model.config.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


def _folder_fingerprint(directory: Path) -> str:
    """Identity of a model folder for cache keys: path, config and weight file sizes/mtimes."""
    parts = [str(directory.resolve())]
    for path in sorted(directory.glob("*.safetensors")) + [directory / "config.json"]:
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return "|".join(parts)
