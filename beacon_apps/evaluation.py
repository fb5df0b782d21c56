"""Long-context evaluation of a beacon model, always next to the baselines it has to beat.

Tasks follow the reference's scripts (FlagEmbedding `main/eval_lm.py`, `eval_passkey.py`,
`eval_needle.py`; method notes §8):

- perplexity: each document is cut into chunks of `length` tokens starting every `stride` tokens
  (0: one chunk per document); only tokens beyond the previous chunk are scored; each chunk is
  read from scratch. PPL = exp(mean over documents of the document's mean NLL).
- passkey: a 5-digit key hidden at a depth of repetitive filler; correct if the first digit run
  of the greedy answer is the key (plus a fuzzy ratio, as the reference).
- needle: a sentence hidden in a haystack (your files, or stdlib docs by default); ROUGE-L recall
  of the answer's first line against the needle.

Every run measures, on the same inputs:

- beacon: the beacon model reading everything through its memory;
- truncated: the base model limited to its native window N (perplexity: the chunk read in
  independent N-token pieces; passkey/needle: the prompt cut to N in the middle, keeping the
  instruction and the question, as the reference truncates LongBench prompts);
- sink: StreamingLLM: the first `sink_size` tokens + the most recent tokens, N in all, positions
  by cache slot (evicted keys re-rotated), read in blocks;
- full: the base model attending to everything (where it fits in memory; beyond N it runs past
  its trained positions, which is the point of comparing).

On request (passkey/needle only), `beacon-qa`: the beacon model at the same overall ratio as
`beacon`, but with the windows most relevant to the question (BM25) condensed least and the rest
hard (`beacon_apps.ratio_plan`), so uniform and question-aware compression compare at equal size.

The baselines run the base model's own Hugging Face modules, shared with the beacon model (the
beacon parameters sit beside them and are not used), so no second copy of the weights is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

from .beacon import (
    BeaconForCausalLM,
    GenerationSettings,
    generate,
    load_beacon_model,
    resolve_model_dir,
)
from .beacon.attention import apply_rope
from .beacon.config import BeaconConfig
from .beacon.model import max_positions
from .ratio_plan import question_schedule

logger = logging.getLogger(__name__)

TASKS = ("perplexity", "passkey", "needle")
DEFAULT_METHODS = ("beacon", "truncated", "sink", "full")
METHODS = (*DEFAULT_METHODS, "beacon-qa")  # beacon-qa: question-aware ratios (retrieval only)
# The reference's prompts, typo included, so numbers compare with published ones.
DESCRIPTION = (
    "There is an important infomation hidden in the following context. Find the information "
    "and memorize it. I will quiz you about the important information there.\n"
)
PASSKEY_NOISE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
NEEDLE = (
    "\n\nThe best thing to do in San Francisco is sitting in Dolores Park and eating a hamburg "
    "on a sunny day.\n\n"
)
NEEDLE_QUESTION = "\n\nWhat is the best thing to do in San Francisco?\nAnswer:"
HEATMAP_COLOURS = ((0xF0, 0x49, 0x6E), (0xEB, 0xB8, 0x39), (0x0C, 0xD7, 0x9F))  # 0, 0.5, 1


@dataclass
class EvalConfig:
    """One evaluation run; the defaults are the reference's where it has them."""

    model: str
    tasks: list[str] = field(default_factory=lambda: ["perplexity"])
    output_dir: str = "eval-results"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    lengths: list[int] = field(default_factory=lambda: [8192, 16384, 32768])
    # perplexity
    data: list[str] = field(default_factory=list)  # text/JSONL ('text')/PDF files or folders
    stride: int = 0
    max_documents: int = 100
    # passkey and needle
    depths: list[int] = field(default_factory=lambda: np.linspace(0, 100, 10).astype(int).tolist())
    samples_per_cell: int = 1
    passkey_digits: int = 5
    haystack: list[str] = field(default_factory=list)  # default: Python's own documentation
    needle: str = NEEDLE
    question: str = NEEDLE_QUESTION
    max_new_tokens: int = 50
    chat_template: bool | None = None  # None: use the tokenizer's template if it has one
    seed: int = 123
    # baselines
    native_window: int | None = None  # default: config.max_position_embeddings
    sink_size: int = 4
    stream_block: int | None = None  # tokens read per step by sink/full (default N // 8)
    full_max_length: int | None = None  # skip full attention above this (default: try)
    # model
    ratio_mix: str | None = "adapt-1024"  # beacon_ratio_mix for evaluation (None: checkpoint's)
    device: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS] + [
            m for m in self.methods if m not in METHODS
        ]
        if unknown:
            raise ValueError(f"tasks/methods: unknown {unknown}; tasks {TASKS}, methods {METHODS}")
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"lengths: need lengths of at least 2 tokens (got {self.lengths})")
        if "perplexity" in self.tasks and not self.data:
            raise ValueError("data: perplexity needs text, JSONL or PDF files (--data)")
        if self.stride < 0 or self.sink_size < 0 or self.max_new_tokens < 1:
            raise ValueError("stride, sink_size must be >= 0 and max_new_tokens >= 1")


