"""Loading and saving: the released checkpoint format, plain base models, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from beacon_apps.beacon import (
    BeaconConfig,
    BeaconConfigError,
    CheckpointError,
    load_beacon_model,
    save_beacon_model,
)
from beacon_apps.beacon.model import max_positions
from beacon_apps.beacon.tiny import tiny_config

FAMILIES = ("qwen2", "llama", "mistral")
CHECKPOINT = {  # the same tiny checkpoints as test_beacon_core.py (written once per session)
    "beacon_window": 16,
    "beacon_stride": 16,
    "beacon_ratio": [2, 4, 8],
    "beacon_ratio_mix": "step-random",
    "beacon_param": ["q", "k", "v", "o"],
}
PROMPT = torch.tensor([[(7 * i + 3) % 500 + 5 for i in range(45)]])
# What a base model without beacon fields gets: the released Qwen2 recipe (method notes §1).
RELEASED_RECIPE = {
    "beacon_window": 2048,
    "beacon_stride": 2048,
    "beacon_attn": "full-coverage",
    "beacon_ratio": [2, 4, 8],
    "beacon_ratio_mix": "adapt-1024",
    "beacon_param": ["q", "k", "v"],
    "beacon_embed_init": "eos",
    "beacon_sink_size": 0,
    "beacon_attend_prev": True,
    "beacon_pos": "interleave",
    "beacon_parallel_window": 1,
}


def logits_of(model, ids=PROMPT) -> torch.Tensor:
    model.memory.reset()
    model.memory.rng = np.random.default_rng(42)
    return model(ids).logits


def write_base_model(directory: Path, family: str, seed: int = 0, **fields) -> Path:
    """A plain Hugging Face model folder (no beacon fields, no beacon weights)."""
    values = {k: v for k, v in tiny_config(family).items() if not k.startswith("beacon_")}
    values.update(fields)
    model_type = values.pop("model_type")
    values.pop("architectures")
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("base-models")
    return {family: write_base_model(root / family, family) for family in FAMILIES}


# ---------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_identical(tiny_model_dir, tmp_path, family):
    overrides = {"beacon_pos": "append", "beacon_attn": "step-expansion", "beacon_sink_size": 1}
    model = load_beacon_model(tiny_model_dir(family, **CHECKPOINT), **overrides)
    saved = save_beacon_model(model, tmp_path / "saved")
    again = load_beacon_model(saved)

    assert again.beacon_config == model.beacon_config  # overrides are saved with the model
    assert again.config.to_dict() == model.config.to_dict()
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(logits_of(again), logits_of(model))

    # saving the reloaded model writes the same config.json and the same tensors
    resaved = save_beacon_model(again, tmp_path / "resaved")
    config = json.loads((saved / "config.json").read_text())
    assert json.loads((resaved / "config.json").read_text()) == config
    assert {k: config[k] for k in RELEASED_RECIPE} == model.beacon_config.to_dict()
    tensors, tensors_again = (load_file(d / "model.safetensors") for d in (saved, resaved))
    assert tensors.keys() == tensors_again.keys()
    assert all(torch.equal(tensors[k], tensors_again[k]) for k in tensors)


def test_saved_checkpoint_uses_the_released_names(tiny_model_dir, tmp_path):
    model = load_beacon_model(tiny_model_dir("qwen2", **CHECKPOINT))
    saved = save_beacon_model(model, tmp_path / "saved")
    names = set(load_file(saved / "model.safetensors"))
    assert "model.beacon_embed_tokens.weight" in names
    for layer in range(2):
        for proj in ("q", "k", "v", "o"):
            assert f"model.layers.{layer}.self_attn.beacon_{proj}_proj.weight" in names
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    # the base part still loads with plain transformers
    base = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    assert base.config.hidden_size == model.config.hidden_size


def test_save_overwrites_an_existing_checkpoint(tiny_model_dir, tmp_path):
    target = tmp_path / "saved"
    save_beacon_model(load_beacon_model(tiny_model_dir("qwen2", **CHECKPOINT)), target)
    other = load_beacon_model(tiny_model_dir("qwen2", seed=1, **CHECKPOINT))
    save_beacon_model(other, target)
    assert torch.equal(logits_of(load_beacon_model(target)), logits_of(other))
    assert not list(tmp_path.glob(".saving-*"))  # no staging folder left behind


def test_sharded_checkpoint_loads(base_dirs, tmp_path):
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(base_dirs["qwen2"], dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    loaded = load_beacon_model(sharded, beacon_window=16, beacon_stride=16)
    single = load_beacon_model(base_dirs["qwen2"], beacon_window=16, beacon_stride=16)
    assert torch.equal(logits_of(loaded), logits_of(single))


def test_bfloat16_load(tiny_model_dir):
    model = load_beacon_model(tiny_model_dir("qwen2", **CHECKPOINT), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = logits_of(model)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# a plain base model


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_gets_reference_initialisation_and_recipe(base_dirs, family):
    model = load_beacon_model(base_dirs[family])
    assert model.beacon_config.to_dict() == RELEASED_RECIPE
    eos = model.config.eos_token_id
    assert torch.equal(
        model.model.beacon_embed_tokens.weight[0], model.model.embed_tokens.weight[eos]
    )
    for layer in model.model.layers:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            original, copy = getattr(attention, name), getattr(attention, f"beacon_{name}")
            assert torch.equal(copy.weight, original.weight)
            assert copy.weight.data_ptr() != original.weight.data_ptr()  # a copy, not tied
            assert (copy.bias is None) == (original.bias is None)
            if copy.bias is not None:
                assert torch.equal(copy.bias, original.bias)
        assert not hasattr(attention, "beacon_o_proj")
    names = {name for name, _ in model.beacon_parameters()}
    assert "model.beacon_embed_tokens.weight" in names


def test_base_model_initialisation_options(base_dirs, tmp_path):
    model = load_beacon_model(
        base_dirs["llama"], beacon_param=["q", "k", "v", "o"], beacon_embed_init="bos"
    )
    bos = model.config.bos_token_id
    assert torch.equal(
        model.model.beacon_embed_tokens.weight[0], model.model.embed_tokens.weight[bos]
    )
    for layer in model.model.layers:
        assert torch.equal(layer.self_attn.beacon_o_proj.weight, layer.self_attn.o_proj.weight)
    # an eos list: the first id's row (as the reference)
    listed = write_base_model(tmp_path / "eos-list", "qwen2", eos_token_id=[5, 2])
    model = load_beacon_model(listed)
    assert torch.equal(
        model.model.beacon_embed_tokens.weight[0], model.model.embed_tokens.weight[5]
    )


def test_beacon_fields_in_a_base_config_are_used(base_dirs, tmp_path):
    folder = tmp_path / "with-fields"
    shutil.copytree(base_dirs["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(beacon_window=32, beacon_stride=32, beacon_ratio=[4], beacon_pos="append")
    (folder / "config.json").write_text(json.dumps(config))
    settings = load_beacon_model(folder).beacon_config
    assert (settings.beacon_window, settings.beacon_ratio, settings.beacon_pos) == (
        32,
        [4],
        "append",
    )
    assert settings.beacon_param == []  # the reference's config default, not the recipe's
    assert settings.beacon_ratio_mix == "step-random"


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_is_plug_and_play(base_dirs, family):
    """An initialised beacon on a base model reads short inputs exactly like the base model."""
    ids = PROMPT[:, :20]
    model = load_beacon_model(base_dirs[family], beacon_pos="append")
    base = AutoModelForCausalLM.from_pretrained(base_dirs[family], dtype=torch.float32)
    with torch.no_grad():
        expected = base(ids).logits.float()
    assert torch.equal(model(ids).logits, expected)


def test_tied_embeddings_round_trip(tmp_path):
    folder = write_base_model(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    model = load_beacon_model(folder, beacon_window=16, beacon_stride=16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    again = load_beacon_model(save_beacon_model(model, tmp_path / "saved"))
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(logits_of(again), logits_of(model))


# ---------------------------------------------------------------------------------------------
# errors that say what to do


def test_pickle_only_checkpoint_is_refused(base_dirs, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(base_dirs["qwen2"] / "config.json", folder / "config.json")
    state = load_file(base_dirs["qwen2"] / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors") as error:
        load_beacon_model(folder)
    assert "pytorch_model.bin" in str(error.value)


@pytest.mark.parametrize("model_type", ["gpt2", None])
def test_unknown_model_type_is_refused(base_dirs, tmp_path, model_type):
    folder = tmp_path / "other"
    shutil.copytree(base_dirs["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type") as error:
        load_beacon_model(folder)
    assert "qwen2" in str(error.value)  # names what is supported


def test_missing_folder_and_non_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_beacon_model(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="config.json"):
        load_beacon_model(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_beacon_model(tmp_path / "file.txt")


def test_offline_hub_id_points_at_model_option(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as error:
        load_beacon_model("namespace-Pt/beacon-qwen-2-7b-instruct")
    message = str(error.value)
    assert "--model" in message
    assert "HF_HUB_OFFLINE" in message
    assert "namespace-Pt/beacon-qwen-2-7b-instruct" in message


def test_weights_that_do_not_match_the_config(base_dirs, tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(base_dirs["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load_beacon_model(folder)
    config["intermediate_size"] = 128
    config["num_hidden_layers"] = 3
    config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        load_beacon_model(folder)


BAD_SETTINGS = [
    ({"beacon_ratio": [2, 3]}, "beacon_ratio"),  # 3 does not divide the window (= stride)
    ({"beacon_pos": "append", "beacon_stride": 8, "beacon_ratio": [16]}, "beacon_ratio"),
    ({"beacon_ratio": []}, "beacon_ratio"),
    ({"beacon_ratio": [-2]}, "beacon_ratio"),
    ({"beacon_ratio_mix": "fixed-3"}, "beacon_ratio_mix"),
    ({"beacon_ratio_mix": "adapt"}, "beacon_ratio_mix"),
    ({"beacon_ratio_mix": "banana"}, "beacon_ratio_mix"),
    ({"beacon_attn": "banana"}, "beacon_attn"),
    ({"beacon_attn": "step-expansion"}, "beacon_attn"),  # interleave supports full-coverage only
    ({"beacon_stride": 8}, "beacon_stride"),  # interleave needs stride == window
    ({"beacon_pos": "append", "beacon_stride": 32}, "beacon_stride"),  # stride > window
    ({"beacon_pos": "middle"}, "beacon_pos"),
    ({"beacon_param": ["q", "x"]}, "beacon_param"),
    ({"beacon_embed_init": "pad"}, "beacon_embed_init"),
    ({"beacon_sink_size": -1}, "beacon_sink_size"),
    ({"beacon_window": 0}, "beacon_window"),
    ({"beacon_parallel_window": 0}, "beacon_parallel_window"),
    ({"beacon_windw": 16}, "beacon_windw"),  # a typo is not silently ignored
]


@pytest.mark.parametrize(("overrides", "field"), BAD_SETTINGS, ids=[f for _, f in BAD_SETTINGS])
def test_bad_settings_name_the_field(tiny_model_dir, overrides, field):
    with pytest.raises(BeaconConfigError) as error:
        load_beacon_model(tiny_model_dir("qwen2", **CHECKPOINT), **overrides)
    assert str(error.value).startswith(field)
    assert isinstance(error.value, ValueError)


def test_bad_settings_in_config_json(tiny_model_dir, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_model_dir("qwen2", **CHECKPOINT), folder)
    config = json.loads((folder / "config.json").read_text())
    config["beacon_ratio"] = [5]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BeaconConfigError, match="^beacon_ratio"):
        load_beacon_model(folder)


def test_beacon_config_accepts_the_reference_values():
    config = BeaconConfig(beacon_ratio=8, beacon_window=64, beacon_stride=64)  # int -> list
    assert config.beacon_ratio == [8]
    assert BeaconConfig.from_dict({"beacon_ratio_mix": None, "hidden_size": 3}) == BeaconConfig()
    assert BeaconConfig(beacon_ratio_mix="adapt-1024").parse_ratio_mix() == ("adapt", 1024)
    assert BeaconConfig(beacon_ratio_mix="fixed-4").fixed_ratio == 4
    with pytest.raises(BeaconConfigError, match="^beacon_stride"):
        BeaconConfig().replace(beacon_stride=512)


def test_bad_inputs_raise_value_error(tiny_model_dir):
    model = load_beacon_model(tiny_model_dir("qwen2", **CHECKPOINT))
    with pytest.raises(ValueError, match="empty"):
        model(torch.empty(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, 2, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="labels"):
        model(PROMPT, labels=PROMPT[:, :-1])
    model.memory.reset()
    model(PROMPT)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.cat([PROMPT, PROMPT]))


def test_unknown_attention_implementation(tiny_model_dir):
    with pytest.raises(ValueError, match="attn_implementation"):
        model = load_beacon_model(
            tiny_model_dir("qwen2", **CHECKPOINT), attn_implementation="flash"
        )
        model(PROMPT)


def test_only_the_models_weight_files_are_read(tiny_model_dir, tmp_path):
    source = tiny_model_dir("qwen2", **CHECKPOINT)
    expected = logits_of(load_beacon_model(source))
    folder = tmp_path / "with-strays"
    shutil.copytree(source, folder)
    stray = {"model.embed_tokens.weight": torch.zeros(3, 3), "model.norm.weight": torch.zeros(64)}
    save_file(stray, str(folder / "adapter_model.safetensors"))
    save_file(stray, str(folder / "model (copy).safetensors"))
    assert torch.equal(logits_of(load_beacon_model(folder)), expected)
    # unindexed shards named model-*.safetensors load; the strays beside them still do not
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    (folder / "model.safetensors").unlink()
    save_file({k: state[k] for k in names[::2]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[1::2]}, str(folder / "model-00002-of-00002.safetensors"))
    assert torch.equal(logits_of(load_beacon_model(folder)), expected)
    for shard in folder.glob("model-*.safetensors"):
        shard.unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors") as error:
        load_beacon_model(folder)
    assert "model.safetensors" in str(error.value)


def test_an_index_naming_missing_shards_is_refused(base_dirs, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base_dirs["qwen2"], dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="100KB"
    )
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.index.json") as error:
        load_beacon_model(sharded)
    assert shard.name in str(error.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_hidden_layers": 3, "layer_types": ["full_attention"] * 2}, "num_hidden_layers"),
        ({"num_attention_heads": "four"}, "num_attention_heads"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters"),
    ],
    ids=["layer-types", "type", "rope"],
)
def test_invalid_config_json_names_the_folder_and_field(base_dirs, tmp_path, change, field):
    folder = tmp_path / "bad-config"
    shutil.copytree(base_dirs["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_beacon_model(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / 'config.json'}: {field}: invalid llama config")


@pytest.mark.parametrize("name", ["flash_attention_2", "flex", "SDPA"])
def test_attention_implementation_is_checked_at_load(base_dirs, name):
    with pytest.raises(ValueError, match="^attn_implementation: .* choose sdpa or eager"):
        load_beacon_model(base_dirs["qwen2"], attn_implementation=name)


ROPE_SCALINGS = [  # (rope parameters, max_position_embeddings, positional reach)
    (None, 512, 512),
    # llama3 (Llama 3.1 style): max_position_embeddings already states the extended length
    (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 128},
        1024,
        1024,
    ),
    # llama3 scaling added to a model whose max_position_embeddings is the original length
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 512, 4096),
    # yarn as Qwen2 documents it: original == max_position_embeddings, the factor extends it
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 512, 2048),
    ({"rope_type": "linear", "factor": 2.0}, 512, 1024),
]  # fmt: skip


@pytest.mark.parametrize(("rope", "positions", "reach"), ROPE_SCALINGS)
def test_positional_reach_under_rope_scaling(tmp_path, rope, positions, reach):
    fields = {"max_position_embeddings": positions}
    if rope is not None:
        fields["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    folder = write_base_model(tmp_path / "scaled", "llama", **fields)
    model = load_beacon_model(folder, beacon_window=16, beacon_stride=16)
    assert max_positions(model.config) == reach
    assert model.memory.max_positions == reach
