"""Train the beacon of the small demo LLM (issue: miniature paper), on a CPU if need be.

    python scripts/train_demo_beacon.py prepare OUT         # fresh code for the beacon (CPU, 2 min)
    python scripts/train_demo_beacon.py train OUT [--resume] # OUT/beacon; resumable checkpoints
    python scripts/train_demo_beacon.py ship OUT             # bf16 copy into the package

OUT holds what `train_demo_base.py prepare/train` wrote (`base/`, `packages.json`, `valid.bin`).
`prepare` also writes `eval_docs/`: the base's held-out packages long enough for 64x chunks.
The base model saw its training packages ~17 times and knows them by heart, which leaves the beacon
nothing to learn from them; so the beacon trains on Python packages the base model never saw
(`beacon.bin`: installed libraries past the base corpus, minus the held-out tenth), and
evaluation uses the base's held-out packages (`valid.bin`), unseen by both. The recipe scales the paper's down to the 512-token base model:

- beacon window 128 (a quarter of the native window, as 1024 is of Llama-2's 4096), ratios
  {2, 4, 8, 16, 32} drawn per window (step-random), sequences of at most 4x the native window;
- 35 % compression-based auto-regression on unseen Python packages (the LM loss of every window
  after the first, predicted from the condensed earlier windows);
- 65 % "find the pass key" chats: a pass key hidden at a random depth of 0.5-4x native-window code,
  the question at the end and only the answer as target, so the beacon learns to keep such facts
  and the demo answers that question about any document.

Only the beacon trains (`beacon_apps.training.train`); checkpoints every `--save-steps` steps let a
run resume across sessions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))  # train_demo_base, beside this script

from beacon_apps.beacon.memory import IGNORE_INDEX  # noqa: E402
from beacon_apps.training import Sample, TrainConfig, encode_conversation, train  # noqa: E402

NATIVE_WINDOW = 512
FACT_SHARE = 0.65  # of training sequences; the rest is plain text (compression-based LM)
BEACON = {
    "beacon_window": 128,
    "beacon_stride": 128,
    "beacon_ratio": [2, 4, 8, 16, 32],
    "beacon_ratio_mix": "step-random",
    "beacon_param": ["q", "k", "v"],
    "beacon_pos": "interleave",
    "beacon_attn": "full-coverage",
}


def random_fact(rng: random.Random) -> tuple[str, str, str]:
    """(fact sentence, question, answer) with a fresh pass key: the one question format the base
    model learned to answer (it answers in-window perfectly; the beacon must carry the key across
    windows). Only beacon parameters train, so no new question formats can be taught here."""
    key = str(rng.randint(10000, 99999))
    question = rng.choice(["What is the pass key?", "What is the pass key in the document?"])
    return passkey_fact(key), question, f"The pass key is {key}."


def passkey_fact(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def code_haystack(code: np.ndarray, tokenizer, rng: random.Random, tokens: int) -> str:
    """`tokens` tokens of real code from a random place, as text."""
    start = rng.randrange(len(code) - tokens)
    return tokenizer.decode(code[start : start + tokens].tolist())


def hide(haystack: str, fact: str, depth: float) -> str:
    """The fact on a line of its own, at the line break before `depth` of the haystack's text."""
    cut = max(haystack.rfind("\n", 0, int(depth * len(haystack))), 0)
    return f"{haystack[:cut]}\n{fact}\n{haystack[cut:]}"


def fact_chat(
    code: np.ndarray, tokenizer, rng: random.Random, haystack_tokens: int
) -> tuple[list[int], list[int]]:
    """A chat whose document (real code) hides one fact at a random depth; only the answer is a
    target."""
    haystack = code_haystack(code, tokenizer, rng, haystack_tokens)
    fact, question, answer = random_fact(rng)
    document = hide(haystack, fact, rng.random())
    return encode_conversation(
        tokenizer,
        [
            {"role": "user", "content": f"{document}\n\n{question}"},
            {"role": "assistant", "content": answer},
        ],
    )


