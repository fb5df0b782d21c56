"""Beacon training on tiny CPU models: what trains, the loss itself, learning, resuming, the CLI.

The loss is checked against computations that do not go through the beacon memory: the base
model's own cross entropy (one window) and a Hugging Face run with a hand-built KV cache (two
windows). The learnable task copies a token across a window boundary, which the frozen model can
only do through the beacon memory.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from beacon_apps.beacon import load_beacon_model, save_beacon_model
from beacon_apps.training import (
    Sample,
    TrainConfig,
    add_train_arguments,
    encode_conversation,
    learning_rate,
    load_samples,
    num_windows,
    plan_batches,
    run_train,
    sequence_loss,
    train,
)

WINDOW = 16


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 1,500 tokens of English prose (the tiny tokenizer was trained on such text)."""
    import inspect
    import logging

    path = tmp_path_factory.mktemp("data") / "book.txt"
    path.write_text("\n\n".join(inspect.getdoc(m) for m in (inspect, logging, json)))
    return path


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 500, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- what trains
def test_only_beacon_parameters_get_gradients_and_change(tiny_model_dir, tmp_path):
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4])
    model = load_beacon_model(source, device="cpu")
    model.freeze_base_model()
    model.train()
    loss = sequence_loss(model, Sample(_ids(3 * WINDOW + 5)[0].numpy(), None, "test"))
    loss.backward()
    beacon = dict(model.beacon_parameters())
    for name, parameter in model.named_parameters():
        if name in beacon:
            assert parameter.requires_grad and parameter.grad is not None, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name

    sample = Sample(_ids(3 * WINDOW + 5)[0].numpy(), None, "test")
    config = TrainConfig(
        model=str(source), data=[], output_dir=str(tmp_path), max_steps=1, device="cpu"
    )
    trained = load_file(str(train(config, samples=[sample]) / "model.safetensors"))
    original = load_file(str(source / "model.safetensors"))
    assert trained.keys() == original.keys()
    last = len(model.model.layers) - 1
    for key, value in original.items():
        if "beacon_" not in key:
            assert torch.equal(trained[key], value), key
        elif not key.startswith(f"model.layers.{last}.self_attn.beacon_q_proj"):
            # the last layer's beacon queries feed nothing, so they get no gradient (notes §3)
            assert not torch.equal(trained[key], value), key


# ---------------------------------------------------------------------- the loss
def test_single_window_loss_is_the_base_model_cross_entropy(tiny_model_dir):
    """The last window is never condensed, so a one-window sequence is plain language modelling
    (interleave + full-coverage: the first window's labels are kept, method notes §7)."""
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4])
    model = load_beacon_model(source, device="cpu")
    model.train()
    ids = _ids(WINDOW - 3)
    loss = sequence_loss(model, Sample(ids[0].numpy(), None, "test"))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(source)(ids).logits[0]
    by_hand = -torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_two_window_loss_matches_a_hand_built_memory(tiny_model_dir):
    """Append mode, W = 8, ratio 8: window 1 is condensed into one beacon, window 2 is predicted
    from it. With beacon weights equal to the originals the beacon is an ordinary eos token, so
    the memory is the eos token's K/V in the context of window 1, at position 0 (where RoPE is the
    identity): built here with HF hooks and a DynamicCache, not through the beacon memory."""
    from transformers import DynamicCache

    source = tiny_model_dir(beacon_window=8, beacon_stride=8, beacon_ratio=[8], beacon_pos="append")
    model = load_beacon_model(source, device="cpu")
    model.init_beacon_parameters({name for name, _ in model.beacon_parameters()})
    model.train()
    ids = _ids(12, seed=3)
    loss = sequence_loss(model, Sample(ids[0].numpy(), None, "test"))

    base = AutoModelForCausalLM.from_pretrained(source)
    eos = base.config.eos_token_id
    captured = {}
    hooks = [
        getattr(layer.self_attn, name).register_forward_hook(
            lambda _m, _i, out, key=(i, name): captured.__setitem__(key, out[0, -1])
        )
        for i, layer in enumerate(base.model.layers)
        for name in ("k_proj", "v_proj")
    ]
    with torch.no_grad():
        base(torch.cat([ids[:, :8], torch.tensor([[eos]])], dim=1))
        for hook in hooks:
            hook.remove()
        cache = DynamicCache()
        head_dim = base.config.hidden_size // base.config.num_attention_heads
        for i in range(len(base.model.layers)):
            key, value = (captured[i, n].view(1, -1, 1, head_dim) for n in ("k_proj", "v_proj"))
            cache.update(key, value, i)
        logits = base(ids[:, 8:], past_key_values=cache).logits[0]  # positions 1..4
    # window 1's labels are masked (append mode); window 2 predicts tokens 9, 10, 11
    by_hand = F.cross_entropy(logits[:-1], ids[0, 9:])
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


