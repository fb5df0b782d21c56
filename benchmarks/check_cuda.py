"""Numerical checks of the beacon core on a GPU (CI has none; run this where one is lent).

    python benchmarks/check_cuda.py [--dtype bfloat16|float32]

On a tiny random-weight model moved to CUDA: (1) below one window with append mode the beacon
model equals the Hugging Face base model; (2) one call equals window-aligned and ragged chunks;
(3) sdpa (flash / lower-right causal) agrees with eager; (4) the reference goldens replay on
CUDA in float32. Prints one line per check with the largest absolute difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from beacon_apps.beacon import load_beacon_model
    from beacon_apps.beacon.config import BeaconConfig
    from beacon_apps.beacon.tiny import write_tiny_model

    device = args.device
    folder = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny", beacon_ratio_mix="step-random")
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    failures = 0

    def report(name: str, difference: float, limit: float) -> None:
        nonlocal failures
        ok = difference <= limit
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {name:58} max |diff| {difference:.2e} (limit {limit:.0e})")

    ids = torch.randint(0, 500, (1, 48), device=device)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    beacon = load_beacon_model(folder, device=device, dtype=dtype, beacon_pos="append")
    with torch.no_grad():
        reference = base(ids).logits.float()
    report(
        "append, < 1 window vs HF base model",
        (beacon(ids).logits - reference).abs().max().item(),
        tolerance,
    )

    long_ids = torch.randint(0, 500, (1, 1500), device=device)
    for implementation in ("sdpa", "eager"):
        model = load_beacon_model(
            folder, device=device, dtype=dtype, attn_implementation=implementation
        )
        whole = model(long_ids).logits
        if implementation == "sdpa":
            sdpa_whole = whole
        for name, step in (("window-aligned", 64), ("ragged", 37)):
            model.memory.reset()
            model.memory.rng = np.random.default_rng(42)
            parts = [model(long_ids[:, a : a + step]).logits for a in range(0, 1500, step)]
            limit = 0.0 if name == "window-aligned" and dtype == torch.float32 else tolerance
            report(
                f"{implementation}: one call vs {name} chunks",
                (torch.cat(parts, 1) - whole).abs().max().item(),
                max(limit, 1e-5),
            )
    report("sdpa vs eager over 1500 tokens", (sdpa_whole - whole).abs().max().item(), tolerance)

    goldens = json.loads((ROOT / "tests/data/reference/goldens.json").read_text())
    logits = load_file(str(ROOT / "tests/data/reference/logits.safetensors"))
    fields = set(BeaconConfig.field_names())
    worst = 0.0
    for scenario in goldens["scenarios"].values():
        overrides = {k: v for k, v in scenario["overrides"].items() if k in fields}
        model = load_beacon_model(
            ROOT / "tests/data/reference" / scenario["family"],
            device=device,
            dtype=torch.float32,
            attn_implementation=scenario["attn_implementation"],
            **overrides,
        )
        if scenario.get("loss") is not None:
            continue
        for call in scenario["calls"]:
            out = model(torch.tensor([call["input_ids"]], device=device)).logits.cpu()
            expected = logits[call["logits_key"]]
            worst = max(worst, (out[:, -expected.shape[1] :] - expected).abs().max().item())
            if list(model.memory.size()) != call["memory_after"]:
                print(
                    "BAD memory size", scenario["family"], call["memory_after"], model.memory.size()
                )
                failures += 1
    report("reference goldens replayed on CUDA (float32)", worst, 1e-4)
    print("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
