"""Pretrain the small base LLM behind beacon-apps' offline demo model (issue: miniature paper).

    python scripts/train_demo_base.py prepare OUT        # corpus + tokenizer + token file (CPU)
    python scripts/train_demo_base.py train OUT --minutes 8 [--device cuda]

Data: Python source nobody here wrote (the standard library, then installed libraries such as
numpy and transformers), grouped by package into long sequences as CodeParrot is in the paper;
the packages whose names hash into the last tenth are held out for evaluation. A byte-level BPE tokenizer (8K) with a ChatML template is trained on
it. 10 % of training sequences are synthetic "find the fact" chats (a pass key hidden in code,
asked for at the end) so the base model knows the question format; the beacon later learns to
keep such facts across windows.

The model is a Llama (6 layers, hidden 384, 6/2 heads, native window 512, tied embeddings:
about 12.5M parameters), trained nanoGPT style: the whole loop is `train()` below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

NATIVE_WINDOW = 512
MODEL = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": NATIVE_WINDOW,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "attention_bias": False,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------- data
def held_out(package: str) -> bool:
    return int(hashlib.sha256(package.encode()).hexdigest(), 16) % 10 == 9


def source_packages(max_chars: int = 80_000_000) -> dict[str, str]:
    """Package (folder) name -> its Python files concatenated (sorted), each under a path header.

    The standard library first, then the installed libraries beside it (numpy, transformers,
    torch's Python side...), until `max_chars`.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [stdlib, Path(sysconfig.get_paths()["purelib"])]
    groups: dict[str, list[Path]] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            if relative.parts[0] in ("site-packages", "idlelib") or len(relative.parts) > 6:
                continue
            package = "/".join(relative.parts[:-1]) or relative.stem
            groups.setdefault(f"{root.name}:{package}", []).append(path)
    texts, total = {}, 0
    for package, paths in groups.items():
        parts = []
        for path in paths:
            try:
                parts.append(f"# file: {path.name}\n{path.read_text(encoding='utf-8')}")
            except (UnicodeDecodeError, OSError):
                continue
        text = "\n\n".join(parts)
        if total + len(text) > max_chars:
            break
        texts[package] = text
        total += len(text)
    return texts


def passkey_chat(words: list[str], rng: random.Random, tokenizer, max_tokens: int) -> list[int]:
    """A chat whose document hides a pass key in code; the answer repeats it."""
    key = str(rng.randint(10000, 99999))
    fact = f"\n# The pass key is {key}. Remember it. {key} is the pass key.\n"
    budget = max(64, max_tokens - 80)
    start = rng.randrange(max(1, len(words) - budget))
    haystack = " ".join(words[start : start + budget // 2])
    depth = rng.randint(0, len(haystack))
    document = haystack[:depth] + fact + haystack[depth:]
    question = rng.choice(["What is the pass key?", "What is the pass key in the document?"])
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": f"{document}\n\n{question}"},
            {"role": "assistant", "content": f"The pass key is {key}."},
        ],
        tokenize=False,
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[-max_tokens:]


def prepare(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    packages = source_packages()
    train = {k: v for k, v in packages.items() if not held_out(k)}
    valid = {k: v for k, v in packages.items() if held_out(k)}
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(train.values()), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=special[1:],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out / "tokenizer")
    eot = wrapped.convert_tokens_to_ids("<|endoftext|>")
    for split, texts in (("train", train), ("valid", valid)):
        ids: list[int] = []
        for name in sorted(texts):
            ids.extend(wrapped.encode(texts[name], add_special_tokens=False))
            ids.append(eot)
        np.array(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
        print(f"{split}: {len(texts)} packages, {len(ids):,} tokens")
    (out / "packages.json").write_text(
        json.dumps({"train": sorted(train), "valid": sorted(valid)}, indent=1)
    )


# ---------------------------------------------------------------------- training
def train(out: Path, minutes: float, device: str, batch: int, lr: float, seed: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    data = np.fromfile(out / "train.bin", dtype=np.uint16)
    valid = np.fromfile(out / "valid.bin", dtype=np.uint16)
    config = LlamaConfig(
        **{k: v for k, v in MODEL.items() if k not in ("model_type", "architectures")},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(device)
    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(data):,} tokens"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    filler = tokenizer.decode(data[:2_000_000].tolist()).split(" ")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def batch_of(source: np.ndarray, size: int, chats: bool) -> torch.Tensor:
        rows = []
        for _ in range(size):
            if chats and rng.random() < 0.1:
                ids = passkey_chat(filler, rng, tokenizer, NATIVE_WINDOW)
                ids = [tokenizer.pad_token_id] * (NATIVE_WINDOW - len(ids)) + ids
            else:
                start = rng.randrange(len(source) - NATIVE_WINDOW)
                ids = source[start : start + NATIVE_WINDOW].tolist()
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long, device=device)

    def evaluate() -> float:
        model.eval()
        losses = []
        with torch.no_grad(), autocast:
            for _ in range(20):
                ids = batch_of(valid, batch, chats=False)
                losses.append(model(ids, labels=ids).loss.item())
        model.train()
        return math.exp(sum(losses) / len(losses))

    deadline = time.monotonic() + minutes * 60
    step, warmup, started = 0, 200, time.monotonic()
    while time.monotonic() < deadline:
        progress = (time.monotonic() - started) / (minutes * 60)
        scale = min(1.0, (step + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        ids = batch_of(data, batch, chats=True)
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        with autocast:
            loss = model(ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 200 == 0:
            print(
                f"step {step:6d}  loss {loss.item():.3f}  lr {lr * scale:.2e}  {time.monotonic() - started:.0f}s",
                flush=True,
            )
        step += 1
    print(f"done: {step} steps, validation perplexity {evaluate():.2f} (held-out packages)")
    model.to(torch.bfloat16).save_pretrained(out / "base", max_shard_size="14MB")
    tokenizer.save_pretrained(out / "base")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    t = sub.add_parser("train")
    t.add_argument("out", type=Path)
    t.add_argument("--minutes", type=float, default=8.0)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    else:
        train(args.out, args.minutes, args.device, args.batch, args.lr, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