# ---------------------------------------------------------------------- data
def test_chat_labels_cover_only_the_assistant_turns(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is JSON?"},
        {"role": "assistant", "content": "A data format."},
        {"role": "user", "content": "And YAML?"},
        {"role": "assistant", "content": "Another one."},
    ]
    ids, labels = encode_conversation(tokenizer, chat)
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(chat, tokenize=False)
    answers = tokenizer.decode(
        [token for token, label in zip(ids, labels, strict=True) if label != -100]
    )
    assert answers == "A data format.<|im_end|>\nAnother one.<|im_end|>\n"
    assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))
    # a chat that opens with the answer loses that message, as in the reference
    ids2, _ = encode_conversation(tokenizer, [{"role": "assistant", "content": "Hi"}, *chat[1:3]])
    assert ids2 == encode_conversation(tokenizer, chat[1:3])[0]


def test_samples_follow_the_reference_length_rules(tiny_model_dir, tmp_path, text_file):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    eos = tokenizer.eos_token_id
    rows = [
        {"text": "short"},
        {"text": "A sentence of moderate length, long enough to keep."},
        {"text": "word " * 200},
        {
            "conversations": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"},
            ]
        },
        {
            "conversations": [
                {"role": "user", "content": "x " * 300},
                {"role": "assistant", "content": "y"},
            ]
        },
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    samples = load_samples([data], tokenizer, min_length=5, max_length=64)
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["2", "3", "4"]  # 1 short, 5 long
    kept, long, chat = samples
    assert kept.input_ids[-1] == eos and kept.labels is None  # shorter than max: eos appended
    assert len(long) == 64 and long.input_ids[-1] != eos  # truncated, no eos
    assert chat.labels is not None and (chat.labels != -100).sum() > 0

    book = load_samples([text_file], tokenizer, max_length=128)
    total = len(tokenizer(text_file.read_text())["input_ids"])
    assert [len(s) for s in book[:-1]] == [128] * (len(book) - 1)  # a book is cut, not dropped
    ends_short = total % 128 != 0  # a short last piece gets an eos, a full one does not
    assert sum(len(s) for s in book) == total + ends_short
    assert len(load_samples([f"{text_file}[3]"], tokenizer, max_length=128)) == 3

    from pdf_factory import make_pdf

    pdf = make_pdf(tmp_path / "paper.pdf", ["First page of the paper.", "Second page."])
    (sample,) = load_samples([pdf], tokenizer)
    assert "[page 2]" in tokenizer.decode(sample.input_ids)

    with pytest.raises(ValueError, match="no sample"):
        load_samples([data], tokenizer, min_length=1000, max_length=2000)


def test_batches_group_sequences_by_window_count():
    lengths = [16] * 5 + [40] * 4 + [100] * 3  # 1, 3 and 7 windows of 16
    strict = plan_batches(lengths, 16, 16, 2, "strict", seed=0)
    assert len(strict) == 2 + 2 + 1  # incomplete groups are dropped
    for batch in strict:
        assert len({num_windows(lengths[i], 16, 16) for i in batch}) == 1
    relaxed = plan_batches(lengths, 16, 16, 2, "relaxed", seed=0)
    assert sorted(i for batch in relaxed for i in batch) == list(range(12))
    assert plan_batches(lengths, 16, 16, 2, "strict", seed=0) == strict  # deterministic
    assert plan_batches(lengths, 16, 16, 2, "strict", seed=1) != strict
    assert num_windows(10, 16, 16) == 1 and num_windows(17, 16, 16) == 2


def test_learning_rate_schedules():
    config = TrainConfig(model="m", data=[], output_dir="o", learning_rate=1.0, warmup_steps=4)
    assert [learning_rate(s, 14, config) for s in (0, 2, 4, 9, 14)] == [0, 0.5, 1.0, 0.5, 0.0]
    config.lr_schedule = "cosine"
    assert learning_rate(9, 14, config) == pytest.approx(0.5)
    config.lr_schedule = "constant"
    assert learning_rate(13, 14, config) == 1.0


# ---------------------------------------------------------------------- learning
def _copy_samples(rng: np.random.Generator, count: int, keys: np.ndarray, mismatch=False):
    """Window 1 is one key token repeated; window 2 ends with a marker and must repeat the key."""
    samples = []
    for _ in range(count):
        ids = rng.integers(200, 500, size=WINDOW + 8)
        key = rng.choice(keys)
        ids[:WINDOW] = rng.choice(keys[keys != key]) if mismatch else key
        ids[-2:] = [7, key]
        labels = np.full_like(ids, -100)
        labels[-1] = key
        samples.append(Sample(ids.astype(np.int32), labels.astype(np.int32), "copy"))
    return samples


def _mean_loss(directory, samples) -> float:
    model = load_beacon_model(directory, device="cpu")
    model.train()  # training-mode streaming (last window raw), without gradients
    with torch.no_grad():
        return sum(sequence_loss(model, s).item() for s in samples) / len(samples)


