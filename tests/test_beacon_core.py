"""The beacon core on tiny CPU models: plug-and-play, streaming invariances, memory, decoding.

Every test runs in float32 on tiny random-weight checkpoints (2 layers, hidden 64) written once
per session by the `tiny_model_dir` fixture. Behaviour follows the reference implementation as
described in `docs/beacon_method.md` (sections 4, 5 and 12).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from counting import CountingTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from beacon_apps.beacon import (
    BeaconForCausalLM,
    GenerationSettings,
    generate,
    generate_tokens,
    load_beacon_model,
)

FAMILIES = ("qwen2", "llama", "mistral")
WINDOW = 16
# Window 16, every projection with a (noisy) beacon copy, so any use of a wrong projection shows.
CHECKPOINT = {
    "beacon_window": WINDOW,
    "beacon_stride": WINDOW,
    "beacon_ratio": [2, 4, 8],
    "beacon_ratio_mix": "step-random",
    "beacon_param": ["q", "k", "v", "o"],
}
# 83 ids: five full windows and a 3-token tail (not a multiple of any ratio).
PROMPT = torch.tensor([[(7 * i + 3) % 500 + 5 for i in range(83)]])
ATOL = 1e-5

# Settings whose streaming must not depend on how the input is cut into calls.
SCENARIOS = {
    "interleave-full-coverage": {},
    "interleave-sequence-mix": {"beacon_ratio_mix": "sequence"},
    "append-full-coverage": {"beacon_pos": "append"},
    "append-step-expansion-prev": {
        "beacon_pos": "append",
        "beacon_attn": "step-expansion",
        "beacon_attend_prev": True,
    },
    "append-step-expansion-no-prev": {
        "beacon_pos": "append",
        "beacon_attn": "step-expansion",
        "beacon_attend_prev": False,
    },
    "append-segmentation": {"beacon_pos": "append", "beacon_attn": "segmentation"},
    "append-stride-8": {"beacon_pos": "append", "beacon_stride": 8},
    "append-stride-8-step-expansion": {
        "beacon_pos": "append",
        "beacon_stride": 8,
        "beacon_attn": "step-expansion",
    },
    "interleave-ratio-0": {"beacon_ratio": [0, 2, 4]},
    "append-ratio-0": {
        "beacon_pos": "append",
        "beacon_attn": "step-expansion",
        "beacon_ratio": [0, 2, 4],
    },
    "append-sink-1": {
        "beacon_pos": "append",
        "beacon_attn": "step-expansion",
        "beacon_attend_prev": False,
        "beacon_sink_size": 1,
    },
    "interleave-sink-2": {"beacon_sink_size": 2},
    "append-stride-8-sink-1": {"beacon_pos": "append", "beacon_stride": 8, "beacon_sink_size": 1},
}


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir):
    return {family: tiny_model_dir(family, **CHECKPOINT) for family in FAMILIES}


@pytest.fixture(scope="module")
def load(model_dirs):
    def make(family: str = "qwen2", attn: str = "sdpa", **overrides) -> BeaconForCausalLM:
        return load_beacon_model(
            model_dirs[family],
            device="cpu",
            dtype=torch.float32,
            attn_implementation=attn,
            **overrides,
        )

    return make


@pytest.fixture(scope="module")
def base_models(model_dirs):
    cache = {}

    def get(family: str, attn: str = "sdpa"):
        if (family, attn) not in cache:
            model = AutoModelForCausalLM.from_pretrained(
                model_dirs[family], dtype=torch.float32, attn_implementation=attn
            )
            cache[family, attn] = model.eval()
        return cache[family, attn]

    return get


def reseed(model: BeaconForCausalLM) -> None:
    """Both runs of a comparison start from the reference's fresh generator."""
    model.memory.rng = np.random.default_rng(42)