def prepare(out: Path, max_tokens: int = 8_000_000) -> None:
    """Write OUT/beacon.bin: packages neither in the base's corpus nor held out for evaluation."""
    from train_demo_base import held_out, source_packages

    known = json.loads((out / "packages.json").read_text())
    seen = set(known["train"]) | set(known["valid"])
    fresh = {
        name: text
        for name, text in source_packages(max_chars=10**12).items()
        if name not in seen and not held_out(name)
    }
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    eot = tokenizer.pad_token_id
    ids: list[int] = []
    used = []
    for name in sorted(fresh, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        ids.extend(tokenizer.encode(fresh[name], add_special_tokens=False))
        ids.append(eot)
        used.append(name)
        if len(ids) >= max_tokens:
            break
    np.array(ids, dtype=np.uint16).tofile(out / "beacon.bin")
    (out / "beacon_packages.json").write_text(json.dumps(sorted(used), indent=1))
    print(f"beacon.bin: {len(used)} unseen packages, {len(ids):,} tokens")
    write_eval_documents(out)


def write_eval_documents(out: Path, min_tokens: int = 64 * NATIVE_WINDOW + 64) -> None:
    """OUT/eval_docs/*.txt: the held-out packages long enough for a 64x-native-window chunk."""
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    names = json.loads((out / "packages.json").read_text())["valid"]  # valid.bin's order
    ids = np.fromfile(out / "valid.bin", dtype=np.uint16)
    ends = np.flatnonzero(ids == tokenizer.pad_token_id)
    folder = out / "eval_docs"
    folder.mkdir(exist_ok=True)
    for name, start, end in zip(names, [-1, *ends[:-1]], ends, strict=True):
        if end - start - 1 >= min_tokens:
            text = tokenizer.decode(ids[start + 1 : end].tolist())
            (folder / (name.replace(":", "_").replace("/", "_") + ".txt")).write_text(text)
    print(f"{folder}: {len(list(folder.iterdir()))} held-out packages of >= {min_tokens} tokens")


def build_samples(out: Path, tokenizer, count: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    code = np.fromfile(out / "beacon.bin", dtype=np.uint16)
    samples = []
    for number in range(count):
        if rng.random() < FACT_SHARE:
            length = rng.randint(NATIVE_WINDOW // 2, 4 * NATIVE_WINDOW - 64)
            ids, labels = fact_chat(code, tokenizer, rng, length)
            ids, labels = ids[-4 * NATIVE_WINDOW :], labels[-4 * NATIVE_WINDOW :]
            samples.append(
                Sample(np.asarray(ids, np.int32), np.asarray(labels, np.int32), f"fact#{number}")
            )
        else:
            start = rng.randrange(len(code) - 4 * NATIVE_WINDOW)
            ids = code[start : start + 4 * NATIVE_WINDOW].astype(np.int32)
            samples.append(Sample(ids, None, f"beacon.bin@{start}"))
    assert all((s.labels is None) or (s.labels != IGNORE_INDEX).any() for s in samples)
    return samples


def ship(out: Path, destination: Path, checkpoint: Path | None = None) -> None:
    """The trained model (or `checkpoint`) in bfloat16 (half the bytes; CPUs compute in float32
    from it) in the package, with the model card kept beside it."""
    import torch

    from beacon_apps.beacon import load_beacon_model, save_beacon_model

    source = checkpoint or out / "beacon"
    model = load_beacon_model(source, device="cpu", dtype=torch.float32).to(torch.bfloat16)
    save_beacon_model(model, destination)
    AutoTokenizer.from_pretrained(source).save_pretrained(destination)
    generation = next(
        (
            d / "generation_config.json"
            for d in (source, out / "base")
            if (d / "generation_config.json").is_file()
        ),
        None,
    )
    if generation:
        (destination / generation.name).write_bytes(generation.read_bytes())
    size = sum(f.stat().st_size for f in destination.iterdir()) / 2**20
    print(f"{destination}: {size:.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["prepare", "train", "ship"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps in all")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--raw-last-window",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep each sequence's last window raw (the reference's rule); default: interleave "
        "beacons there too, as inference does, so answers are learnt the way they are asked",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint", type=Path, help="ship: this checkpoint, not the final model"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "prepare":
        prepare(args.out)
        return 0
    if args.command == "ship":
        from beacon_apps.default_model import DEMO_MODEL_DIR

        ship(args.out, DEMO_MODEL_DIR, args.checkpoint)
        return 0

    tokenizer = AutoTokenizer.from_pretrained(args.out / "base")
    samples = build_samples(args.out, tokenizer, args.steps * args.grad_accum, args.seed)
    config = TrainConfig(
        model=str(args.out / "base"),
        data=[],
        output_dir=str(args.out / "beacon"),
        **BEACON,
        inference_ratio_mix="adapt-128",
        raw_last_window=args.raw_last_window,
        max_length=4 * NATIVE_WINDOW,
        group_by_windows="none",
        max_steps=args.steps,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_schedule="cosine",
        warmup_steps=50,
        save_steps=args.save_steps,
        log_steps=10,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
    )
    train(config, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
