"""Pass-key retrieval at one overall compression ratio: uniform vs question-aware window ratios.

    python benchmarks/bench_question_aware.py [--model DIR] [--lengths 2048 4096 8192]
        [--depths 10 50 90] [--keys 4] [--ratios 32 8]

For each overall ratio R, context length and depth, a few fresh pass keys are hidden in real
held-out code (the demo's `valid.bin`), in the demo beacon's training format (a chat whose user
message is the document then "What is the pass key?"; scripts/train_demo_beacon.py,
`fact_chat`). Each prompt is answered twice by the same model:

- uniform: every window condensed at R (`beacon_ratio_mix = fixed-R`);
- question: the windows that best match the question (BM25) at low ratios, the others harder,
  with no more condensed entries in all than uniform R (`beacon_apps.ratio_plan`).

Prints accuracy per method and length, the difference, the condensed entries of both (equal
budget check) and how often BM25 ranked the key's window first. Cells whose prompt does not fit
the model's positions at R ((positions - window) * R + window) are skipped. Without --model it
takes the newest /tmp/demo/beacon/checkpoint-N.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the demo's prompts
from train_demo_beacon import code_haystack, hide, passkey_fact  # noqa: E402

DEMO = Path("/tmp/demo")
QUESTION = "What is the pass key?"


def newest_checkpoint(root: Path) -> Path:
    found = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not found:
        raise SystemExit(f"no checkpoint-N under {root}; give --model")
    return found[-1]


def make_prompt(tokenizer, code: np.ndarray, length: int, depth: float, rng: random.Random):
    """(prompt ids, tokens before the question, key, character range of the fact): one chat.

    The haystack is `length` tokens of code from a random place; the fact goes at the line
    break before `depth` of its characters, as `fact_chat` does in training.
    """
    haystack = code_haystack(code, tokenizer, rng, length)
    key = str(rng.randint(10000, 99999))
    document = hide(haystack, passkey_fact(key), depth)

    def render(content: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer.encode(text, add_special_tokens=False)

    ids = render(f"{document}\n\n{QUESTION}")
    before = render(document)
    text_end = next((i for i, (a, b) in enumerate(zip(ids, before, strict=False)) if a != b), 0)
    return ids, text_end, key


def key_window(tokenizer, ids: list[int], key: str, window: int) -> int | None:
    """Index of the first window whose text holds the key (None if it straddles two)."""
    for index, start in enumerate(range(0, len(ids) - window + 1, window)):
        if key in tokenizer.decode(ids[start : start + window]):
            return index
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the model's")
    parser.add_argument("--haystack", type=Path, default=DEMO / "valid.bin", help="uint16 ids")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--depths", nargs="+", type=int, default=[10, 50, 90], help="percent")
    parser.add_argument("--keys", type=int, default=4, help="pass keys per length x depth")
    parser.add_argument("--ratios", nargs="+", type=int, default=[32, 8], help="overall ratios")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--beyond-reach",
        action="store_true",
        help="also run lengths past the reach (positions the base model never saw)",
    )
    args = parser.parse_args()
    print("command:", " ".join(sys.argv))
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from beacon_apps.beacon import GenerationSettings, generate, load_beacon_model
    from beacon_apps.beacon.model import max_positions
    from beacon_apps.evaluation import planned_generate, score_passkey
    from beacon_apps.ratio_plan import beacon_entries, question_plan, question_schedule

    model_dir = args.model or newest_checkpoint(DEMO / "beacon")
    model = load_beacon_model(model_dir, device="cpu", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
    config = model.beacon_config
    window, stride = config.beacon_window, config.beacon_stride
    positions = max_positions(model.config)
    code = np.fromfile(args.haystack, dtype=np.uint16)
    eos = sorted({model.config.eos_token_id, tokenizer.eos_token_id} - {None})
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
    print(
        f"model {model_dir} (window {window}, ratios {config.beacon_ratio}, positions "
        f"{positions}); haystack {args.haystack} ({len(code):,} tokens)"
    )

    methods = ("uniform", "question")
    correct = {}  # (ratio, length, method) -> [0/1, ...]
    fuzzy = {}  # (ratio, method) -> [digit similarity of the answer's first number to the key]
    entries = {}  # (ratio, method) -> [beacon entries after the prompt]
    top1 = {}  # ratio -> [key window ranked first by BM25]
    started = time.perf_counter()
    for ratio in args.ratios:
        reach = (positions - window) * ratio + window
        fixed = config.replace(beacon_ratio_mix=f"fixed-{ratio}")
        for length in args.lengths:
            if length + 64 > reach:
                if not args.beyond_reach:
                    print(f"ratio {ratio}: {length} tokens exceed the reach {reach}; skipped")
                    continue
                print(f"ratio {ratio}: {length} tokens exceed the reach {reach}; run anyway")
            rng = random.Random(f"{args.seed}-{length}")  # same prompts for every ratio
            for depth in args.depths:
                for _ in range(args.keys):
                    ids, text_end, key = make_prompt(tokenizer, code, length, depth / 100, rng)
                    prompt = torch.tensor([ids])
                    for method in methods:
                        model.memory.config = fixed
                        if method == "uniform":
                            tokens = generate(model, prompt, settings)
                        else:
                            tokens = planned_generate(
                                model, prompt, settings, QUESTION, tokenizer.decode, text_end
                            )
                        output = tokenizer.decode(tokens, skip_special_tokens=True)
                        accuracy, similarity = score_passkey(output, key)
                        correct.setdefault((ratio, length, method), []).append(accuracy)
                        fuzzy.setdefault((ratio, method), []).append(similarity)
                    plan, scores = question_plan(
                        ids,
                        QUESTION,
                        tokenizer.decode,
                        window=window,
                        stride=stride,
                        overall=ratio,
                        ratios=[ratio],
                        text_end=text_end,
                    )
                    schedule = question_schedule(
                        fixed, ids, QUESTION, tokenizer.decode, ratio, text_end=text_end
                    )
                    entries.setdefault((ratio, "uniform"), []).append(beacon_entries(plan, stride))
                    entries.setdefault((ratio, "question"), []).append(
                        beacon_entries(schedule, stride)
                    )
                    where = key_window(tokenizer, ids, key, window)
                    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
                    top1.setdefault(ratio, []).append(float(where is not None and best == where))
            print(f"ratio {ratio}, {length} tokens done ({time.perf_counter() - started:.0f}s)")
    model.memory.config = config

    lengths = [n for n in args.lengths if any((r, n, "uniform") in correct for r in args.ratios)]
    header = f"{'ratio':>5} {'method':<9}" + "".join(f"{n:>8}" for n in lengths) + f"{'mean':>8}"
    print(
        f"\npass-key accuracy ({len(args.depths)} depths x {args.keys} keys per cell; "
        f"depths {args.depths})"
    )
    print(header)
    for ratio in args.ratios:
        means = {}
        for method in methods:
            cells = [correct.get((ratio, n, method)) for n in lengths]
            values = [sum(c) / len(c) if c else None for c in cells]
            pooled = [v for c in cells if c for v in c]
            means[method] = (values, sum(pooled) / len(pooled) if pooled else None)
            text = "".join(f"{'n/a' if v is None else f'{v:.2f}':>8}" for v in values)
            total = means[method][1]
            print(f"{ratio:>5} {method:<9}{text}{'n/a' if total is None else f'{total:.2f}':>8}")
        diffs = [
            None if a is None or b is None else b - a
            for a, b in zip(means["uniform"][0], means["question"][0], strict=True)
        ]
        text = "".join(f"{'n/a' if d is None else f'{d:+.2f}':>8}" for d in diffs)
        a, b = means["uniform"][1], means["question"][1]
        total = "n/a" if a is None or b is None else f"{b - a:+.2f}"
        print(f"{ratio:>5} {'diff':<9}{text}{total:>8}")
    print("\nfuzzy match of the answered number to the key (mean over all cells)")
    for ratio in args.ratios:
        if (ratio, "uniform") in fuzzy:
            uniform, planned = (
                np.mean(fuzzy[(ratio, "uniform")]),
                np.mean(fuzzy[(ratio, "question")]),
            )
            print(f"  ratio {ratio}: uniform {uniform:.2f}, question-aware {planned:.2f}")
    print("\ncondensed entries per layer after the prompt (mean), BM25 key window ranked first")
    for ratio in args.ratios:
        if (ratio, "uniform") not in entries:
            continue
        uniform, planned = entries[(ratio, "uniform")], entries[(ratio, "question")]
        assert all(q <= u for q, u in zip(planned, uniform, strict=True))
        print(
            f"  ratio {ratio}: uniform {np.mean(uniform):.0f}, question-aware "
            f"{np.mean(planned):.0f}; key window top-1 {np.mean(top1[ratio]):.2f}"
        )
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
