"""Loading and saving beacon models in the released checkpoint format.

A checkpoint is a folder (local, or a Hugging Face hub id fetched into the local cache) holding
`config.json` (the base model's fields plus `beacon_*` fields) and safetensors weights. A plain
base model loads too: its beacon parameters are initialised as the reference does. Only
safetensors are read (no pickles), and no remote code runs: the architecture comes from
`model_type`, which must be one we implement.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import MistralForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

from .attention import ATTENTION_IMPLEMENTATIONS
from .config import BeaconConfig
from .model import BeaconForCausalLM

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
}
# The beacon defaults for a base model that has none: the released Qwen2 recipe (method notes §1).
BASE_MODEL_BEACON_DEFAULTS = {
    "beacon_window": 2048,
    "beacon_stride": 2048,
    "beacon_attn": "full-coverage",
    "beacon_ratio": [2, 4, 8],
    "beacon_ratio_mix": "adapt-1024",
    "beacon_param": ["q", "k", "v"],
    "beacon_pos": "interleave",
}
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


class CheckpointError(RuntimeError):
    """A model could not be found or loaded; the message says what to do about it."""


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for `name_or_path`: the folder itself, or the hub snapshot (downloaded once)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json in this folder; is it a model folder?")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: not a folder; give a model folder or a hub id")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such folder, and not a hub id like 'org/model'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as error:  # offline, unknown id, network error: one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(error)
        raise CheckpointError(
            f"{name}: model weights are not available ({why.splitlines()[0]}). Download it on a "
            "machine with network access (huggingface-cli download "
            f"{name}) or point --model at a local folder holding config.json and *.safetensors "
            "(for a small offline model: beacon-apps tiny-model DIR)."
        ) from None


def _read_config(directory: Path) -> dict[str, Any]:
    with open(directory / "config.json", encoding="utf-8") as handle:
        raw = json.load(handle)
    if raw.get("model_type") not in FAMILIES:
        raise CheckpointError(
            f"{directory / 'config.json'}: model_type {raw.get('model_type')!r} is not supported; "
            f"beacon-apps implements {', '.join(FAMILIES)}"
        )
    return raw


def _weight_files(directory: Path) -> list[Path]:
    """The model's own weight files: the shards `model.safetensors.index.json` lists, else
    `model.safetensors`, else `model-*.safetensors` shards. Other safetensors files in the folder
    (an adapter, a copy, an optimizer state) are not weights of this model and are not read."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as handle:
                names = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index}: not a valid weight index ({error})") from None
        files = [directory / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index}: lists {len(missing)} shard(s) not in the folder, e.g. {missing[0]}"
            )
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("model-*.safetensors"))
    if files:
        return files
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.pt*")
    )
    hint = f" (found {', '.join(pickles)}: convert them to safetensors first)" if pickles else ""
    if others:
        hint = f" (found only {', '.join(others)}, which are not named as model weights)"
    raise CheckpointError(
        f"{directory}: no model.safetensors or model-*.safetensors weights{hint}; beacon-apps "
        "loads only safetensors"
    )


def _base_config(directory: Path, model_type: str, fields: dict[str, Any]):
    """The Hugging Face config (and its model on the meta device); errors name the field."""
    try:
        config = CONFIG_MAPPING[model_type].from_dict(fields)
        with torch.device("meta"):
            base = FAMILIES[model_type](config)
    except Exception as error:  # transformers' validators raise many types
        lines = [line.strip() for line in str(error).strip("'\"").splitlines() if line.strip()]
        detail = re.sub(r"^\w+(Error|Exception): ", "", lines[-1] if lines else repr(error))
        field = getattr(error, "field", None)
        if field is None:
            names = re.findall(r"[`'\"]([A-Za-z_]\w*)[`'\"]", str(error))
            field = next((n for n in names if n in fields), names[0] if names else "config")
        raise CheckpointError(
            f"{directory / 'config.json'}: {field}: invalid {model_type} config: {detail}"
        ) from error
    return config, base


def load_beacon_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    **beacon_overrides: Any,
) -> BeaconForCausalLM:
    """Load a released beacon checkpoint or a plain base model (Llama, Qwen2, Mistral).

    Defaults: CUDA in bfloat16 when a GPU is present, else CPU in float32. `beacon_overrides`
    (e.g. `beacon_ratio_mix="adapt-1024"`) replace the checkpoint's beacon settings.
    """
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation: {attn_implementation!r} is not supported; choose "
            f"{' or '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    directory = resolve_model_dir(name_or_path, revision)
    raw = _read_config(directory)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    has_beacon = any(key.startswith("beacon_") for key in raw)
    defaults = {} if has_beacon else BASE_MODEL_BEACON_DEFAULTS
    beacon_config = BeaconConfig.from_dict({**defaults, **raw}, **beacon_overrides)

    model_type = raw["model_type"]
    base_fields = {k: v for k, v in raw.items() if not k.startswith("beacon_") and k != "auto_map"}
    config, base = _base_config(directory, model_type, base_fields)
    model = BeaconForCausalLM(base, beacon_config, attn_implementation=attn_implementation)

    expected = dict(model.state_dict(keep_vars=True))
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key not in expected:
                    unexpected.append(key)
                    continue
                tensor = handle.get_tensor(key).to(dtype=dtype)
                if tensor.shape != expected[key].shape:
                    raise CheckpointError(
                        f"{file.name}: {key} has shape {tuple(tensor.shape)}, the config implies "
                        f"{tuple(expected[key].shape)}"
                    )
                loaded[key] = tensor.to(device)
    if unexpected:
        logger.warning("ignoring %d unused tensors, e.g. %s", len(unexpected), unexpected[:3])
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in loaded and "model.embed_tokens.weight" in loaded:
        loaded["lm_head.weight"] = loaded["model.embed_tokens.weight"]
    missing = set(expected) - set(loaded)
    missing_base = sorted(k for k in missing if "beacon_" not in k)
    if missing_base:
        raise CheckpointError(
            f"{directory}: weights missing for {len(missing_base)} tensors, e.g. {missing_base[:3]}"
        )
    for key in missing:  # beacon parameters: materialise, then initialise below
        loaded[key] = torch.empty(expected[key].shape, dtype=dtype, device=device)
    model.load_state_dict(loaded, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # RoPE tables are buffers built at construction: rebuild them for real (in float32).
    model.model.rotary_emb = type(base.model.rotary_emb)(config=config).to(device)
    model.init_beacon_parameters(missing)
    model.eval()
    logger.info(
        "loaded %s (%s, %s on %s, beacon %s)",
        directory,
        model_type,
        str(dtype).replace("torch.", ""),
        device,
        "from checkpoint" if not missing else f"initialised: {len(missing)} tensors",
    )
    return model


def save_beacon_model(model: BeaconForCausalLM, directory: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` in the released format (atomically)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("auto_map", None)
    config["architectures"] = [FAMILIES[config["model_type"]].__name__]
    config.update(model.beacon_config.to_dict())
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=directory.parent))
    try:
        with open(staging / "config.json", "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True, default=str)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        directory.mkdir(exist_ok=True)
        for item in staging.iterdir():
            item.chmod(0o644)
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