# ---------------------------------------------------------------------- scoring
def score_passkey(output: str, passkey: str) -> tuple[float, float]:
    """(accuracy, fuzzy ratio) as the reference: the first digit run of the output vs the key."""
    match = re.search(r"\d+", output)
    found = match.group() if match else ""
    fuzzy = difflib.SequenceMatcher(None, found, passkey).ratio()  # = fuzzywuzzy's fuzz.ratio
    return float(found == passkey), round(fuzzy, 2)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall on lower-cased words: LCS(prediction, reference) / len(reference)."""
    hyp = re.findall(r"\w+", prediction.lower())
    ref = re.findall(r"\w+", reference.lower())
    if not ref:
        return 0.0
    previous = [0] * (len(hyp) + 1)
    for word in ref:
        current = [0]
        for j, other in enumerate(hyp):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(ref)


def score_needle(output: str, needle: str) -> float:
    """The reference's needle score: ROUGE-L recall of the answer's first line."""
    first_line = output.strip("\n").split("\n")[0]
    return rouge_l_recall(first_line, needle.strip("\n"))


def perplexity(document_nlls: Sequence[tuple[float, int]]) -> float:
    """exp(mean over documents of each document's mean token NLL), as the reference."""
    means = [total / count for total, count in document_nlls if count]
    return math.exp(sum(means) / len(means)) if means else float("nan")


# ---------------------------------------------------------------------- base-model passes
def _base_hidden(model: BeaconForCausalLM, ids: torch.Tensor, cache=None) -> torch.Tensor:
    """Final hidden states of the plain base model (its own HF modules), optionally cached."""
    out = model.model(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
    return out.last_hidden_state


def _evict(model: BeaconForCausalLM, cache: DynamicCache, sink: int, keep: int) -> None:
    """Keep the first `sink` and last `keep` entries of each layer (StreamingLLM's cache).

    StreamingLLM numbers positions by cache slot, so the kept recent keys move down by the
    number of evicted entries: we re-rotate them by that offset (in float32; RoPE rotations
    compose). New tokens then take positions after the cache, as HF derives them from its length.
    """
    length = cache.get_seq_length()
    drop = length - sink - keep
    if drop <= 0:
        return
    rotary = model.model.rotary_emb
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        recent = keys[:, :, length - keep :].float()
        offset = torch.full((1, 1), -drop, device=keys.device)
        cos, sin = rotary(recent, offset)
        recent = apply_rope(recent, cos / scale, sin / scale).to(keys.dtype)
        layer.keys = torch.cat([keys[:, :, :sink], recent], dim=2)
        layer.values = torch.cat([values[:, :, :sink], values[:, :, length - keep :]], dim=2)


def stream_base_model(
    model: BeaconForCausalLM,
    ids: torch.Tensor,
    cache: DynamicCache,
    block: int,
    limit: tuple[int, int] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Read `ids` in blocks through `cache`; yields (offset, hidden states of the block).

    `limit = (sink, window)`: before each block the cache is cut so that the block's tokens
    see at most `window` keys (sink + recent). None: the cache keeps everything (full).
    """
    for start in range(0, ids.shape[1], block):
        piece = ids[:, start : start + block]
        if limit is not None:
            sink, window = limit
            _evict(model, cache, sink, max(window - piece.shape[1] - sink, 0))
        yield start, _base_hidden(model, piece, cache)


def _nll(model: BeaconForCausalLM, hidden: torch.Tensor, targets: torch.Tensor):
    """(sum, count) of next-token NLL where `targets` (one per hidden row) is not -100."""
    total, count = 0.0, 0
    for start in range(0, hidden.shape[1], 1024):  # never the logits of a whole book at once
        rows = targets[start : start + 1024].to(hidden.device)
        if (rows >= 0).any():
            logits = model.lm_head(hidden[0, start : start + 1024]).float()
            total += float(F.cross_entropy(logits, rows, ignore_index=-100, reduction="sum"))
            count += int((rows >= 0).sum())
    return total, count


def _targets(ids: torch.Tensor, first: int) -> torch.Tensor:
    """Row j predicts token j + 1; only tokens from index `first` on are scored."""
    targets = torch.full((ids.shape[1],), -100, dtype=torch.long)
    targets[max(first, 1) - 1 : -1] = ids[0, max(first, 1) :].cpu()
    return targets


# ---------------------------------------------------------------------- per-method NLL
def adapt_ratio(config: BeaconConfig, positions: int, tokens: int) -> int | None:
    """The ratio an `adapt-N` mix picks for `tokens` read in one call (method notes §4.4).

    Perplexity feeds the beacon model one window per call (to keep only one window of logits),
    so the ratio a single call would choose is pinned first. None for other mixes.
    """
    kind, extra = config.parse_ratio_mix()
    if kind != "adapt":
        return None
    window = config.beacon_window

    def reach(ratio: int) -> int:
        return (positions - window) * ratio + window if ratio else positions

    fitting = [r for r in config.beacon_ratio if reach(r) >= tokens + extra]
    return min(fitting, key=reach) if fitting else max(config.beacon_ratio)


def beacon_nll(model: BeaconForCausalLM, ids: torch.Tensor, first: int) -> tuple[float, int]:
    """NLL of the scored tokens of `ids` read by the beacon model through a fresh memory."""
    memory = model.memory
    original = memory.config
    memory.reset()
    pinned = adapt_ratio(original, max_positions(model.config), ids.shape[1])
    if pinned is not None:
        memory.config = original.replace(beacon_ratio_mix=f"fixed-{pinned}")
    targets, window = _targets(ids, first), original.beacon_window
    total, count = 0.0, 0
    try:
        for start in range(0, ids.shape[1], window):
            piece = ids[:, start : start + window]
            end = start + piece.shape[1]
            keep = min(max(end - (max(first, 1) - 1), 0), piece.shape[1])  # rows predicting scores
            logits = model(piece, logits_to_keep=keep).logits
            if keep:
                rows = targets[end - keep : end].to(logits.device)
                total += float(F.cross_entropy(logits[0], rows, ignore_index=-100, reduction="sum"))
                count += int((rows >= 0).sum())
    finally:
        memory.config = original
        memory.reset()
    return total, count


def overall_ratio(model: BeaconForCausalLM, tokens: int) -> int:
    """The one ratio the beacon method reads a `tokens`-token prompt at (fixed-N or adapt-N).

    A question-aware plan must spend what this uniform ratio spends, so it needs one; a
    random mix has none and is refused.
    """
    config = model.memory.config
    kind, extra = config.parse_ratio_mix()
    if kind == "fixed":
        return extra
    if len(config.beacon_ratio) == 1:
        return config.beacon_ratio[0]
    pinned = adapt_ratio(config, max_positions(model.config), tokens)
    if pinned is None:
        raise ValueError(
            f"beacon-qa: ratio mix {config.beacon_ratio_mix!r} has no single overall ratio; "
            "use --ratio-mix fixed-N or adapt-N"
        )
    return pinned


def planned_generate(
    model: BeaconForCausalLM,
    ids: torch.Tensor,
    settings: GenerationSettings,
    question: str,
    decode,
    text_end: int | None = None,
) -> list[int]:
    """Greedy answer of the beacon model reading `ids` with question-aware window ratios.

    The overall ratio is the one plain `beacon` uses for the same prompt (`overall_ratio`);
    the schedule keeps the windows (up to `text_end`) that best match `question` at low
    ratios and spends no more condensed entries in all. Windows beyond the prompt (those the
    answer fills) use the overall ratio.
    """
    memory = model.memory
    original = memory.config
    overall = overall_ratio(model, ids.shape[1])
    schedule = question_schedule(
        original, ids[0].tolist(), question, decode, overall, text_end=text_end
    )
    memory.reset()
    memory.config = original.replace(beacon_ratio_mix=f"fixed-{overall}")
    memory.set_ratio_schedule(schedule)
    try:
        return generate(model, ids, settings, reset=False)
    finally:
        memory.config = original
        memory.reset()


@torch.no_grad()
def truncated_nll(model, ids: torch.Tensor, first: int, native: int) -> tuple[float, int]:
    """The base model reading `ids` in independent `native`-token pieces (no context across)."""
    targets, total, count = _targets(ids, first), 0.0, 0
    for start in range(0, ids.shape[1], native):
        end = min(start + native, ids.shape[1])
        if (targets[start:end] >= 0).any():
            s, c = _nll(model, _base_hidden(model, ids[:, start:end]), targets[start:end])
            total, count = total + s, count + c
    return total, count


@torch.no_grad()
def streaming_nll(
    model, ids: torch.Tensor, first: int, block: int, limit: tuple[int, int] | None
) -> tuple[float, int]:
    """The base model with a sink + recent cache (`limit`), or a full cache (None)."""
    targets, total, count = _targets(ids, first), 0.0, 0
    for start, hidden in stream_base_model(model, ids, DynamicCache(), block, limit):
        s, c = _nll(model, hidden, targets[start : start + hidden.shape[1]])
        total, count = total + s, count + c
    return total, count


# ---------------------------------------------------------------------- generation
@torch.no_grad()
def _greedy(model, ids: torch.Tensor, settings: GenerationSettings, block: int, limit) -> list:
    """Greedy decoding with the base model, full cache or sink + recent cache."""
    cache = DynamicCache()
    for _, hidden in stream_base_model(model, ids, cache, block, limit):
        last = hidden[0, -1]  # only the prompt's last position is needed
    tokens: list[int] = []
    for _ in range(settings.max_new_tokens):
        token = int(model.lm_head(last).argmax())
        tokens.append(token)
        if token in settings.eos_token_ids:
            break
        step = torch.tensor([[token]], device=ids.device)
        last = next(stream_base_model(model, step, cache, 1, limit))[1][0, -1]
    return tokens


def middle_truncate(ids: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep the first and last `budget / 2` tokens (the instruction and the question)."""
    if ids.shape[1] <= budget:
        return ids
    head = budget // 2
    return torch.cat([ids[:, :head], ids[:, ids.shape[1] - (budget - head) :]], dim=1)


# ---------------------------------------------------------------------- prompts
def _with_template(tokenizer, text: str, use_template: bool) -> torch.Tensor:
    """Token ids of a user prompt, wrapped in the chat template as the reference does."""
    if use_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    ids = tokenizer(text, add_special_tokens=not use_template)["input_ids"]
    return torch.tensor([ids])


def _layout(tokenizer, length: int, depth: float, info: str, question: str) -> tuple:
    """Token counts of the fixed parts and where the hidden information goes (reference)."""
    parts = [tokenizer.encode(t, add_special_tokens=False) for t in (DESCRIPTION, info, question)]
    lowest, highest = len(parts[0]), length - len(parts[2]) - len(parts[1]) - 1
    if highest < lowest:
        raise ValueError(f"lengths: {length} tokens is too short for the prompt; use longer")
    return parts, lowest + round((highest - lowest) * depth / 100)


def passkey_prompt(
    tokenizer, length: int, depth: float, digits: int, rng, haystack: str = ""
) -> tuple[str, str]:
    """The reference's passkey prompt of about `length` tokens with the key at `depth` %.

    `haystack`: real text around the key (a random stretch of it) instead of the reference's
    repeated sentences, for models that never saw such prose (the demo model knows code).
    """
    passkey = str(rng.integers(10 ** (digits - 1), 10**digits))
    info = f"\n\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n\n"
    (description, information, question), position = _layout(
        tokenizer, length, depth, info, PASSKEY_QUESTION
    )
    after_length = length - position - len(information) - len(question)
    if haystack:
        start = int(rng.integers(0, max(1, len(haystack) - 8 * length)))
        noise = tokenizer.encode(haystack[start : start + 8 * length], add_special_tokens=False)
        before = noise[: position - len(description)]
        after = noise[len(before) : len(before) + after_length]
    else:
        noise = tokenizer.encode(PASSKEY_NOISE * (length // 10), add_special_tokens=False)
        before, after = noise[: position - len(description)], noise[:after_length]
    return tokenizer.decode(description + before + information + after + question), passkey


def needle_prompt(
    tokenizer, haystack: str, length: int, depth: float, needle: str, question: str
) -> str:
    """The reference's needle prompt: the haystack cut to fit, the needle at `depth` %."""
    words = len(haystack.split())
    if length > words:
        haystack = haystack * math.ceil(length / max(words, 1))
    (description, needle_ids, question_ids), position = _layout(
        tokenizer, length, depth, needle, question
    )
    room = length - len(description) - len(needle_ids) - len(question_ids)
    context = tokenizer.encode(haystack, add_special_tokens=False)[:room]
    ids = description + context[:position] + needle_ids + context[position:] + question_ids
    return tokenizer.decode(ids)


def default_haystack() -> str:
    """Long, plain English prose that ships with Python: the standard library's documentation."""
    import argparse as argparse_module
    import collections
    import inspect
    import logging as logging_module
    import pathlib
    import textwrap
    import unittest

    modules = (argparse_module, collections, inspect, logging_module, pathlib, textwrap, unittest)
    texts = [inspect.getdoc(m) or "" for m in modules]
    texts += [inspect.getdoc(obj) or "" for m in modules for _, obj in inspect.getmembers(m)]
    return "\n\n".join(dict.fromkeys(t for t in texts if len(t) > 200))


def read_texts(paths: Sequence[str | Path], limit: int | None = None) -> list[str]:
    """Documents from text files, JSON/JSONL rows with `text`, PDFs, or folders of them."""
    texts: list[str] = []
    for spec in paths:
        path = Path(spec)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if not file.is_file():
                raise ValueError(f"data: {file} does not exist")
            suffix = file.suffix.lower()
            if suffix in (".jsonl", ".json"):
                from .training import read_json_rows

                texts += [row["text"] for _, row in read_json_rows(file) if "text" in row]
            elif suffix == ".pdf":
                from .documents import load_document

                texts.append(load_document(file).text())
            else:
                texts.append(file.read_text(encoding="utf-8", errors="replace"))
            if limit is not None and len(texts) >= limit:
                return texts[:limit]
    return texts


def lm_chunks(ids: list[int], length: int, stride: int, bos: int | None) -> list[tuple[list, int]]:
    """The reference's `eval_lm` chunks: (chunk ids, index of its first scored token).

    Chunks of `length` tokens (BOS included when the tokenizer uses one) start every `stride`
    tokens (0: one chunk); only tokens beyond the previous chunk's end are scored.
    """
    step, once = (length, True) if stride == 0 else (stride, False)
    room = length - (bos is not None)
    chunks, previous_end = [], 0
    for start in range(0, len(ids), step):
        end = min(start + room, len(ids))
        chunk = ([bos] if bos is not None else []) + ids[start:end]
        chunks.append((chunk, len(chunk) - (end - previous_end)))
        previous_end = end
        if end == len(ids) or once:
            break
    return chunks


# ---------------------------------------------------------------------- heat maps
def _colour(value: float) -> tuple[int, ...]:
    """The reference's red - yellow - green scale; grey for "not measured"."""
    if value != value:  # NaN
        return (200, 200, 200)
    position = min(max(value, 0.0), 1.0) * 2  # 0..2 across the three colours
    index = min(int(position), 1)
    low, high, t = HEATMAP_COLOURS[index], HEATMAP_COLOURS[index + 1], position - index
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high, strict=True))


def write_png(path: Path, pixels: np.ndarray) -> None:
    """A minimal PNG writer (RGB, 8 bit) for when neither matplotlib nor Pillow is installed."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].astype(np.uint8).tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
    path.write_bytes(png + chunk(b"IEND", b""))


def _short(length: int) -> str:
    return f"{length / 1024:g}K" if length >= 1024 else str(length)


def write_heatmap(
    path: Path,
    panels: dict[str, np.ndarray],
    lengths: Sequence[int],
    depths: Sequence[int],
    title: str,
) -> Path:
    """One panel per method: depth (rows) x context length (columns), 0 red .. 1 green.

    matplotlib when importable; else the cells drawn here and labelled with Pillow if present,
    else written unlabelled by `write_png` (the numbers are in results.json either way).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        plt = None
    if plt is not None:
        colours = [tuple(c / 255 for c in rgb) for rgb in HEATMAP_COLOURS]
        cmap = LinearSegmentedColormap.from_list("beacon", colours)
        figure, axes = plt.subplots(1, len(panels), figsize=(4 + 3 * len(panels), 4), squeeze=False)
        for axis, (name, grid) in zip(axes[0], panels.items(), strict=True):
            axis.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                if value == value:  # not NaN
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
            axis.set_title(name)
            axis.set_xticks(range(len(lengths)), [_short(n) for n in lengths], rotation=45)
            axis.set_yticks(range(len(depths)), [str(d) for d in depths])
            axis.set_xlabel("context length")
        axes[0][0].set_ylabel("depth %")
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
    cell_w, cell_h, left, top, gap, bottom = 36, 20, 40, 36, 16, 24
    panel_w = cell_w * len(lengths)
    width = left + len(panels) * (panel_w + gap)
    height = top + cell_h * len(depths) + bottom
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    for p, grid in enumerate(panels.values()):
        x0 = left + p * (panel_w + gap)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                y, x = top + i * cell_h, x0 + j * cell_w
                pixels[y : y + cell_h - 1, x : x + cell_w - 1] = _colour(float(grid[i, j]))
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        write_png(path, pixels)
        return path
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for p, name in enumerate(panels):
        x0 = left + p * (panel_w + gap)
        draw.text((x0, top - 14), name, fill=(0, 0, 0))
        for j, length in enumerate(lengths):
            draw.text((x0 + j * cell_w + 2, height - bottom + 4), _short(length), fill=(0, 0, 0))
    for i, depth in enumerate(depths):
        draw.text((4, top + i * cell_h + 4), f"{depth}%", fill=(0, 0, 0))
    image.save(path)
    return path


# ---------------------------------------------------------------------- the runs
class _Runner:
    """Runs one input through every method; full attention stops after its first OOM."""

    def __init__(self, model: BeaconForCausalLM, config: EvalConfig, notes: list[str]):
        self.model, self.config, self.notes = model, config, notes
        # the base model's trained context (not a RoPE-scaled reach)
        self.native = config.native_window or int(model.config.max_position_embeddings)
        block = config.stream_block or self.native // 8  # a block must fit beside the sink
        self.block = max(min(block, self.native - config.sink_size), 1)
        self.full_limit = config.full_max_length

    def _fits(self, tokens: int) -> bool:
        return self.full_limit is None or tokens <= self.full_limit

    def _full(self, tokens: int, run):
        """`run()` for full attention, or None if it does not fit (memory or the set limit)."""
        if not self._fits(tokens):
            return None
        try:
            return run()
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if "memory" not in str(error).lower() and not isinstance(error, torch.OutOfMemoryError):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.full_limit = tokens - 1
            self.notes.append(f"full attention ran out of memory at {tokens} tokens; skipped")
            logger.warning(self.notes[-1])
            return None

    def nll(self, method: str, ids: torch.Tensor, first: int) -> tuple[float, int] | None:
        model, native, block = self.model, self.native, self.block
        if method == "beacon-qa":  # no question to plan for
            note = "beacon-qa has no question in perplexity; not measured"
            if note not in self.notes:
                self.notes.append(note)
            return None
        if method == "beacon":
            return beacon_nll(model, ids, first)
        if method == "truncated":
            return truncated_nll(model, ids, first, native)
        if method == "sink":
            return streaming_nll(model, ids, first, block, (self.config.sink_size, native))
        return self._full(ids.shape[1], lambda: streaming_nll(model, ids, first, block, None))

    def answer(
        self,
        method: str,
        ids: torch.Tensor,
        settings: GenerationSettings,
        question: tuple[str, int, Any] | None = None,
    ) -> list | None:
        """Greedy answer tokens; `question` = (text, tokens before it, decode) for beacon-qa."""
        model, native, block = self.model, self.native, self.block
        if method == "beacon":
            return generate(model, ids, settings)
        if method == "beacon-qa":
            if question is None:
                raise ValueError("beacon-qa: needs the question")
            text, text_end, decode = question
            return planned_generate(model, ids, settings, text, decode, text_end)
        if method == "truncated":
            budget = max(native - settings.max_new_tokens, 1)
            return _greedy(model, middle_truncate(ids, budget), settings, block, None)
        if method == "sink":
            return _greedy(model, ids, settings, block, (self.config.sink_size, native))
        return self._full(ids.shape[1], lambda: _greedy(model, ids, settings, block, None))


def _eos_ids(model: BeaconForCausalLM, tokenizer) -> list[int]:
    ids = model.config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def run_perplexity(runner: _Runner, tokenizer, config: EvalConfig) -> dict[str, Any]:
    texts = read_texts(config.data, config.max_documents)
    if not texts:
        raise ValueError(f"data: no documents in {', '.join(config.data)}")
    documents = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    probe = tokenizer("test")["input_ids"]
    bos = tokenizer.bos_token_id if probe and probe[0] == tokenizer.bos_token_id else None
    results: dict[str, dict[str, float | None]] = {m: {} for m in config.methods}
    scored: dict[str, int] = {}
    device = runner.model.device
    for length in config.lengths:
        per_method: dict[str, list[tuple[float, int]] | None] = {m: [] for m in config.methods}
        chunks = [lm_chunks(ids, length, config.stride, bos) for ids in documents]
        total = sum(len(c) for c in chunks)
        bar = tqdm(total=total * len(config.methods), desc=f"perplexity {length}", disable=None)
        for document in chunks:
            sums = {m: [0.0, 0] for m in config.methods}
            for chunk, first in document:
                ids = torch.tensor([chunk], device=device)
                for method in config.methods:
                    value = None if per_method[method] is None else runner.nll(method, ids, first)
                    if value is None:
                        per_method[method] = None
                    else:
                        sums[method][0] += value[0]
                        sums[method][1] += value[1]
                    bar.update(1)
            for method in config.methods:
                if per_method[method] is not None:
                    per_method[method].append(tuple(sums[method]))
        bar.close()
        for method in config.methods:
            nlls = per_method[method]
            results[method][str(length)] = None if nlls is None else perplexity(nlls)
            if nlls is not None:
                count = sum(count for _, count in nlls)
                if scored.setdefault(str(length), count) != count:  # same tokens, or a bug
                    raise RuntimeError(f"perplexity: {method} scored {count} tokens, not {scored}")
    return {
        "lengths": config.lengths,
        "stride": config.stride,
        "documents": len(documents),
        "scored_tokens": scored,
        "perplexity": results,
    }


def run_retrieval(runner: _Runner, tokenizer, config: EvalConfig, task: str) -> dict[str, Any]:
    """Passkey or needle: greedy answers over lengths x depths, scored per method."""
    use_template = config.chat_template
    if use_template is None:
        use_template = bool(getattr(tokenizer, "chat_template", None))
    haystack = "\n\n".join(read_texts(config.haystack)) if config.haystack else ""
    if task == "needle":
        haystack = haystack or default_haystack()
    settings = GenerationSettings(
        max_new_tokens=config.max_new_tokens, eos_token_ids=_eos_ids(runner.model, tokenizer)
    )
    rng = np.random.default_rng(config.seed)
    metrics = ("accuracy", "fuzzy") if task == "passkey" else ("rouge_l_recall",)
    scores = {
        metric: {m: {str(n): {} for n in config.lengths} for m in config.methods}
        for metric in metrics
    }
    samples = []
    cells = [(n, d) for n in config.lengths for d in config.depths]
    for length, depth in tqdm(cells, desc=task, disable=None):
        values: dict[tuple[str, str], list[float]] = {}
        for _ in range(config.samples_per_cell):
            if task == "passkey":
                text, target = passkey_prompt(
                    tokenizer, length, depth, config.passkey_digits, rng, haystack
                )
            else:
                text = needle_prompt(
                    tokenizer, haystack, length, depth, config.needle, config.question
                )
                target = config.needle
            ids = _with_template(tokenizer, text, use_template).to(runner.model.device)
            question = None
            if "beacon-qa" in config.methods:
                asked = PASSKEY_QUESTION if task == "passkey" else config.question
                document = _with_template(tokenizer, text.removesuffix(asked), use_template)[0]
                text_end = _common_prefix(ids[0].tolist(), document.tolist())
                question = (asked, text_end, tokenizer.decode)
            for method in config.methods:
                tokens = runner.answer(method, ids, settings, question)
                output = (
                    None if tokens is None else tokenizer.decode(tokens, skip_special_tokens=True)
                )
                if output is None:  # full attention did not fit
                    found = dict.fromkeys(metrics)
                elif task == "passkey":
                    found = dict(zip(metrics, score_passkey(output, target), strict=True))
                else:
                    found = {"rouge_l_recall": score_needle(output, target)}
                for metric, value in found.items():
                    if value is not None:
                        values.setdefault((metric, method), []).append(value)
                samples.append(
                    {
                        "method": method,
                        "length": length,
                        "depth": depth,
                        "prompt_tokens": ids.shape[1],
                        "target": target.strip(),
                        "output": output,
                        **found,
                    }
                )
        for metric in metrics:
            for method in config.methods:
                found = values.get((metric, method))
                mean = sum(found) / len(found) if found else None
                scores[metric][method][str(length)][str(depth)] = mean
    return {"lengths": config.lengths, "depths": config.depths, **scores, "samples": samples}


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


def _grid(table: dict[str, dict[str, float | None]], lengths, depths) -> np.ndarray:
    grid = np.full((len(depths), len(lengths)), np.nan)
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            value = table[str(length)].get(str(depth))
            grid[i, j] = np.nan if value is None else value
    return grid


def format_tables(results: dict[str, Any]) -> str:
    """Plain-text tables: perplexity per method x length; retrieval means over depths."""
    lines = []

    def table(title: str, rows: dict[str, dict[str, float | None]], lengths, digits: int) -> None:
        lines.append(title)
        header = f"{'method':<10}" + "".join(f"{_short(n):>10}" for n in lengths)
        lines.append(header)
        for method, values in rows.items():
            cells = [values.get(str(n)) for n in lengths]
            text = ["n/a" if v is None or v != v else f"{v:.{digits}f}" for v in cells]
            lines.append(f"{method:<10}" + "".join(f"{t:>10}" for t in text))
        lines.append("")

    if "perplexity" in results:
        ppl = results["perplexity"]
        table("perplexity (lower is better)", ppl["perplexity"], ppl["lengths"], 3)
    for task, metric in (("passkey", "accuracy"), ("needle", "rouge_l_recall")):
        if task not in results:
            continue
        lengths, depths = results[task]["lengths"], results[task]["depths"]
        means = {}
        for method, per_length in results[task][metric].items():
            means[method] = {}
            for n in lengths:
                found = [v for v in per_length[str(n)].values() if v is not None]
                means[method][str(n)] = sum(found) / len(found) if found else None
        table(f"{task} {metric} (mean over {len(depths)} depths)", means, lengths, 2)
    return "\n".join(lines)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run the configured tasks for the beacon model and every baseline; write the results.

    Writes `results.json` and one heat map per retrieval task (`passkey.png`, `needle.png`)
    to `config.output_dir`, and returns the results.
    """
    from transformers import AutoTokenizer

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(config.dtype)
    overrides = {"beacon_ratio_mix": config.ratio_mix} if config.ratio_mix else {}
    model = load_beacon_model(
        config.model,
        device=device,
        dtype=dtype,
        attn_implementation=config.attn_implementation,
        **overrides,
    )
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(config.model))
    notes: list[str] = []
    runner = _Runner(model, config, notes)
    results: dict[str, Any] = {
        "model": str(config.model),
        "native_window": runner.native,
        "beacon": model.beacon_config.to_dict(),
        "config": dataclasses.asdict(config),
        "notes": notes,
    }
    with torch.no_grad():
        for task in config.tasks:
            if task == "perplexity":
                results[task] = run_perplexity(runner, tokenizer, config)
            else:
                results[task] = run_retrieval(runner, tokenizer, config, task)
                metric = "accuracy" if task == "passkey" else "rouge_l_recall"
                panels = {
                    method: _grid(table, config.lengths, config.depths)
                    for method, table in results[task][metric].items()
                }
                title = f"{task} {metric} ({Path(str(config.model)).name})"
                image = write_heatmap(
                    output_dir / f"{task}.png", panels, config.lengths, config.depths, title
                )
                results[task]["heatmap"] = str(image)
    with open(output_dir / "results.json", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    logger.info("wrote %s", output_dir / "results.json")
    return results


# ---------------------------------------------------------------------- CLI hooks
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `beacon-apps eval`."""
    defaults = EvalConfig(model="", tasks=["passkey"])
    parser.add_argument("--model", required=True, help="beacon checkpoint (hub id or folder)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["perplexity"])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(DEFAULT_METHODS),
        help="beacon-qa: the beacon at the same overall ratio, windows relevant to the question "
        "condensed least (passkey/needle; pin the ratio with --ratio-mix fixed-N to compare)",
    )
    parser.add_argument(
        "--lengths", nargs="+", type=int, default=defaults.lengths, help="context lengths"
    )
    parser.add_argument("--output-dir", type=Path, default=Path(defaults.output_dir))
    ppl = parser.add_argument_group("perplexity")
    ppl.add_argument("--data", nargs="+", default=[], help="text/JSONL ('text')/PDF files")
    ppl.add_argument(
        "--stride", type=int, default=defaults.stride, help="chunk start every N (0: one chunk)"
    )
    ppl.add_argument("--max-documents", type=int, default=defaults.max_documents)
    retrieval = parser.add_argument_group("passkey / needle")
    retrieval.add_argument("--depths", nargs="+", type=int, default=defaults.depths)
    retrieval.add_argument("--samples-per-cell", type=int, default=defaults.samples_per_cell)
    retrieval.add_argument(
        "--haystack",
        nargs="+",
        default=[],
        help="text files: the needle haystack; for passkey, real text around the key",
    )
    retrieval.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    retrieval.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None)
    retrieval.add_argument("--seed", type=int, default=defaults.seed)
    baselines = parser.add_argument_group("baselines")
    baselines.add_argument("--native-window", type=int, help="default: max_position_embeddings")
    baselines.add_argument("--sink-size", type=int, default=defaults.sink_size)
    baselines.add_argument("--stream-block", type=int, help="tokens per step (default N/8)")
    baselines.add_argument("--full-max-length", type=int, help="skip full attention above")
    run = parser.add_argument_group("model")
    run.add_argument(
        "--ratio-mix",
        default=defaults.ratio_mix,
        help="beacon_ratio_mix for evaluation ('keep': the checkpoint's)",
    )
    run.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    run.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa")


def run_eval(args: argparse.Namespace) -> int:
    """`beacon-apps eval`: evaluate, print the tables, write results.json and heat maps."""
    config = EvalConfig(
        model=args.model,
        tasks=list(args.tasks),
        methods=list(args.methods),
        lengths=list(args.lengths),
        output_dir=str(args.output_dir),
        data=list(args.data),
        stride=args.stride,
        max_documents=args.max_documents,
        depths=list(args.depths),
        samples_per_cell=args.samples_per_cell,
        haystack=list(args.haystack),
        max_new_tokens=args.max_new_tokens,
        chat_template=args.chat_template,
        seed=args.seed,
        native_window=args.native_window,
        sink_size=args.sink_size,
        stream_block=args.stream_block,
        full_max_length=args.full_max_length,
        ratio_mix=None if args.ratio_mix == "keep" else args.ratio_mix,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
    )
    results = evaluate(config)
    print(format_tables(results))
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"results: {Path(config.output_dir) / 'results.json'}")
    return 0


__all__ = [
    "EvalConfig",
    "adapt_ratio",
    "add_eval_arguments",
    "beacon_nll",
    "evaluate",
    "format_tables",
    "lm_chunks",
    "middle_truncate",
    "needle_prompt",
    "overall_ratio",
    "passkey_prompt",
    "perplexity",
    "planned_generate",
    "read_texts",
    "rouge_l_recall",
    "run_eval",
    "score_needle",
    "score_passkey",
    "stream_base_model",
    "streaming_nll",
    "truncated_nll",
    "write_heatmap",
    "write_png",
]