def test_loss_falls_when_copying_a_token_across_windows(tiny_model_dir, tmp_path):
    """The frozen random model cannot know the key in window 2: only the beacons can carry it.
    (Its head is scaled up so that a random 64-wide model can express a confident answer.)"""
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[4])
    model = load_beacon_model(source, device="cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    start = save_beacon_model(model, tmp_path / "start")
    rng, keys = np.random.default_rng(0), np.arange(100, 108)
    held_out = _copy_samples(rng, 32, keys)
    config = TrainConfig(
        model=str(start),
        data=[],
        output_dir=str(tmp_path / "trained"),
        max_steps=30,
        gradient_accumulation_steps=4,
        learning_rate=1e-2,
        lr_schedule="constant",
        group_by_windows="none",
        device="cpu",
    )
    shutil.copy(source / "tokenizer.json", start)
    shutil.copy(source / "tokenizer_config.json", start)
    trained = train(config, samples=_copy_samples(rng, 120, keys))

    before, after = _mean_loss(start, held_out), _mean_loss(trained, held_out)
    control = _mean_loss(trained, _copy_samples(rng, 32, keys, mismatch=True))
    print(f"copy task: loss {before:.3f} -> {after:.3f} (wrong key in memory: {control:.3f})")
    assert before > 5
    assert after < 0.5 < math.log(len(keys))  # far below guessing among the keys
    assert control > math.log(len(keys))  # it answers what the memory holds


# ---------------------------------------------------------------------- resuming
def test_resume_gives_the_same_model_as_uninterrupted_training(tiny_model_dir, tmp_path, text_file):
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4, 8])

    def config(output_dir, **changes):
        values = dict(
            model=str(source),
            data=[str(text_file)],
            output_dir=str(output_dir),
            max_length=80,
            max_steps=6,
            gradient_accumulation_steps=2,
            learning_rate=3e-3,
            warmup_steps=2,
            lr_schedule="cosine",
            weight_decay=0.01,
            group_by_windows="relaxed",
            save_steps=3,
            log_steps=1,
            device="cpu",
        )
        return TrainConfig(**{**values, **changes})

    straight = train(config(tmp_path / "straight"))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight / "checkpoint-3", interrupted / "checkpoint-3")  # "crashed" at 3
    resumed = train(config(interrupted, resume=True))

    a, b = (
        load_file(str(straight / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    assert all(torch.equal(a[key], b[key]) for key in a)
    logs = [
        [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
        for d in (straight, resumed)
    ]
    assert [r["loss"] for r in logs[0][3:]] == [r["loss"] for r in logs[1]]
    state = json.loads((straight / "checkpoint-3" / "training_state" / "state.json").read_text())
    assert state["step"] == 3 and state["memory_rng"]["bit_generator"] == "PCG64"


def test_bfloat16_training_keeps_float32_master_weights(tiny_model_dir, tmp_path):
    """Updates of lr 1e-5 vanish in bfloat16 weights; the optimizer keeps float32 copies."""
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4])
    sample = Sample(_ids(2 * WINDOW + 3)[0].numpy(), None, "test")
    config = TrainConfig(
        model=str(source),
        data=[],
        output_dir=str(tmp_path),
        max_steps=2,
        save_steps=1,
        dtype="bfloat16",
        learning_rate=1e-5,
        device="cpu",
    )
    train(config, samples=[sample])
    state = load_file(str(tmp_path / "checkpoint-1" / "training_state" / "optimizer.safetensors"))
    masters = [value for key, value in state.items() if key.startswith("master.")]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights["model.beacon_embed_tokens.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------- CLI
def test_cli_trains_end_to_end(tiny_model_dir, tmp_path, text_file, capsys):
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4])
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        [
            "--model", str(source),
            "--data", str(text_file),
            "--output-dir", str(tmp_path / "out"),
            "--window", "16",
            "--ratios", "2", "4", "8",
            "--max-length", "64",
            "--max-steps", "3",
            "--grad-accum", "2",
            "--warmup-steps", "1",
            "--save-steps", "2",
            "--device", "cpu",
        ]
    )  # fmt: skip
    assert run_train(args) == 0
    out = tmp_path / "out"
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["beacon_ratio"] == [2, 4, 8] and config["beacon_window"] == 16
    assert config["beacon_ratio_mix"] == "adapt-1024"  # the inference mix, not step-random
    assert (out / "checkpoint-2" / "training_state" / "state.json").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1  # logged at step 3
    model = load_beacon_model(out, device="cpu")
    AutoTokenizer.from_pretrained(out)
    assert model.beacon_config.beacon_ratio == [2, 4, 8]


@pytest.mark.parametrize("raw_last_window", [True, False])
def test_training_reads_the_last_window_as_inference_does_unless_kept_raw(
    tiny_model_dir, raw_last_window
):
    """Interleave mode puts beacons among the last window's tokens at inference. With
    raw_last_window=False training does too, so its loss is exactly the inference loss; with the
    reference's rule (True) the last window is read differently and the losses part."""
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2])
    model = load_beacon_model(source, device="cpu")
    model.memory.raw_last_window = raw_last_window
    ids = _ids(3 * WINDOW + WINDOW // 2)
    losses = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        model.memory.reset()
        with torch.no_grad():
            losses[mode] = model(ids, labels=ids).loss.item()
    if raw_last_window:
        assert losses["train"] != losses["eval"]
    else:
        assert losses["train"] == losses["eval"]
    assert len(model.memory.ratios) == 4  # eval: three full windows and the open last one
