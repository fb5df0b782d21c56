"""Evaluation on tiny CPU models: scoring, the perplexity protocol, the baselines, heat maps, CLI.

Known answers: a model whose head is zero predicts the uniform distribution (perplexity = vocab
size, whatever the method); perplexity of the full base model is recomputed by hand with the
plain Hugging Face model; inside the native window every baseline equals full attention.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from beacon_apps.beacon import load_beacon_model, save_beacon_model
from beacon_apps.beacon.attention import apply_rope
from beacon_apps.evaluation import (
    DESCRIPTION,
    NEEDLE,
    EvalConfig,
    add_eval_arguments,
    beacon_nll,
    evaluate,
    lm_chunks,
    middle_truncate,
    passkey_prompt,
    rouge_l_recall,
    run_eval,
    score_needle,
    score_passkey,
    stream_base_model,
    streaming_nll,
    truncated_nll,
    write_heatmap,
    write_png,
)

WINDOW = 16


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Two documents of English prose as JSONL `text` rows (a few hundred tokens each)."""
    import inspect
    import logging

    path = tmp_path_factory.mktemp("eval") / "docs.jsonl"
    texts = [inspect.getdoc(logging), inspect.getdoc(inspect) + inspect.getdoc(json)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return path, texts


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 500, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_nll(directory, ids: torch.Tensor, first: int) -> tuple[float, int]:
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(directory)(ids).logits[0]
    losses = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")[first - 1 :]
    return float(losses.sum()), len(losses)


# ---------------------------------------------------------------------- scoring
def test_passkey_and_needle_scoring_on_known_outputs():
    assert score_passkey("The pass key is 12345.", "12345") == (1.0, 1.0)
    assert score_passkey("12345", "12345") == (1.0, 1.0)
    assert score_passkey("It is 1234, no, 12345", "12345") == (0.0, 0.89)  # first run only
    assert score_passkey("I do not know.", "12345") == (0.0, 0.0)
    assert rouge_l_recall(NEEDLE, NEEDLE) == 1.0
    assert rouge_l_recall("sitting in Dolores Park", NEEDLE) == pytest.approx(4 / 21)  # 21 words
    assert rouge_l_recall("park dolores", "dolores park") == 0.5  # order matters (LCS)
    assert score_needle(
        "\nSitting in Dolores Park.\nThe best thing to do", NEEDLE
    ) == pytest.approx(4 / 21)


def test_chunks_follow_the_reference_protocol():
    ids = list(range(10))
    assert lm_chunks(ids, 4, 0, None) == [([0, 1, 2, 3], 0)]  # one chunk; position 0 unscored
    assert lm_chunks(ids, 4, 0, 99) == [([99, 0, 1, 2], 1)]
    # stride 2: every chunk scores only what lies beyond the previous chunk's end
    assert lm_chunks(ids, 4, 2, None) == [
        ([0, 1, 2, 3], 0),
        ([2, 3, 4, 5], 2),
        ([4, 5, 6, 7], 2),
        ([6, 7, 8, 9], 2),
    ]
    assert middle_truncate(torch.arange(10)[None], 5).tolist() == [[0, 1, 7, 8, 9]]


def test_passkey_prompt_places_the_key_at_the_depth(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    rng = np.random.default_rng(123)
    positions = []
    for depth in (0, 50, 100):
        text, key = passkey_prompt(tokenizer, 400, depth, 5, rng)
        assert len(key) == 5 and f"The pass key is {key}." in text
        assert abs(len(tokenizer.encode(text)) - 400) <= 5
        positions.append(text.index(key) / len(text))
        if depth == 0:  # right after the task description
            assert text.index("The pass key") <= len(DESCRIPTION) + 4
    assert positions[0] < positions[1] < positions[2] and 0.3 < positions[1] < 0.7


# ---------------------------------------------------------------------- perplexity
def test_uniform_model_has_perplexity_equal_to_the_vocabulary(tiny_model_dir, tmp_path, documents):
    """Zero head: every token has probability 1/V under every method, whatever the context."""
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4, 8])
    model = load_beacon_model(source, device="cpu")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    directory = save_beacon_model(model, tmp_path / "uniform")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, directory)
    config = EvalConfig(
        model=str(directory),
        data=[str(documents[0])],
        lengths=[40, 200],
        native_window=48,
        stream_block=8,
        output_dir=str(tmp_path / "results"),
        device="cpu",
    )
    results = evaluate(config)["perplexity"]
    vocab = model.config.vocab_size
    for method, values in results["perplexity"].items():
        for length, value in values.items():
            assert value == pytest.approx(vocab, rel=1e-5), (method, length)


