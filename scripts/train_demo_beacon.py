"""Train the beacon of the small demo LLM (issue: miniature paper), on a CPU if need be.

    python scripts/train_demo_beacon.py OUT --minutes 90          # OUT as for train_demo_base.py
    python scripts/train_demo_beacon.py OUT --minutes 90 --resume # continue from the last checkpoint

OUT holds what `train_demo_base.py prepare/train` wrote (`base/`, `train.bin`, `tokenizer/`); the
beacon lands in `OUT/beacon`. The recipe scales the paper's down to the 512-token base model:

- beacon window 128 (a quarter of the native window, as 1024 is of Llama-2's 4096), ratios
  {2, 4, 8, 16, 32} drawn per window (step-random), sequences of at most 4x the native window;
- 75 % compression-based auto-regression on held-in Python packages (the LM loss of every window
  after the first, predicted from the condensed earlier windows);
- 25 % "find the fact" chats: a fact (a pass key, or "The <thing> is <value>.") hidden at a random
  depth of 0.5-4x native-window code, the question at the end and only the answer as target, so the
  beacon learns to keep facts and the demo answers such questions about a document.

Only the beacon trains (`beacon_apps.training.train`); checkpoints every `--save-steps` steps let a
run resume across sessions.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from beacon_apps.beacon.memory import IGNORE_INDEX
from beacon_apps.training import Sample, TrainConfig, encode_conversation, train

NATIVE_WINDOW = 512
BEACON = {
    "beacon_window": 128,
    "beacon_stride": 128,
    "beacon_ratio": [2, 4, 8, 16, 32],
    "beacon_ratio_mix": "step-random",
    "beacon_param": ["q", "k", "v"],
    "beacon_pos": "interleave",
    "beacon_attn": "full-coverage",
}
THINGS = [
    "secret word", "project code name", "server port", "release date", "lucky number",
    "favourite colour", "meeting room", "backup host", "launch code", "owner's name",
    "build number", "magic number", "access code", "capital city", "team name",
]  # fmt: skip
WORDS = [
    "orange", "falcon", "granite", "velvet", "harbor", "maple", "cobalt", "ember", "lantern",
    "meadow", "quartz", "saffron", "tundra", "willow", "zephyr", "atlas", "breeze", "cedar",
    "delta", "echo", "fjord", "garnet", "helix", "iris", "juniper", "kestrel", "lotus", "mosaic",
]  # fmt: skip


def random_fact(rng: random.Random) -> tuple[str, str, str]:
    """(fact sentence, question, answer) with a fresh random value."""
    if rng.random() < 0.5:
        key = str(rng.randint(10000, 99999))
        fact = f"The pass key is {key}. Remember it. {key} is the pass key."
        return fact, "What is the pass key?", f"The pass key is {key}."
    thing = rng.choice(THINGS)
    value = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(100, 99999))
    return f"The {thing} is {value}.", f"What is the {thing}?", f"The {thing} is {value}."


def fact_chat(
    code: np.ndarray, tokenizer, rng: random.Random, haystack_tokens: int
) -> tuple[list[int], list[int]]:
    """A chat whose document (real code) hides one fact at a random depth; only the answer is a
    target."""
    start = rng.randrange(len(code) - haystack_tokens)
    haystack = tokenizer.decode(code[start : start + haystack_tokens].tolist())
    fact, question, answer = random_fact(rng)
    cut = haystack.rfind("\n", 0, int(rng.random() * len(haystack)))
    cut = max(cut, 0)
    document = f"{haystack[:cut]}\n{fact}\n{haystack[cut:]}"
    return encode_conversation(
        tokenizer,
        [
            {"role": "user", "content": f"{document}\n\n{question}"},
            {"role": "assistant", "content": answer},
        ],
    )


def build_samples(out: Path, tokenizer, count: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    code = np.fromfile(out / "train.bin", dtype=np.uint16)
    samples = []
    for number in range(count):
        if rng.random() < 0.25:
            length = rng.randint(NATIVE_WINDOW // 2, 4 * NATIVE_WINDOW - 64)
            ids, labels = fact_chat(code, tokenizer, rng, length)
            ids, labels = ids[-4 * NATIVE_WINDOW :], labels[-4 * NATIVE_WINDOW :]
            samples.append(
                Sample(np.asarray(ids, np.int32), np.asarray(labels, np.int32), f"fact#{number}")
            )
        else:
            start = rng.randrange(len(code) - 4 * NATIVE_WINDOW)
            ids = code[start : start + 4 * NATIVE_WINDOW].astype(np.int32)
            samples.append(Sample(ids, None, f"train.bin@{start}"))
    assert all((s.labels is None) or (s.labels != IGNORE_INDEX).any() for s in samples)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps in all")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    tokenizer = AutoTokenizer.from_pretrained(args.out / "base")
    samples = build_samples(args.out, tokenizer, args.steps * args.grad_accum, args.seed)
    config = TrainConfig(
        model=str(args.out / "base"),
        data=[],
        output_dir=str(args.out / "beacon"),
        **BEACON,
        inference_ratio_mix="adapt-128",
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