def stream(model: BeaconForCausalLM, chunks, ids: torch.Tensor = PROMPT):
    """Reset, feed `ids` in `chunks`; return (logits of all calls, memory size, ratios)."""
    assert sum(chunks) == ids.shape[1]
    model.memory.reset()
    reseed(model)
    logits, at = [], 0
    for size in chunks:
        logits.append(model(ids[:, at : at + size]).logits)
        at += size
    return torch.cat(logits, dim=1), model.memory.size(), list(model.memory.ratios)


def first_chunk(settings: dict) -> int:
    """With a sink, chunk only after the first window closed (the reference's sink quirk, §4.6)."""
    return WINDOW if settings.get("beacon_sink_size", 0) else 0


# ---------------------------------------------------------------------------------------------
# plug-and-play: no beacon in the input means the base model's exact logits


def base_logits(base_models, family: str, ids: torch.Tensor, attn: str = "sdpa"):
    with torch.no_grad():
        return base_models(family, attn)(ids).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["full-coverage", "step-expansion", "segmentation"])
def test_append_input_shorter_than_window_is_the_base_model(load, base_models, family, scheme):
    ids = PROMPT[:, : WINDOW - 3]
    model = load(family, beacon_pos="append", beacon_attn=scheme)
    logits = model(ids).logits
    assert logits.dtype == torch.float32
    assert torch.equal(logits, base_logits(base_models, family, ids))
    assert model.memory.size() == (0, 0, WINDOW - 3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pos", ["interleave", "append"])
def test_ratio_zero_is_the_base_model(load, base_models, family, pos):
    model = load(family, beacon_pos=pos, beacon_ratio=[0])
    short = PROMPT[:, : WINDOW - 3]
    assert torch.equal(model(short).logits, base_logits(base_models, family, short))
    model.memory.reset()
    # Longer inputs: windows close, raw activations move to the memory unchanged.
    logits = model(PROMPT).logits
    torch.testing.assert_close(logits, base_logits(base_models, family, PROMPT), atol=ATOL, rtol=0)
    assert model.memory.size() == (0, 80, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_interleave_input_shorter_than_smallest_ratio_is_the_base_model(load, base_models, family):
    model = load(family, beacon_ratio=[4, 8])
    ids = PROMPT[:, :3]
    assert torch.equal(model(ids).logits, base_logits(base_models, family, ids))
    assert model.memory.size() == (0, 0, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_interleave_inserts_beacons_into_short_inputs(load, base_models, family):
    """Reference §12.9: in interleave mode any input with >= r tokens already holds beacons."""
    model = load(family, beacon_ratio=[4])
    ids = PROMPT[:, :9]
    logits = model(ids).logits
    base = base_logits(base_models, family, ids)
    assert torch.equal(logits[:, :4], base[:, :4])  # before the first beacon: identical
    assert (logits[:, 4:] - base[:, 4:]).abs().amax(-1).min() > 1e-3  # after it: every row differs
    assert model.memory.size() == (0, 0, 9 + 2)  # 9 raw tokens + 2 beacons in the open window


@pytest.mark.parametrize("family", FAMILIES)
def test_append_eager_is_the_base_model_eager(load, base_models, family):
    ids = PROMPT[:, : WINDOW - 1]
    logits = load(family, attn="eager", beacon_pos="append")(ids).logits
    torch.testing.assert_close(
        logits, base_logits(base_models, family, ids, "eager"), atol=ATOL, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# streaming invariances


@pytest.mark.parametrize("settings", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_chunked_and_token_by_token_equal_one_call(load, settings):
    model = load(**settings)
    whole, size, ratios = stream(model, [PROMPT.shape[1]])
    head = first_chunk(settings)
    cuts = [head + 3, 5, 1, 24] if head else [7, 13, 1, 24]
    cuts.append(PROMPT.shape[1] - sum(cuts))
    by_token = ([head] if head else []) + [1] * (PROMPT.shape[1] - head)
    for chunks in (cuts, by_token):
        logits, chunk_size, chunk_ratios = stream(model, chunks)
        assert logits.shape == whole.shape
        torch.testing.assert_close(logits, whole, atol=ATOL, rtol=0)
        assert chunk_size == size
        assert chunk_ratios == ratios


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_chunking_invariance_other_families(load, family):
    model = load(family, beacon_pos="append", beacon_attn="step-expansion")
    whole, size, ratios = stream(model, [83])
    logits, chunk_size, chunk_ratios = stream(model, [7, 13, 1, 24, 38])
    torch.testing.assert_close(logits, whole, atol=ATOL, rtol=0)
    assert (chunk_size, chunk_ratios) == (size, ratios)


@pytest.mark.parametrize("mix", ["instance-random", "fixed-4", "sequence"])
def test_chunking_invariance_other_ratio_mixes(load, mix):
    model = load(beacon_ratio_mix=mix)
    whole, size, ratios = stream(model, [83])
    logits, chunk_size, chunk_ratios = stream(model, [30, 1, 1, 51])
    torch.testing.assert_close(logits, whole, atol=ATOL, rtol=0)
    assert (chunk_size, chunk_ratios) == (size, ratios)
    if mix == "instance-random":
        assert len(set(ratios)) == 1
    if mix == "fixed-4":
        assert set(ratios) == {4}


@pytest.mark.parametrize("settings", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_eager_equals_sdpa(load, settings):
    sdpa = stream(load(**settings), [83])
    eager = stream(load(attn="eager", **settings), [83])
    torch.testing.assert_close(eager[0], sdpa[0], atol=ATOL, rtol=0)
    assert eager[1:] == sdpa[1:]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"beacon_pos": "append", "beacon_attn": "step-expansion"}],
    ids=["causal", "plan-mask"],
)
def test_attention_mask_is_built_once_per_step(load, monkeypatch, attn, settings):
    """Every layer of a step attends with the same mask object; the causal one is built once."""
    from beacon_apps.beacon import attention
    from beacon_apps.beacon import model as model_module

    built, calls = [], []
    causal_mask, attend = attention._causal_mask, model_module.attend
    monkeypatch.setattr(attention, "_causal_mask", lambda *a: built.append(a) or causal_mask(*a))

    def spy(query, key, value, mask, *rest):
        calls.append((query.clone(), key.clone(), value.clone(), mask, rest))
        return attend(query, key, value, mask, *rest)

    monkeypatch.setattr(model_module, "attend", spy)
    model = load(attn=attn, **settings)
    layers = len(model.model.layers)
    stream(model, [PROMPT.shape[1]])
    steps = [calls[i : i + layers] for i in range(0, len(calls), layers)]
    assert len(steps) > 4 and all(len(step) == layers for step in steps)
    for step in steps:
        assert all(call[3] is step[0][3] for call in step)  # one mask object per step
    with_mask = [step for step in steps if step[0][3] is not None]
    assert with_mask  # steps after the first attend over a memory: an explicit mask
    if not settings:  # all masks causal: built once per step, same numbers as built per call
        assert len(built) == len(with_mask)
        for query, key, value, mask, rest in calls:
            assert torch.equal(
                attend(query, key, value, mask, *rest), attend(query, key, value, None, *rest)
            )


def test_parallel_window_setting_gives_the_sequential_result(load):
    """Reference §4.9: packing windows is an optimisation; the numbers are the sequential ones."""
    sequential = stream(load(), [83])
    parallel = stream(load(beacon_parallel_window=2), [83])
    torch.testing.assert_close(parallel[0], sequential[0], atol=ATOL, rtol=0)
    assert parallel[1:] == sequential[1:]


def test_rng_is_not_reseeded_by_reset(load):
    """Reference §4.1: reset() keeps the generator, so a second identical run draws new ratios."""
    model = load()
    model(PROMPT)
    first = list(model.memory.ratios)
    model.memory.reset()
    model(PROMPT)
    assert model.memory.ratios != first
    assert stream(model, [83])[2] == first  # a fresh generator draws the first run's ratios


def test_logits_to_keep(load):
    model = load()
    whole, _, _ = stream(model, [83])
    model.memory.reset()
    reseed(model)
    kept = model(PROMPT, logits_to_keep=5).logits
    torch.testing.assert_close(kept, whole[:, -5:], atol=ATOL, rtol=0)  # lm_head on fewer rows
    model.memory.reset()
    reseed(model)
    assert model(PROMPT, logits_to_keep=0).logits is None
    assert model.memory.size() == stream(model, [83])[1]


def test_batch_rows_are_independent(load):
    model = load(beacon_ratio=[4])
    batch = torch.cat([PROMPT, PROMPT.flip(1)])
    together = model(batch).logits
    apart = [stream(model, [83], row[None])[0] for row in batch]
    torch.testing.assert_close(together, torch.cat(apart), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# snapshot / restore


@pytest.mark.parametrize(
    "settings",
    [SCENARIOS["interleave-full-coverage"], SCENARIOS["append-sink-1"]],
    ids=["interleave", "append-sink"],
)
def test_snapshot_then_continue_equals_uninterrupted(load, settings):
    model = load(**settings)
    head, tail = PROMPT[:, :37], PROMPT[:, 37:]
    model.memory.reset()
    reseed(model)
    expected_head = model(head).logits
    expected_tail = model(tail).logits
    expected_size = model.memory.size()

    model.memory.reset()
    reseed(model)
    assert torch.equal(model(head).logits, expected_head)
    snapshot = model.memory.snapshot()
    for detour in (PROMPT[:, 10:70], PROMPT[:, 3:9]):
        model(detour)  # the snapshot must not see this
        model.memory.restore(snapshot)
        assert torch.equal(model(tail).logits, expected_tail)  # same cuts: bitwise
        assert model.memory.size() == expected_size
    model.memory.restore(snapshot)
    by_token = torch.cat([model(tail[:, i : i + 1]).logits for i in range(tail.shape[1])], 1)
    torch.testing.assert_close(by_token, expected_tail, atol=ATOL, rtol=0)


def test_generation_after_restore_equals_uninterrupted(load):
    model = load()
    document, question = PROMPT[:, :50], PROMPT[:, 50:60]
    settings = GenerationSettings(max_new_tokens=20)
    model.memory.reset()
    reseed(model)
    model(document)
    expected = generate(model, question, settings, reset=False)
    expected_ratios = list(model.memory.ratios)

    model.memory.reset()
    reseed(model)
    model(document)
    snapshot = model.memory.snapshot()
    generate(model, PROMPT[:, 60:70], settings, reset=False)
    for _ in range(2):
        model.memory.restore(snapshot)
        assert generate(model, question, settings, reset=False) == expected
        assert model.memory.ratios == expected_ratios


# ---------------------------------------------------------------------------------------------
# memory size: the closed form of method notes §4.7


def closed_form(model: BeaconForCausalLM, fed: int) -> tuple[int, int, int]:
    """(sink, beacons, raw) after `fed` raw tokens, from the ratios the model drew."""
    cfg = model.beacon_config
    window, stride = cfg.beacon_window, cfg.beacon_stride
    closed = 0 if fed < window else (fed - window) // stride + 1
    ratios = model.memory.ratios
    beacons = sum(stride // r if r else stride for r in ratios[:closed])
    tail = fed - closed * stride
    extra = 0
    if cfg.beacon_pos == "interleave" and tail:
        current = ratios[closed]
        extra = tail // current if current else 0
    sink = cfg.beacon_sink_size if closed else 0
    return sink, beacons, tail + extra


MEMORY_SCENARIOS = {
    name: SCENARIOS[name]
    for name in (
        "interleave-full-coverage",
        "append-step-expansion-prev",
        "append-stride-8",
        "interleave-ratio-0",
        "append-ratio-0",
        "append-sink-1",
        "interleave-sink-2",
    )
}


@pytest.mark.parametrize("settings", MEMORY_SCENARIOS.values(), ids=MEMORY_SCENARIOS.keys())
def test_memory_size_matches_closed_form(load, settings):
    model = load(**settings)
    ids = torch.tensor([[(5 * i + 1) % 500 + 5 for i in range(150)]])
    lengths = sorted({*range(1, 150, 7), 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 149, 150})
    if settings.get("beacon_sink_size"):
        lengths = [n for n in lengths if n >= WINDOW]  # shorter: the sink quirk (§4.6)
    for n in lengths:
        model.memory.reset()
        model(ids[:, :n])
        assert model.memory.size() == closed_form(model, n), n
    # ...and fed one token at a time, checked after every token.
    model.memory.reset()
    start = first_chunk(settings)
    if start:
        model(ids[:, :start])
    for n in range(start + 1, 151):
        model(ids[:, n - 1 : n])
        assert model.memory.size() == closed_form(model, n), n


@pytest.mark.parametrize("pos", ["interleave", "append"])
def test_memory_is_bounded_for_a_fixed_ratio(load, pos):
    ratio = 4
    model = load(beacon_pos=pos, beacon_ratio=[ratio])
    ids = torch.tensor([[(3 * i + 2) % 500 + 5 for i in range(400)]])
    previous_beacons = 0
    for n in range(1, 401):
        model(ids[:, n - 1 : n])
        sink, beacons, raw = model.memory.size()
        assert beacons == (n // WINDOW) * (WINDOW // ratio)
        assert beacons >= previous_beacons
        assert raw < WINDOW + WINDOW // ratio  # the open window never exceeds W raw + W/r beacons
        assert sink + beacons + raw <= n / ratio + WINDOW + WINDOW // ratio
        previous_beacons = beacons
    assert model.memory.ratios == [ratio] * len(model.memory.ratios)


@pytest.mark.parametrize(
    "settings",
    [SCENARIOS["interleave-full-coverage"], SCENARIOS["append-sink-1"]],
    ids=["interleave", "append-sink"],
)
def test_memory_size_through_generation(load, settings):
    model = load(**settings)
    prompt = PROMPT[:, :45]
    reseed(model)
    tokens = generate_tokens(model, prompt, GenerationSettings(max_new_tokens=40))
    steps = 0
    for steps, _ in enumerate(tokens, 1):
        # when token k (1-based) is yielded, the prompt and k - 1 earlier tokens have been fed
        assert model.memory.size() == closed_form(model, 45 + steps - 1)
    assert steps == 40
    assert len(model.memory.ratios) >= 5


# ---------------------------------------------------------------------------------------------
# generation


def greedy_by_hand(model: BeaconForCausalLM, prompt: torch.Tensor, steps: int) -> list[int]:
    model.memory.reset()
    reseed(model)
    logits = model(prompt).logits[:, -1]
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax(-1)))
        logits = model(torch.tensor([[out[-1]]])).logits[:, -1]
    return out


@pytest.mark.parametrize(
    "settings",
    [SCENARIOS["interleave-full-coverage"], SCENARIOS["append-step-expansion-no-prev"]],
    ids=["interleave", "append"],
)
def test_greedy_equals_argmax_by_hand(load, settings):
    model = load(**settings)
    expected = greedy_by_hand(model, PROMPT[:, :45], 24)
    ratios = list(model.memory.ratios)
    reseed(model)
    assert generate(model, PROMPT[:, :45], GenerationSettings(max_new_tokens=24)) == expected
    assert model.memory.ratios[: len(ratios)] == ratios


def sample(model, seed: int | None, **options) -> list[int]:
    reseed(model)
    settings = GenerationSettings(max_new_tokens=20, do_sample=True, seed=seed, **options)
    return generate(model, PROMPT[:, :45], settings)


def test_sampling_is_reproducible_with_a_seed(load):
    model = load()
    first = sample(model, 1)
    assert sample(model, 1) == first
    assert sample(model, 2) != first
    assert len(set(first)) > 5  # really sampled, not greedy


def test_top_k_1_is_greedy(load):
    model = load()
    reseed(model)
    greedy = generate(model, PROMPT[:, :45], GenerationSettings(max_new_tokens=20))
    assert sample(model, 7, top_k=1) == greedy
    assert sample(model, 7, temperature=0.0) == greedy


def test_max_new_tokens_is_respected(load):
    model = load()
    for limit in (1, 5, 17):
        assert (
            len(generate(model, PROMPT[:, :45], GenerationSettings(max_new_tokens=limit))) == limit
        )


def test_eos_stops_generation(load):
    model = load()
    free = sample(model, 3)
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stopped = sample(model, 3, eos_token_ids=[free[k]])
    assert stopped == free[: k + 1]  # the eos token is yielded, nothing after it
    assert sample(model, 3, eos_token_ids=[free[k], 99999]) == free[: k + 1]


def test_min_new_tokens_blocks_eos(load):
    model = load()
    free = sample(model, 3)
    forced = sample(model, 3, eos_token_ids=[free[0]], min_new_tokens=4)
    assert free[0] not in forced[:4]
    assert len(forced) >= 4


def test_repetition_penalty_changes_the_output(load):
    model = load()
    reseed(model)
    plain = generate(model, PROMPT[:, :45], GenerationSettings(max_new_tokens=20))
    reseed(model)
    penalised = generate(
        model, PROMPT[:, :45], GenerationSettings(max_new_tokens=20, repetition_penalty=1.5)
    )
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))


def test_stop_string_spanning_tokens_stops(load, model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["qwen2"])
    model = load()
    reseed(model)
    settings = GenerationSettings(max_new_tokens=40, do_sample=True, seed=5)
    free = generate(model, PROMPT[:, :45], settings)
    pieces = [tokenizer.decode([t]) for t in free]

    def printable(text: str) -> bool:
        return bool(text) and text.isascii() and text.isprintable()

    # a stop string made of the end of one token and the start of the next: it spans two tokens
    for k in range(1, len(free) - 1):
        if not (printable(pieces[k]) and printable(pieces[k + 1])):
            continue
        stop = pieces[k][-2:] + pieces[k + 1][:2]
        prefix_texts = [tokenizer.decode(free[: i + 1]) for i in range(len(free))]
        first_hit = next(i for i, text in enumerate(prefix_texts) if stop in text)
        if first_hit == k + 1 and stop not in pieces[k] and stop not in pieces[k + 1]:
            break
    else:
        pytest.fail("no usable stop string in the sampled text")
    reseed(model)
    stop_settings = GenerationSettings(
        max_new_tokens=40, do_sample=True, seed=5, stop_strings=[stop]
    )
    stopped = generate(model, PROMPT[:, :45], stop_settings, tokenizer=tokenizer)
    assert stopped == free[: k + 2]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, PROMPT[:, :45], stop_settings)


UNICODE_TEXT = (
    "Plain words, then accents: naïve café déjà vu; CJK 日本語のテキスト; emoji 🙂🚀 and "
    "symbols → ≠ ∑; ligatures ﬁ and a last line.\n\tTabs  and  double  spaces."
)


def decoding_cases(tokenizer):
    """Token sequences to decode: real text (multi-byte characters split over tokens) and
    random ids (special tokens, invalid byte sequences)."""
    generator = torch.Generator().manual_seed(3)
    yield tokenizer.encode(UNICODE_TEXT, add_special_tokens=False)
    for _ in range(6):
        yield torch.randint(len(tokenizer), (120,), generator=generator).tolist()


def test_incremental_decoding_equals_whole_decoding(model_dirs):
    from beacon_apps.beacon.generation import IncrementalDecoder

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["qwen2"])
    for ids in decoding_cases(tokenizer):
        decoder = IncrementalDecoder(tokenizer)
        for n, token in enumerate(ids, start=1):
            decoder.add(token)
            whole = tokenizer.decode(ids[:n], skip_special_tokens=True)
            assert decoder.text + decoder.pending() == whole
            assert not decoder.text.endswith("\ufffd")


