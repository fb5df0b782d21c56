"""Train the beacon of a frozen LLM, the way the reference (FlagEmbedding's Activation Beacon) does.

Objective: compression-based auto-regression. Each training sequence is read window by window
through the beacon memory; every window after the first is predicted from the condensed beacon
activations of the earlier windows, and the next-token loss flows back through those activations
into the beacon parameters. The core computes this loss (`BeaconForCausalLM(ids, labels=...)`,
method notes §7); this module adds data, batching, optimisation and checkpoints around it.

Only the beacon parameters train (`freeze_base_model`), so the LLM stays exactly as released and a
beacon checkpoint behaves like the base model on short inputs.

`train()` below is the whole loop, nanoGPT style; the helpers above it load data, plan batches
and save/restore state. Python API: `train(TrainConfig(...))`; CLI: `beacon-apps train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .beacon import BeaconForCausalLM, load_beacon_model, resolve_model_dir, save_beacon_model
from .beacon.memory import IGNORE_INDEX

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc")
JSON_SUFFIXES = (".jsonl", ".json")
# Training state lives in a subfolder, so a checkpoint folder stays a plain released-format model
# (loaders read every *.safetensors beside config.json).
STATE_FILE = "training_state/state.json"  # written last: a checkpoint without it is incomplete
OPTIMIZER_FILE = "training_state/optimizer.safetensors"
LOG_FILE = "train_log.jsonl"
SCHEDULES = ("linear", "cosine", "constant")
GROUPINGS = ("strict", "relaxed", "none")
BEACON_FIELDS = (
    "beacon_window",
    "beacon_stride",
    "beacon_ratio",
    "beacon_ratio_mix",
    "beacon_param",
    "beacon_pos",
    "beacon_attn",
    "beacon_sink_size",
    "beacon_attend_prev",
)


@dataclass
class TrainConfig:
    """One training run. Defaults follow the reference (its `ModelArgs`/`TrainingArgs` and the
    Hugging Face Trainer defaults it ran with); `docs/training.md` gives the released recipes."""

    model: str  # base model (hub id or folder) or a beacon checkpoint to continue from
    data: list[str]  # JSONL/JSON, text or PDF files, or folders; "file.jsonl[5000]" samples 5000
    output_dir: str
    # Beacon settings, stored in the checkpoint's config.json. None keeps the model's own values
    # (for a base model: the released Qwen2 recipe, see checkpoint.BASE_MODEL_BEACON_DEFAULTS).
    beacon_window: int | None = None
    beacon_stride: int | None = None
    beacon_ratio: list[int] | None = None
    beacon_ratio_mix: str = "step-random"  # ratio per window; "instance-random": per sequence
    beacon_param: list[str] | None = None
    beacon_pos: str | None = None
    beacon_attn: str | None = None
    beacon_sink_size: int | None = None
    beacon_attend_prev: bool | None = None
    inference_ratio_mix: str = "adapt-1024"  # written to saved checkpoints (how the model is used)
    # The reference never condenses a sequence's last window. In interleave mode inference does
    # put beacons among the last window's tokens (the question, the answer being written), so
    # answers learnt without them are read differently at inference; False trains that case.
    raw_last_window: bool = True
    # data
    min_length: int = 0  # tokens; shorter samples are dropped
    max_length: int = 4096  # tokens; longer texts are truncated (files: cut into pieces)
    group_by_windows: str = "strict"  # sequences of one optimizer step share a window count
    chat_template: str | None = None  # Jinja template (or a file holding one) for conversations
    # optimisation (AdamW on the beacon parameters only)
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    gradient_accumulation_steps: int = 1  # sequences per optimizer step (one forward each)
    learning_rate: float = 5e-5
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    # machinery
    device: str | None = None  # default: cuda if present, else cpu
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    gradient_checkpointing: bool | None = None  # default: on for CUDA
    attn_implementation: str = "sdpa"
    save_steps: int = 500
    save_total_limit: int | None = 2  # intermediate checkpoints kept (None: all)
    log_steps: int = 10
    seed: int = 42
    resume: bool | str = False  # True: latest checkpoint in output_dir; or a checkpoint folder

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        self.adam_betas = tuple(self.adam_betas)
        checks = {
            "max_length": self.max_length > 0,
            "min_length": 0 <= self.min_length <= self.max_length,
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "learning_rate": self.learning_rate > 0,
            "lr_schedule": self.lr_schedule in SCHEDULES,
            "warmup_steps": self.warmup_steps >= 0,
            "group_by_windows": self.group_by_windows in GROUPINGS,
            "dtype": self.dtype in ("auto", "float32", "bfloat16"),
            "save_steps": self.save_steps >= 1,
            "log_steps": self.log_steps >= 1,
            "save_total_limit": self.save_total_limit is None or self.save_total_limit >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")

    def beacon_overrides(self) -> dict[str, Any]:
        """The beacon settings to apply on top of the model's config.json (None = keep)."""
        values = {name: getattr(self, name) for name in BEACON_FIELDS}
        return {name: value for name, value in values.items() if value is not None}


