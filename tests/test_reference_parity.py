"""Parity with the reference implementation (FlagEmbedding HEAD), replayed from recorded goldens.

`tests/data/reference/` holds tiny checkpoints written by the reference classes and, per scenario,
what the reference computed on them (see its README.md): the ids of every forward call, the
memory size after it, its logits, the generated ids, the ratio draws and training losses. Each
scenario is replayed here with our model, loaded afresh (so its generator is a fresh
`default_rng(42)`, as the reference's was).

The reference returns only the raw-token rows of the LAST internal window step of a call, so its
logits are compared with the tail of ours (which cover every raw token of the call).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from beacon_apps.beacon import BeaconForCausalLM, GenerationSettings, generate, load_beacon_model

DATA = Path(__file__).parent / "data" / "reference"
GOLDENS = DATA / "goldens.json"
ATOL = 1e-5
LOSS_RTOL = 1e-5
BEACON_ID = 512

if not GOLDENS.is_file():
    pytest.skip("no reference goldens in tests/data/reference", allow_module_level=True)

SCENARIOS: dict[str, dict] = json.loads(GOLDENS.read_text())["scenarios"]


@cache
def reference_logits() -> dict[str, torch.Tensor]:
    return load_file(DATA / "logits.safetensors")


def load(run: dict) -> BeaconForCausalLM:
    """A fresh model for one scenario run (fresh memory and generator, as the reference)."""
    return load_beacon_model(
        DATA / run["family"],
        device="cpu",
        dtype=torch.float32,
        attn_implementation=run["attn_implementation"],
        **run["overrides"],
    )


def replay(model: BeaconForCausalLM, run: dict) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Feed every recorded call's ids; return per call (logits, memory size, our window steps)."""
    if run["kind"] == "train":
        model.train()
    model.memory.reset()
    recorded = []
    plan_step = model.memory.plan_step
    steps: list = []

    def recording_plan_step():
        plan = plan_step()
        steps.append(plan)
        return plan

    model.memory.plan_step = recording_plan_step
    try:
        for call in run["calls"]:
            ids = torch.tensor([call["input_ids"]])
            steps = []
            out = model(ids, labels=ids) if run["kind"] == "train" else model(ids)
            recorded.append((out, model.memory.size(), steps))
    finally:
        del model.memory.plan_step
    return recorded


def ids_of(scenarios: dict, kind: str | None = None) -> list[str]:
    return [key for key, run in scenarios.items() if kind is None or run["kind"] == kind]


@pytest.mark.parametrize("key", ids_of(SCENARIOS))
def test_logits_memory_and_ratios_per_call(key):
    run = SCENARIOS[key]
    model = load(run)
    results = replay(model, run)
    assert len(results) == run["n_forward_calls"] == len(run["calls"])
    for index, (call, (out, size, _)) in enumerate(zip(run["calls"], results, strict=True)):
        expected = reference_logits()[call["logits_key"]]
        assert list(expected.shape) == call["logits_shape"]
        rows = expected.shape[1]
        assert out.logits.shape[1] >= rows, f"call {index}"
        torch.testing.assert_close(
            out.logits[:, -rows:],
            expected,
            atol=ATOL,
            rtol=0,
            msg=lambda m, i=index: f"call {i}: {m}",
        )
        assert list(size) == call["memory_after"], f"call {index}"
    assert list(model.memory.size()) == run["final_memory"]
    assert model.memory.ratios == run["ratios"]
    if run["kind"] == "generate":
        # each decoding call fed the argmax of the previous call's last row
        fed = [call["input_ids"][0] for call in run["calls"][1:]]
        greedy = [int(out.logits[0, -1].argmax()) for out, _, _ in results]
        assert greedy[:-1] == fed
        assert greedy == run["generated_ids"]


@pytest.mark.parametrize("key", ids_of(SCENARIOS, "generate"))
def test_generated_ids(key):
    run = SCENARIOS[key]
    model = load(run)
    n = run["max_new_tokens"]
    settings = GenerationSettings(max_new_tokens=n, min_new_tokens=n)
    generated = generate(model, torch.tensor([run["prompt_ids"]]), settings)
    assert generated == run["generated_ids"]
    assert model.memory.ratios == run["ratios"]
    assert list(model.memory.size()) == run["final_memory"]


@pytest.mark.parametrize("key", ids_of(SCENARIOS, "train"))
def test_training_loss(key):
    run = SCENARIOS[key]
    ((out, size, _),) = replay(load(run), run)
    torch.testing.assert_close(
        out.loss, torch.tensor(run["loss"]), rtol=LOSS_RTOL, atol=0, check_dtype=False
    )
    torch.testing.assert_close(
        out.batch_loss, torch.tensor(run["batch_loss"]), rtol=LOSS_RTOL, atol=0, check_dtype=False
    )
    assert list(size) == run["final_memory"]


# Packed parallel windows are an optimisation of the reference we do not copy: the numbers are
# the sequential ones (compared above), but its internal steps differ.
SEQUENTIAL = {k: r for k, r in SCENARIOS.items() if r["overrides"]["beacon_parallel_window"] == 1}


@pytest.mark.parametrize("key", ids_of(SEQUENTIAL))
def test_window_steps_match(key):
    """Every internal window step feeds the same ids at the same positions as the reference."""
    run = SCENARIOS[key]
    for index, (call, (_, _, steps)) in enumerate(
        zip(run["calls"], replay(load(run), run), strict=True)
    ):
        assert len(steps) == len(call["steps"]), f"call {index}"
        for number, (ours, theirs) in enumerate(zip(steps, call["steps"], strict=True)):
            where = f"call {index} step {number}"
            assert ours.input_ids[0].tolist() == theirs["fed_ids"], where
            assert ours.past_length == theirs["mem_before"], where
            assert ours.beacon_size == theirs["beacon_size"], where
            positions = theirs["position_ids"]
            assert len(positions) == ours.past_length + len(theirs["fed_ids"]), where
            assert ours.positions.tolist() == positions[ours.past_length :], where
            assert positions[: ours.past_length] == list(range(ours.past_length)), where
            beacons = [i for i, t in enumerate(theirs["fed_ids"]) if t == BEACON_ID]
            assert ours.is_beacon.nonzero().flatten().tolist() == beacons, where