def test_stop_string_matcher_equals_a_whole_text_search_at_linear_cost(model_dirs):
    from beacon_apps.beacon.generation import StopStringMatcher

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["qwen2"])
    for ids in decoding_cases(tokenizer):
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        length = len(whole)
        stops = [whole[length // 2 : length // 2 + 3], whole[-5:-1], whole[length // 3 :][:9]]
        stops += ["é", "日本", "\n\t", "🙂🚀", "not in the text at all"]
        for stop_strings in [[s] for s in stops if s] + [stops]:
            counting = CountingTokenizer(tokenizer)
            matcher = StopStringMatcher(counting, stop_strings)
            for n, token in enumerate(ids, start=1):
                text = tokenizer.decode(ids[:n], skip_special_tokens=True)
                expected = min((text.find(s) for s in stop_strings if s in text), default=None)
                assert matcher.add(token) == expected, (stop_strings, n)
                if expected is not None:
                    break
            assert counting.decoded <= 8 * n  # a few tokens per token, not the whole output


# ---------------------------------------------------------------------------------------------
# training mode


@pytest.mark.parametrize(
    ("settings", "labelled"),
    [
        ({"beacon_ratio": [4]}, 44),  # interleave + full-coverage: every label counts
        ({"beacon_ratio": [4], "beacon_pos": "append", "beacon_attn": "step-expansion"}, 28),
    ],
    ids=["interleave", "append"],
)
def test_training_only_beacon_parameters_get_gradients(load, settings, labelled):
    model = load(**settings)
    model.train()
    model.freeze_base_model()
    ids = PROMPT[:, :45]
    out = model(ids, labels=ids)
    # §4.3: the first window's labels are masked except for interleave + full-coverage
    assert out.num_label_tokens == labelled
    assert out.loss.requires_grad
    out.loss.backward()
    last = len(model.model.layers) - 1
    for name, parameter in model.named_parameters():
        if "beacon_" not in name:
            assert not parameter.requires_grad and parameter.grad is None, name
            continue
        assert parameter.requires_grad and parameter.grad is not None, name
        dead = name.startswith(f"model.layers.{last}.self_attn.beacon_") and (
            "beacon_q_proj" in name or "beacon_o_proj" in name
        )
        if dead:  # only shape beacon states after the last layer, which feed nothing
            assert torch.count_nonzero(parameter.grad) == 0, name
        else:
            assert torch.count_nonzero(parameter.grad) > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(load):
    grads = []
    for checkpointing in (False, True):
        model = load(beacon_ratio=[4])
        model.train()
        model.freeze_base_model()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(PROMPT[:, :45], labels=PROMPT[:, :45])
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in model.beacon_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=0, rtol=1e-6)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("second", ["train", "eval"])
def test_stream_continues_after_a_training_call(load, second):
    """Training leaves its last window open and raw; a later call must still be able to close it."""
    model = load(beacon_ratio=[4])
    model.train()
    first = model(PROMPT[:, :30], labels=PROMPT[:, :30])
    assert torch.isfinite(first.loss)
    model.train(second == "train")
    rest = PROMPT[:, 30:]
    out = model(rest, labels=rest if second == "train" else None)
    assert out.logits.shape[1] == rest.shape[1] and torch.isfinite(out.logits).all()
    assert model.memory.size()[1] > 4  # windows after the first were condensed too


def test_eval_mode_keeps_no_graph(load):
    model = load()
    assert not model(PROMPT[:, :20]).logits.requires_grad