def test_full_attention_perplexity_matches_a_hand_computation(tiny_model_dir, tmp_path, documents):
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4, 8])
    path, texts = documents
    config = EvalConfig(
        model=str(source),
        data=[str(path)],
        methods=["full"],
        lengths=[40],
        stride=25,
        stream_block=16,
        output_dir=str(tmp_path),
        device="cpu",
    )
    found = evaluate(config)["perplexity"]["perplexity"]["full"]["40"]

    tokenizer = AutoTokenizer.from_pretrained(source)
    base = AutoModelForCausalLM.from_pretrained(source)
    means = []
    for text in texts:  # chunks of 40 every 25 tokens; score the tokens not scored before
        ids = tokenizer.encode(text, add_special_tokens=False)
        total, count, scored_until = 0.0, 0, 1
        for start in range(0, len(ids), 25):
            chunk = torch.tensor([ids[start : start + 40]])
            with torch.no_grad():
                logits = base(chunk).logits[0]
            losses = F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="none")
            first = max(scored_until - start, 1)
            total, count = total + float(losses[first - 1 :].sum()), count + len(losses) - first + 1
            scored_until = start + chunk.shape[1]
            if scored_until == len(ids):
                break
        means.append(total / count)
    assert found == pytest.approx(math.exp(sum(means) / len(means)), rel=1e-5)


def test_beacon_perplexity_equals_one_call_through_the_memory(tiny_model_dir):
    """Perplexity feeds one window per call (one window of logits at a time) with the adapt
    ratio pinned; the loss of a single call with labels must be the same."""
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4, 8])
    model = load_beacon_model(source, device="cpu")
    ids = _ids(5 * WINDOW + 3)
    for first in (1, 50):
        labels = ids.clone()
        labels[:, :first] = -100
        model.memory.reset()
        with torch.no_grad():
            out = model(ids, labels=labels, logits_to_keep=0)
        total, count = beacon_nll(model, ids, first)
        assert count == out.num_label_tokens == ids.shape[1] - first
        assert total == pytest.approx(out.loss.item() * count, rel=1e-5)
    assert model.memory.config is model.beacon_config  # the pinned ratio is undone


def test_short_input_in_append_mode_scores_like_the_base_model(tiny_model_dir):
    source = tiny_model_dir(
        beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[4], beacon_pos="append"
    )
    model = load_beacon_model(source, device="cpu")
    ids = _ids(WINDOW - 2, seed=1)
    total, count = beacon_nll(model, ids, 1)
    expected = _hf_nll(source, ids, 1)
    assert count == expected[1] and total == pytest.approx(expected[0], rel=1e-5)


def test_baselines_equal_full_attention_inside_the_native_window(tiny_model_dir):
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4, 8])
    model = load_beacon_model(source, device="cpu")
    ids = _ids(100, seed=2)
    expected = _hf_nll(source, ids, 10)
    with torch.no_grad():
        for total, count in (
            truncated_nll(model, ids, 10, native=512),
            streaming_nll(model, ids, 10, block=16, limit=(4, 512)),
            streaming_nll(model, ids, 10, block=7, limit=None),
        ):
            assert count == expected[1] and total == pytest.approx(expected[0], rel=1e-5)
        # beyond the window they lose context, so they differ
        assert truncated_nll(model, ids, 10, native=32)[0] != pytest.approx(expected[0], rel=1e-3)