# ---------------------------------------------------------------------- data
@dataclass
class Sample:
    """One training sequence. `labels is None` means every token is a target (plain text)."""

    input_ids: np.ndarray  # int32 [n]: numpy keeps a billion tokens affordable, lists do not
    labels: np.ndarray | None
    source: str  # "file:line" or "file#piece", for error messages

    def __len__(self) -> int:
        return len(self.input_ids)


def _finish_text(ids: list[int], tokenizer, max_length: int) -> list[int]:
    """The reference's rule for `text` samples: truncate at max_length, else end with eos."""
    if len(ids) >= max_length:
        return ids[:max_length]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids, eos]
    return ids


def encode_conversation(
    tokenizer, messages: list[dict[str, str]], chat_template: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a chat in the model's chat template, and labels on assistant turns only.

    Each assistant turn's characters are found by rendering the conversation up to that turn
    (with and without the turn), so any template works that renders a prefix of the chat as a
    prefix of the text; the loss then covers exactly what the model must learn to say (the
    answer and its end-of-turn token), never the user's words or the template's markup.
    """
    if messages and messages[0].get("role") not in ("user", "system"):
        messages = messages[1:]  # as the reference: a chat must not open with the answer
    for message in messages:
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise ValueError("conversations: every message needs 'role' and 'content'")

    def render(part: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            part,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=chat_template,
        )

    text = render(messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[: k + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "conversations: the chat template does not render a conversation's prefix as a "
                "prefix of its text, so assistant turns cannot be located; give --chat-template"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def read_json_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a JSON-lines file, or of a file holding one JSON array."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(1 << 16).lstrip()
        handle.seek(0)
        if head.startswith("["):
            yield from enumerate(json.load(handle), start=1)
            return
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None


def _read_file(
    path: Path, tokenizer, min_length: int, max_length: int, chat_template: str | None
) -> list[Sample]:
    """Samples from one file: JSON rows (`text` or `conversations`), or a whole text/PDF file."""
    samples = []
    if path.suffix.lower() in JSON_SUFFIXES:
        for number, row in read_json_rows(path):
            where = f"{path}:{number}"
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                ids = tokenizer(row["text"])["input_ids"]
                if len(ids) >= max(min_length, 1):
                    ids = _finish_text(ids, tokenizer, max_length)
                    samples.append(Sample(np.asarray(ids, np.int32), None, where))
            elif isinstance(row, dict) and isinstance(row.get("conversations"), list):
                try:
                    ids, labels = encode_conversation(
                        tokenizer, row["conversations"], chat_template
                    )
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
                # as the reference: chats are dropped, never truncated (the answer is at the end)
                if min_length <= len(ids) <= max_length and any(x != IGNORE_INDEX for x in labels):
                    samples.append(
                        Sample(np.asarray(ids, np.int32), np.asarray(labels, np.int32), where)
                    )
            else:
                raise ValueError(f"{where}: expected an object with 'text' or 'conversations'")
        return samples
    if path.suffix.lower() == ".pdf":
        from .documents import load_document  # another module's dependency: only when needed

        text = load_document(path).text()
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    # A book is far longer than one sample: cut it into max_length pieces instead of truncating.
    ids = tokenizer(text)["input_ids"]
    for number, start in enumerate(range(0, len(ids), max_length)):
        piece = ids[start : start + max_length]
        if len(piece) >= max(min_length, 1):
            piece = _finish_text(piece, tokenizer, max_length)
            samples.append(Sample(np.asarray(piece, np.int32), None, f"{path}#{number}"))
    return samples


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        suffixes = (*JSON_SUFFIXES, *TEXT_SUFFIXES, ".pdf")
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not path.is_file():
        raise ValueError(f"data: {path} does not exist")
    return [path]


def load_samples(
    paths: Sequence[str | os.PathLike],
    tokenizer,
    *,
    min_length: int = 0,
    max_length: int = 4096,
    seed: int = 42,
    chat_template: str | None = None,
) -> list[Sample]:
    """Tokenise training data as the reference's `Data.prepare_train_data` does.

    JSON/JSONL rows with `text`: kept if at least `min_length` tokens, truncated to `max_length`
    (else an eos is appended). Rows with `conversations` (`role`/`content` messages): the chat
    template, loss on assistant turns only, dropped outside [min_length, max_length]. Text and PDF
    files (and folders of them): cut into `max_length` pieces. A `[N]` suffix on a path keeps a
    seeded random N of its samples.
    """
    samples: list[Sample] = []
    for spec in paths:
        match = re.fullmatch(r"(.*)\[(\d+)\]", str(spec))
        path, limit = (Path(match.group(1)), int(match.group(2))) if match else (Path(spec), None)
        found: list[Sample] = []
        files = _expand(path)
        for file in tqdm(
            files, desc=f"reading {path.name}", unit="file", disable=None, leave=False
        ):
            found += _read_file(file, tokenizer, min_length, max_length, chat_template)
        if limit is not None and len(found) > limit:
            keep = sorted(random.Random(seed).sample(range(len(found)), limit))
            found = [found[i] for i in keep]
        logger.info("%s: %d samples, %d tokens", spec, len(found), sum(map(len, found)))
        samples += found
    if not samples:
        raise ValueError(
            f"data: no sample between min_length={min_length} and max_length={max_length} tokens "
            f"in {', '.join(map(str, paths))}"
        )
    return samples


def num_windows(length: int, window: int, stride: int) -> int:
    """Forward passes the memory needs for a sequence (the reference's grouping key)."""
    return max(math.ceil((length - window) / stride) + 1, 1)


def plan_batches(
    lengths: Sequence[int],
    window: int,
    stride: int,
    group_size: int,
    grouping: str,
    seed: int,
) -> list[list[int]]:
    """Sample indices for each optimizer step of one epoch (the reference's StrideGroupedSampler).

    Sequences are shuffled, sorted by window count and cut into groups of `group_size`, so one
    step's sequences cost the same. `strict` drops groups that would mix window counts,
    `relaxed` lets the leftovers mix, `none` is a plain shuffle. Groups are then shuffled.
    Deterministic in `seed`, so a resumed run sees the same batches.
    """
    rng = random.Random(seed)
    if grouping == "none":
        order = list(range(len(lengths)))
        rng.shuffle(order)
        return [order[i : i + group_size] for i in range(0, len(order), group_size)]
    pairs = [(i, num_windows(n, window, stride)) for i, n in enumerate(lengths)]
    rng.shuffle(pairs)
    pairs.sort(key=lambda pair: pair[1])
    batches, batch, previous = [], [], None
    for index, windows in pairs:
        if windows != previous and grouping == "strict":
            batch = []
        batch.append(index)
        previous = windows
        if len(batch) == group_size:
            batches.append(batch)
            batch = []
    if batch and grouping == "relaxed":
        batches.append(batch)
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------- optimisation
def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate of update `step` (0-based): Hugging Face's warmup + decay schedules."""
    warmup = config.warmup_steps
    if step < warmup:
        return config.learning_rate * step / max(1, warmup)
    if config.lr_schedule == "constant":
        return config.learning_rate
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.lr_schedule == "cosine":
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate * max(0.0, 1.0 - progress)


def sequence_loss(model: BeaconForCausalLM, sample: Sample) -> torch.Tensor | None:
    """Mean next-token loss of one sequence read through a fresh memory (None: no target).

    The memory applies the reference's rules: the first window's labels are masked (except
    interleave + full-coverage) and the last window is never condensed.
    """
    model.memory.reset()
    ids = torch.as_tensor(sample.input_ids, dtype=torch.long, device=model.device)[None]
    labels = ids if sample.labels is None else torch.as_tensor(sample.labels, dtype=torch.long)
    output = model(ids, labels=labels.to(model.device).view_as(ids))
    return output.loss if output.num_label_tokens else None


def _master_weights(parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """float32 copies of low-precision parameters for the optimizer (as DeepSpeed's bf16 mode).

    Updates of lr 1e-5 vanish in bfloat16 weights; AdamW steps the float32 copies, which are
    copied back into the model after each step. float32 parameters are their own master copy.
    """
    return [
        p
        if p.dtype == torch.float32
        else torch.nn.Parameter(p.detach().float().clone(), requires_grad=True)
        for p in parameters
    ]


def _optimizer_step(optimizer, parameters, masters, max_grad_norm: float) -> float:
    """Clip, step and zero the gradients; returns the gradient norm before clipping."""
    for parameter, master in zip(parameters, masters, strict=True):
        if master is not parameter:
            master.grad = None if parameter.grad is None else parameter.grad.float()
            parameter.grad = None
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(masters, limit)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for parameter, master in zip(parameters, masters, strict=True):
            if master is not parameter:
                parameter.copy_(master)
    return float(norm)


# ---------------------------------------------------------------------- checkpoints
def _save_model(model: BeaconForCausalLM, tokenizer, directory: Path, ratio_mix: str) -> None:
    """The released format (config.json + model.safetensors) + tokenizer, ready for inference.

    The saved `beacon_ratio_mix` is the inference one: a random ratio per window is a training
    device, not what a user wants when reading a document.
    """
    training_config = model.beacon_config
    model.beacon_config = training_config.replace(beacon_ratio_mix=ratio_mix)
    try:
        save_beacon_model(model, directory)
    finally:
        model.beacon_config = training_config
    tokenizer.save_pretrained(directory)


def save_checkpoint(
    directory: Path,
    model: BeaconForCausalLM,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    masters: list[torch.Tensor],
    step: int,
    config: TrainConfig,
) -> Path:
    """A released-format model plus everything needed to continue: optimizer moments, float32
    master weights, random states and the step (safetensors + JSON; nothing is pickled)."""
    _save_model(model, tokenizer, directory, config.inference_ratio_mix)
    parameters = [p for _, p in model.beacon_parameters()]
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for i, (parameter, master) in enumerate(zip(parameters, masters, strict=True)):
        for key, value in optimizer.state.get(master, {}).items():
            tensors[f"optimizer.{i}.{key}"] = value.detach().cpu().contiguous()
        if master is not parameter:
            tensors[f"master.{i}"] = master.detach().cpu().contiguous()
    (directory / OPTIMIZER_FILE).parent.mkdir(exist_ok=True)
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    state = {
        "step": step,
        "parameters": [name for name, _ in model.beacon_parameters()],
        "memory_rng": model.memory.rng.bit_generator.state,
        "config": dataclasses.asdict(config),
    }
    staging = (directory / STATE_FILE).with_suffix(".tmp")
    staging.write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
    os.replace(staging, directory / STATE_FILE)  # last: marks the checkpoint complete
    return directory


def load_checkpoint_state(
    directory: Path,
    model: BeaconForCausalLM,
    optimizer: torch.optim.Optimizer,
    masters: list[torch.Tensor],
) -> int:
    """Restore what `save_checkpoint` wrote (the model weights are loaded by the caller)."""
    state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    names = [name for name, _ in model.beacon_parameters()]
    if state["parameters"] != names:
        raise ValueError(f"resume: {directory} was written for other beacon parameters")
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    with torch.no_grad():
        for i, master in enumerate(masters):
            if f"master.{i}" in tensors:
                master.copy_(tensors[f"master.{i}"])
    saved = optimizer.state_dict()
    for i in range(len(masters)):
        entries = {
            key.split(".", 2)[2]: value
            for key, value in tensors.items()
            if key.startswith(f"optimizer.{i}.")
        }
        if entries:
            saved["state"][i] = entries
    optimizer.load_state_dict(saved)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    model.memory.rng.bit_generator.state = state["memory_rng"]
    return int(state["step"])


def _warn_if_changed(directory: Path, config: TrainConfig) -> None:
    """A resumed run only reproduces the uninterrupted one with the same settings."""
    saved = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))["config"]
    current = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    ignored = {"resume", "device", "save_steps", "save_total_limit", "log_steps", "output_dir"}
    changed = sorted(k for k in current if k not in ignored and saved.get(k) != current[k])
    if changed:
        logger.warning("resume: settings differ from %s: %s", directory, ", ".join(changed))


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _resume_from(config: TrainConfig) -> Path | None:
    if config.resume is False or config.resume is None:
        return None
    if config.resume is True:
        found = _checkpoints(Path(config.output_dir))
        if not found:
            logger.warning("resume: no checkpoint in %s; starting from step 0", config.output_dir)
            return None
        return found[-1]
    directory = Path(config.resume)
    if not (directory / STATE_FILE).is_file():
        raise ValueError(f"resume: {directory} is not a complete training checkpoint")
    return directory


# ---------------------------------------------------------------------- the loop
def train(config: TrainConfig, samples: Sequence[Sample] | None = None) -> Path:
    """Train the beacon parameters of `config.model` and return the folder of the final model.

    The final model (released format + tokenizer) is written to `config.output_dir`;
    intermediate checkpoints to `output_dir/checkpoint-STEP` every `save_steps` steps.
    `samples` replaces reading `config.data` (already tokenised data, e.g. a synthetic task).
    """
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_dir = _resume_from(config)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(config.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(resume_dir or config.model))
    model = load_beacon_model(
        resume_dir or config.model,
        device=device,
        dtype=dtype,
        attn_implementation=config.attn_implementation,
        **config.beacon_overrides(),
    )
    model.freeze_base_model()
    model.train()
    if config.gradient_checkpointing or (
        config.gradient_checkpointing is None and device.type == "cuda"
    ):
        model.gradient_checkpointing_enable()
    model.memory.rng = np.random.default_rng(config.seed)  # ratio draws: reproducible per seed
    model.memory.raw_last_window = config.raw_last_window

    chat_template = config.chat_template
    if chat_template and Path(chat_template).is_file():
        chat_template = Path(chat_template).read_text(encoding="utf-8")
    if samples is None:
        samples = load_samples(
            config.data,
            tokenizer,
            min_length=config.min_length,
            max_length=config.max_length,
            seed=config.seed,
            chat_template=chat_template,
        )
    beacon = model.beacon_config
    lengths = [len(sample) for sample in samples]

    def epoch_plan(epoch: int) -> list[list[int]]:
        return plan_batches(
            lengths,
            beacon.beacon_window,
            beacon.beacon_stride,
            config.gradient_accumulation_steps,
            config.group_by_windows,
            config.seed + epoch,
        )

    steps_per_epoch = len(epoch_plan(0))
    if steps_per_epoch == 0:
        raise ValueError(
            f"data: no group of {config.gradient_accumulation_steps} sequences with the same "
            "number of windows; lower --grad-accum or use --group-by-windows relaxed"
        )
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    parameters = [p for _, p in model.beacon_parameters()]
    masters = _master_weights(parameters)
    optimizer = torch.optim.AdamW(
        masters,
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    step = 0
    if resume_dir:
        step = load_checkpoint_state(resume_dir, model, optimizer, masters)
        _warn_if_changed(resume_dir, config)
    logger.info(
        "training %d beacon parameters (%d tensors) on %d sequences (%d tokens): %d steps of %d "
        "sequences, %s %s, beacon window %d, ratios %s (%s)%s",
        sum(p.numel() for p in parameters),
        len(parameters),
        len(samples),
        sum(lengths),
        total_steps,
        config.gradient_accumulation_steps,
        device,
        str(dtype).replace("torch.", ""),
        beacon.beacon_window,
        beacon.beacon_ratio,
        beacon.beacon_ratio_mix,
        f", resuming at step {step} from {resume_dir}" if resume_dir else "",
    )

    plan_epoch, plan = -1, []
    progress = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=None)
    started, tokens_seen, log_losses = time.monotonic(), 0, []
    while step < total_steps:
        if step // steps_per_epoch != plan_epoch:
            plan_epoch = step // steps_per_epoch
            plan = epoch_plan(plan_epoch)
        batch = [samples[i] for i in plan[step % steps_per_epoch]]
        lr = learning_rate(step, total_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        losses = []
        for sample in batch:  # gradient accumulation: one sequence per forward (no padding)
            loss = sequence_loss(model, sample)
            if loss is None:  # every target fell in the (masked) first window
                continue
            (loss / len(batch)).backward()
            losses.append(loss.item())
            tokens_seen += len(sample)
        grad_norm = _optimizer_step(optimizer, parameters, masters, config.max_grad_norm)
        step += 1

        loss = sum(losses) / len(losses) if losses else float("nan")
        log_losses.append(loss)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % config.log_steps == 0 or step == total_steps:
            record = {
                "step": step,
                "loss": sum(log_losses) / len(log_losses),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_second": tokens_seen / (time.monotonic() - started),
            }
            logger.info(
                "step %d/%d loss %.4f lr %.3g grad-norm %.3g %.0f tok/s",
                step,
                total_steps,
                record["loss"],
                lr,
                grad_norm,
                record["tokens_per_second"],
            )
            with open(output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            log_losses = []
        if step % config.save_steps == 0 and step < total_steps:
            directory = output_dir / f"checkpoint-{step}"
            save_checkpoint(directory, model, tokenizer, optimizer, masters, step, config)
            logger.info("saved %s", directory)
            if config.save_total_limit:
                for old in _checkpoints(output_dir)[: -config.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
    progress.close()

    model.eval()
    _save_model(model, tokenizer, output_dir, config.inference_ratio_mix)
    generation_config = resolve_model_dir(config.model) / "generation_config.json"
    if generation_config.is_file():
        shutil.copyfile(generation_config, output_dir / "generation_config.json")
    logger.info("saved the trained beacon model to %s", output_dir)
    return output_dir


# ---------------------------------------------------------------------- CLI hooks
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `beacon-apps train` (one per TrainConfig field)."""
    defaults = TrainConfig(model="", data=["-"], output_dir="")
    parser.add_argument("--model", required=True, help="base model or beacon checkpoint")
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="JSONL/JSON ('text' or 'conversations'), text or PDF files, or folders; "
        "FILE[N] keeps N random samples",
    )
    parser.add_argument("--output-dir", required=True, type=Path)

    beacon = parser.add_argument_group("beacon (default: the model's own settings)")
    beacon.add_argument("--window", type=int, help="beacon_window: raw tokens per window")
    beacon.add_argument("--stride", type=int, help="beacon_stride (default: the window)")
    beacon.add_argument("--ratios", type=int, nargs="+", help="compression ratios, e.g. 2 4 8")
    beacon.add_argument(
        "--ratio-mix",
        default=defaults.beacon_ratio_mix,
        choices=["step-random", "instance-random"],
        help="draw a ratio per window (step-random) or per sequence",
    )
    beacon.add_argument("--beacon-param", nargs="+", choices=["q", "k", "v", "o"])
    beacon.add_argument("--beacon-pos", choices=["interleave", "append"])
    beacon.add_argument(
        "--beacon-attn", choices=["full-coverage", "step-expansion", "segmentation"]
    )
    beacon.add_argument("--sink-size", type=int, help="beacon_sink_size (Llama-3: 1)")
    beacon.add_argument("--attend-prev", action=argparse.BooleanOptionalAction, default=None)
    beacon.add_argument(
        "--raw-last-window",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep each sequence's last window raw (the reference); --no-raw-last-window puts "
        "beacons there too, as interleave-mode inference does",
    )
    beacon.add_argument(
        "--inference-ratio-mix",
        default=defaults.inference_ratio_mix,
        help="beacon_ratio_mix written to the saved checkpoints",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--min-length", type=int, default=defaults.min_length)
    data.add_argument("--max-length", type=int, default=defaults.max_length)
    data.add_argument("--group-by-windows", choices=GROUPINGS, default=defaults.group_by_windows)
    data.add_argument("--chat-template", help="Jinja chat template file for conversations")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=defaults.epochs)
    optim.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    optim.add_argument(
        "--grad-accum",
        type=int,
        default=defaults.gradient_accumulation_steps,
        help="sequences per optimizer step",
    )
    optim.add_argument("--lr", type=float, default=defaults.learning_rate)
    optim.add_argument("--schedule", choices=SCHEDULES, default=defaults.lr_schedule)
    optim.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    optim.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)

    run = parser.add_argument_group("run")
    run.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    run.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute layers in backward (default: on for CUDA)",
    )
    run.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa")
    run.add_argument("--save-steps", type=int, default=defaults.save_steps)
    run.add_argument("--save-total-limit", type=int, default=defaults.save_total_limit)
    run.add_argument("--log-steps", type=int, default=defaults.log_steps)
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --output-dir (or from CHECKPOINT)",
    )


def run_train(args: argparse.Namespace) -> int:
    """`beacon-apps train`: build a TrainConfig from the options and train."""
    config = TrainConfig(
        model=args.model,
        data=list(args.data),
        output_dir=str(args.output_dir),
        beacon_window=args.window,
        beacon_stride=args.stride or args.window,
        beacon_ratio=args.ratios,
        beacon_ratio_mix=args.ratio_mix,
        beacon_param=args.beacon_param,
        beacon_pos=args.beacon_pos,
        beacon_attn=args.beacon_attn,
        beacon_sink_size=args.sink_size,
        beacon_attend_prev=args.attend_prev,
        inference_ratio_mix=args.inference_ratio_mix,
        raw_last_window=args.raw_last_window,
        min_length=args.min_length,
        max_length=args.max_length,
        group_by_windows=args.group_by_windows,
        chat_template=args.chat_template,
        epochs=args.epochs,
        max_steps=args.max_steps,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        device=args.device,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        log_steps=args.log_steps,
        seed=args.seed,
        resume=args.resume,
    )
    print(train(config))
    return 0


__all__ = [
    "Sample",
    "TrainConfig",
    "add_train_arguments",
    "encode_conversation",
    "learning_rate",
    "load_samples",
    "num_windows",
    "plan_batches",
    "read_json_rows",
    "run_train",
    "save_checkpoint",
    "sequence_loss",
    "train",
]
