"""The demo beacon model shipped inside the package, and the offline default that uses it.

These run the real bundled weights (12M parameters, CPU, seconds): the README's main command must
answer a question about a real PDF on a machine without network.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beacon_apps.beacon import load_beacon_model
from beacon_apps.beacon.checkpoint import CheckpointError
from beacon_apps.default_model import DEMO_MODEL_DIR, MODEL_ENV, default_model
from beacon_apps.engine import BeaconEngine

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PDF = ROOT / "examples" / "python-reference-passkey.pdf"
EXAMPLE_KEY = "52445"  # scripts/make_demo_pdf.py --seed 7 hides this key on page 7


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, an empty hub cache and no model named in the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(MODEL_ENV, raising=False)
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_bundled_model_is_small_safetensors_and_loads_natively():
    files = {f.name: f.stat().st_size for f in DEMO_MODEL_DIR.iterdir()}
    assert sum(files.values()) <= 30 * 2**20
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".py"))]
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["beacon_ratio"] == [2, 4, 8, 16, 32] and config["beacon_window"] == 128
    model = load_beacon_model(DEMO_MODEL_DIR, dtype=torch.float32)
    assert model.beacon_config.beacon_window == 128
    assert (DEMO_MODEL_DIR / "README.md").is_file()  # the model card


def test_offline_default_is_the_bundled_model(offline, caplog):
    with caplog.at_level(logging.WARNING, logger="beacon_apps.default_model"):
        assert default_model() == DEMO_MODEL_DIR
    assert "bundled demo model" in caplog.text and "namespace-Pt" in caplog.text


def test_the_environment_names_the_default(offline, monkeypatch):
    monkeypatch.setenv(MODEL_ENV, "/some/where")
    assert default_model() == "/some/where"


def test_demo_alias_names_the_bundled_model(offline, monkeypatch):
    monkeypatch.setenv(MODEL_ENV, "demo")
    assert default_model() == DEMO_MODEL_DIR
    assert BeaconEngine("demo").model_name == str(DEMO_MODEL_DIR)


def test_a_named_model_never_falls_back(offline):
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model"):
        BeaconEngine("no-such-org/no-such-model")


def test_demo_model_finds_the_pass_key_in_the_example_pdf(offline, tmp_path):
    """Question-aware ratios (the key's window at ratio 2, the rest harder, within the memory of
    uniform ratio 16): the demo recalls the whole key. Uniform 16 is beyond it (docs/reproduction.md)."""
    engine = BeaconEngine(cache_dir=tmp_path / "cache")
    assert engine.model_name == str(DEMO_MODEL_DIR)
    answer = engine.ask(
        EXAMPLE_PDF, "What is the pass key?", max_new_tokens=16, ratio_plan="question"
    )
    assert EXAMPLE_KEY in answer.text
    assert answer.prompt_tokens > 8 * 512  # the whole PDF, far beyond the native window
    assert answer.compression_ratio == 16 and min(answer.window_ratios) == 2


def test_readme_main_command_answers_offline(tmp_path):
    """`beacon-apps ask --question-aware examples/python-reference-passkey.pdf "What is the pass
    key?"`, the README's main command, on a machine that cannot fetch the released model."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "BEACON_APPS_CACHE": str(tmp_path / "cache"),
    }
    env.pop(MODEL_ENV, None)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "beacon_apps.cli", "ask", "--question-aware"),
            *(str(EXAMPLE_PDF), "What is the pass key?"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert EXAMPLE_KEY in done.stdout
    assert "bundled demo model" in done.stderr