def test_sink_cache_keeps_first_and_recent_tokens_at_slot_positions(tiny_model_dir):
    """StreamingLLM's cache: sink + recent tokens, each key rotated to its slot in the cache."""
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4, 8])
    model = load_beacon_model(source, device="cpu")
    projection = model.model.layers[0].self_attn.k_proj
    pre_rope = []
    hook = projection.register_forward_hook(lambda _m, _i, out: pre_rope.append(out[0]))
    ids, cache = _ids(30, seed=4), DynamicCache()
    with torch.no_grad():
        for _, hidden in stream_base_model(model, ids, cache, block=3, limit=(2, 10)):
            assert hidden.shape[1] == 3
            assert cache.get_seq_length() <= 10  # the last block saw at most 10 keys
    hook.remove()
    keys = torch.cat(pre_rope)  # [30, kv_heads * head_dim], one row per token
    kept = cache.get_seq_length()
    tokens = [0, 1, *range(30 - (kept - 2), 30)]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    expected = keys[tokens].view(kept, -1, head_dim).transpose(0, 1)[None]
    cos, sin = model.model.rotary_emb(expected, torch.arange(kept)[None])
    expected = apply_rope(expected, cos, sin)
    assert torch.allclose(cache.layers[0].keys, expected, atol=1e-5)


# ---------------------------------------------------------------------- heat maps
def test_png_writers(tmp_path, monkeypatch):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    write_png(tmp_path / "raw.png", pixels)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "raw.png")), pixels)

    panels = {"beacon": np.array([[1.0, 0.5], [0.0, np.nan]]), "sink": np.zeros((2, 2))}
    write_heatmap(tmp_path / "pil.png", panels, [1024, 2048], [0, 100], "passkey")
    monkeypatch.setitem(sys.modules, "PIL", None)  # no Pillow: the pure-Python writer
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    write_heatmap(tmp_path / "plain.png", panels, [1024, 2048], [0, 100], "passkey")
    monkeypatch.undo()
    for name in ("pil.png", "plain.png"):
        image = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        colours = {tuple(int(c) for c in px) for px in image.reshape(-1, 3)}
        assert {(0x0C, 0xD7, 0x9F), (0xF0, 0x49, 0x6E), (200, 200, 200)} <= colours, name


# ---------------------------------------------------------------------- CLI
def test_cli_evaluates_every_task_and_baseline(tiny_model_dir, tmp_path, documents, capsys):
    source = tiny_model_dir(beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4, 8])
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        [
            "--model", str(source),
            "--tasks", "perplexity", "passkey", "needle",
            "--data", str(documents[0]),
            "--lengths", "256", "384",
            "--depths", "0", "100",
            "--max-new-tokens", "4",
            "--native-window", "128",
            "--full-max-length", "300",
            "--output-dir", str(tmp_path),
            "--device", "cpu",
        ]
    )  # fmt: skip
    assert run_eval(args) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "passkey accuracy" in printed and "n/a" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["native_window"] == 128
    assert results["beacon"]["beacon_ratio_mix"] == "adapt-1024"
    ppl = results["perplexity"]["perplexity"]
    assert set(ppl) == {"beacon", "truncated", "sink", "full"}
    assert all(ppl[m]["256"] > 1 for m in ppl) and ppl["full"]["384"] is None  # over the limit
    for task, metric in (("passkey", "accuracy"), ("needle", "rouge_l_recall")):
        assert results[task][metric]["beacon"]["384"].keys() == {"0", "100"}
        assert len(results[task]["samples"]) == 2 * 2 * 4
        Image.open(tmp_path / f"{task}.png").verify()
