"""Question-aware compression ratios: BM25, the schedule's budget, the memory hook, the engine."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from beacon_apps.beacon import GenerationSettings, generate, load_beacon_model
from beacon_apps.cache import CondensedCache
from beacon_apps.documents import documents_text
from beacon_apps.engine import QA_SYSTEM_PROMPT, BeaconEngine, text_document
from beacon_apps.evaluation import EvalConfig, _Runner, overall_ratio, run_retrieval
from beacon_apps.ratio_plan import (
    allowed_ratios,
    beacon_entries,
    bm25_scores,
    plan_ratios,
    question_plan,
    tokenize,
    window_spans,
)

FILLER = "river stone lamp garden winter letter harbor signal copper violin meadow orbit".split()


def filler(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(FILLER) for _ in range(words))


# ---------------------------------------------------------------------- BM25 and the plan
def test_tokenize_keeps_lowercase_words_and_numbers():
    assert tokenize("The pass-key: 12345, is_it?") == ["the", "pass", "key", "12345", "is", "it"]


def test_bm25_ranks_the_window_with_the_rare_question_words_first():
    windows = [filler(60, seed) for seed in range(12)]
    windows[7] = filler(25, 99) + " the pass key is 40213 remember it " + filler(25, 98)
    windows[3] = filler(50, 3) + " the key "  # one common word of the question only
    scores = bm25_scores(windows, "What is the pass key?")
    assert max(range(12), key=scores.__getitem__) == 7
    assert scores[3] > 0 and scores[7] > 2 * scores[3]
    assert scores[0] == 0.0
    assert bm25_scores([], "anything") == []
    assert bm25_scores(windows, "") == [0.0] * 12


def test_window_spans_are_the_memory_windows():
    assert window_spans(300, 128, 128) == [(0, 128), (128, 256)]
    assert window_spans(256, 128, 128) == [(0, 128), (128, 256)]
    assert window_spans(100, 128, 128) == []
    assert window_spans(40, 16, 8) == [(0, 16), (8, 24), (16, 32), (24, 40)]
    assert allowed_ratios(128, 2) == [2, 4, 8, 16, 32, 64, 128]
    assert allowed_ratios(128, 4, 32) == [4, 8, 16, 32]


@pytest.mark.parametrize("relevance", [0.0, 0.5, 1.0])
def test_the_plan_never_spends_more_than_uniform(relevance):
    rng = random.Random(0)
    for stride, count, overall in itertools.product(
        (16, 64, 128), (0, 1, 3, 17, 64), (2, 4, 8, 16)
    ):
        allowed = allowed_ratios(stride, 2)
        scores = [rng.choice([0.0, 0.0, rng.random(), 5 * rng.random()]) for _ in range(count)]
        plan = plan_ratios(scores, allowed, overall, stride, relevance=relevance)
        assert len(plan) == count and set(plan) <= set(allowed)
        assert beacon_entries(plan, stride) <= count * (stride // overall)
        assert plan == plan_ratios(scores, allowed, overall, stride, relevance=relevance)


def test_the_best_windows_get_the_lowest_ratio_the_budget_allows():
    scores = [0.0] * 64
    scores[40], scores[9] = 9.0, 5.0
    plan = plan_ratios(scores, allowed_ratios(128, 2), 32, 128)
    # budget 64 x 4 = 256 entries; both relevant windows at ratio 2 (64 entries each)
    assert plan[40] == plan[9] == 2
    assert beacon_entries(plan, 128) <= 256
    others = [r for k, r in enumerate(plan) if k not in (9, 40)]
    assert max(others) <= 128 and min(others) >= 32  # the rest shares what is left evenly
    # ties are broken by position: the earlier window first
    tied = plan_ratios([1.0] * 8, allowed_ratios(128, 2), 32, 128, relevance=0)
    assert tied[0] <= tied[-1] and tied == sorted(tied)
    # nothing harder than the overall ratio allowed, or ratio 0: uniform
    assert plan_ratios(scores[:5], [2, 4, 8], 8, 128) == [8] * 5
    assert plan_ratios(scores[:5], [2, 4, 8], 0, 128) == [0] * 5
    with pytest.raises(ValueError, match="overall"):
        plan_ratios(scores, [2, 4], 3, 128)


def test_question_plan_scores_only_the_document():
    words = (filler(40, 1) + " the pass key is 1234 " + filler(40, 2)).split()
    ids = list(range(len(words) + 10))  # one "token" per word, 10 question tokens at the end

    def decode(tokens):
        return " ".join(words[t] if t < len(words) else "pass key" for t in tokens)

    plan, scores = question_plan(
        ids, "pass key", decode, window=8, stride=8, overall=4, ratios=[2, 4, 8], text_end=84
    )
    key_window = words.index("pass") // 8
    assert (
        len(plan) == len(ids) // 8 and max(range(len(scores)), key=scores.__getitem__) == key_window
    )
    assert scores[-1] == 0.0  # the window holding the question is not scored
    assert plan[key_window] == 2


# ---------------------------------------------------------------------- the memory hook
@pytest.mark.parametrize(
    "beacon", [{}, {"beacon_pos": "append"}, {"beacon_pos": "append", "beacon_stride": 8}]
)
def test_memory_follows_the_schedule_then_its_own_rule(tiny_model_dir, beacon):
    settings = {"beacon_window": 16, "beacon_stride": 16, "beacon_ratio": [2, 4, 8], **beacon}
    model = load_beacon_model(
        tiny_model_dir(**settings), device="cpu", dtype=torch.float32, beacon_ratio_mix="fixed-4"
    )
    stride = model.beacon_config.beacon_stride
    prompt = torch.tensor([[(7 * i + 3) % 400 + 5 for i in range(83)]])
    spans = window_spans(83, 16, stride)
    memory = model.memory
    memory.reset()
    schedule = [stride if k % 2 == 0 else 2 for k in range(len(spans) - 1)]
    memory.set_ratio_schedule(schedule)
    with torch.no_grad():
        model(prompt)
    closed = memory.ratios[: len(spans)]
    assert closed == [*schedule, 4]  # the last window: beyond the schedule, fixed-4
    sink, beacons, raw = memory.size()
    assert beacons == beacon_entries(closed, stride)
    # the schedule lasts until reset; a snapshot carries it
    assert memory.snapshot().ratio_schedule == schedule
    memory.reset()
    assert memory.ratio_schedule is None
    with pytest.raises(ValueError, match="schedule"):
        memory.set_ratio_schedule([3])


def test_memory_without_a_schedule_is_unchanged(tiny_model_dir):
    """An empty or absent schedule gives exactly the normal rule (random draws included)."""
    source = tiny_model_dir(beacon_window=16, beacon_stride=16, beacon_ratio=[2, 4, 8])
    prompt = torch.tensor([[(5 * i + 1) % 400 + 5 for i in range(70)]])
    settings = GenerationSettings(max_new_tokens=6)
    outputs = []
    for schedule in (None, []):
        model = load_beacon_model(source, device="cpu", dtype=torch.float32)
        model.memory.reset()
        model.memory.set_ratio_schedule(schedule)
        tokens = generate(model, prompt, settings, reset=False)
        outputs.append((tokens, list(model.memory.ratios), model.memory.size()))
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return BeaconEngine(tiny_model_dir(), cache=CondensedCache(max_bytes=0))


@pytest.fixture(scope="module")
def document():
    text = filler(400, 5)
    cut = len(text) // 3
    return text_document(text[:cut] + " The zebra password is 4242. " + text[cut:])


QUESTION = "What is the zebra password?"


def test_uniform_plan_is_the_default_and_unchanged(engine, document):
    default = engine.ask(document, QUESTION, max_new_tokens=8, ratio=8)
    uniform = engine.ask(document, QUESTION, max_new_tokens=8, ratio=8, ratio_plan="uniform")
    assert default.token_ids == uniform.token_ids
    assert default.ratio_plan == "uniform" and default.window_ratios == []
    # a question plan with nothing harder than the overall ratio is uniform: same tokens
    hardest = engine.ask(document, QUESTION, max_new_tokens=8, ratio=64, ratio_plan="question")
    plain = engine.ask(document, QUESTION, max_new_tokens=8, ratio=64)
    assert set(hardest.window_ratios) == {64} and hardest.token_ids == plain.token_ids
    with pytest.raises(ValueError, match="ratio_plan"):
        engine.ask(document, QUESTION, ratio_plan="smart")


def test_question_plan_is_what_the_memory_used(engine, document):
    uniform = engine.ask(document, QUESTION, max_new_tokens=4, ratio=8)
    answer = engine.ask(document, QUESTION, max_new_tokens=4, ratio=8, ratio_plan="question")
    assert answer.ratio_plan == "question" and answer.compression_ratio == 8
    assert answer.metadata()["window_ratios"] == answer.window_ratios
    turns = [{"role": "user", "content": QUESTION}]
    ids, stable, _ = engine._document_prompt(documents_text([document]), turns, QA_SYSTEM_PROMPT)
    schedule = engine.question_schedule(ids, QUESTION, 8, text_end=stable)
    assert answer.window_ratios[: len(schedule)] == schedule
    assert len(set(schedule)) > 1 and min(schedule) == 2  # mixed, the best window at ratio 2
    # the window holding the password is among those kept at the lowest ratio
    spans = window_spans(len(ids), engine.window, engine.window)
    texts = [engine.tokenizer.decode(ids[start:end]) for start, end in spans]
    holding = [k for k, text in enumerate(texts) if "zebra" in text or "password" in text]
    assert holding and any(schedule[k] == 2 for k in holding)
    # same overall compression: never more entries than uniform
    assert answer.memory_entries <= uniform.memory_entries


def test_question_plans_neither_use_nor_fill_the_cache(tiny_model_dir, document):
    cache = CondensedCache()
    engine = BeaconEngine(tiny_model_dir(), cache=cache)
    first = engine.ask(document, QUESTION, max_new_tokens=4, ratio=8, ratio_plan="question")
    assert first.cached_tokens == 0 and len(cache) == 0
    uniform = engine.ask(document, QUESTION, max_new_tokens=4, ratio=8)
    assert len(cache) == 1 and uniform.cached_tokens == 0
    again = engine.ask(document, QUESTION, max_new_tokens=4, ratio=8, ratio_plan="question")
    assert again.cached_tokens == 0 and len(cache) == 1
    assert again.token_ids == first.token_ids and again.window_ratios == first.window_ratios
    # and the cached uniform prefix is still exact after question-aware runs
    cached = engine.ask(document, QUESTION, max_new_tokens=4, ratio=8)
    assert cached.cache_hit and cached.token_ids == uniform.token_ids
    history = [{"role": "user", "content": QUESTION}]
    chat = engine.chat(document, history, max_new_tokens=4, ratio=8, ratio_plan="question")
    assert chat.ratio_plan == "question" and chat.cached_tokens == 0


# ---------------------------------------------------------------------- evaluation
def test_passkey_evaluation_compares_uniform_and_question_aware(tiny_model_dir, tmp_path):
    source = tiny_model_dir()
    model = load_beacon_model(source, device="cpu", beacon_ratio_mix="fixed-8")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = EvalConfig(
        model=str(source),
        tasks=["passkey"],
        methods=["beacon", "beacon-qa"],
        lengths=[400],
        depths=[50],
        max_new_tokens=4,
        output_dir=str(tmp_path),
    )
    results = run_retrieval(_Runner(model, config, []), tokenizer, config, "passkey")
    assert set(results["accuracy"]) == {"beacon", "beacon-qa"}
    assert {s["method"] for s in results["samples"]} == {"beacon", "beacon-qa"}
    assert overall_ratio(model, 400) == 8
    assert model.memory.config.beacon_ratio_mix == "fixed-8"  # restored after beacon-qa
    assert model.memory.ratio_schedule is None
    random_mix = load_beacon_model(source, device="cpu", beacon_ratio_mix="step-random")
    with pytest.raises(ValueError, match="beacon-qa"):
        overall_ratio(random_mix, 400)
    assert np.isfinite(results["accuracy"]["beacon-qa"]["400"]["50"])


def test_cli_ask_question_aware(tiny_model_dir, tmp_path, capsys, document, monkeypatch):
    from beacon_apps.cli import main

    plans = []
    original = BeaconEngine.stream_ask

    def recording(self, *args, **kwargs):
        stream = original(self, *args, **kwargs)
        plans.append(stream)
        return stream

    monkeypatch.setattr(BeaconEngine, "stream_ask", recording)
    path = tmp_path / "doc.txt"
    path.write_text(document.text(), encoding="utf-8")
    argv = ["ask", "--model", str(tiny_model_dir()), "--no-cache", "--max-new-tokens", "3"]
    assert main([*argv, "--question-aware", str(path), QUESTION]) == 0
    assert main([*argv, str(path), QUESTION]) == 0
    assert [stream.answer.ratio_plan for stream in plans] == ["question", "uniform"]
