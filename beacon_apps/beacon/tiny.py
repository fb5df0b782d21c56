"""Tiny random-weight beacon checkpoints with an offline tokenizer, for tests and offline demos.

`write_tiny_model(DIR)` (CLI: `beacon-apps tiny-model DIR`) writes a complete model folder in the
released format: `config.json` with beacon fields, `model.safetensors` and a byte-level BPE
tokenizer trained here with `tokenizers` (so it encodes any text) with a ChatML chat template.
Nothing is downloaded. The weights are random: the model reads and writes, but says nothing
meaningful.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
    },
    "mistral": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "sliding_window": None,
    },
}


def _training_corpus() -> list[str]:
    """Deterministic English text that ships with Python: stdlib module docstrings."""
    import argparse
    import codecs
    import collections
    import json as json_module
    import logging
    import string
    import textwrap
    import this  # noqa: F401  (prints the Zen of Python on first import; it is in `this.s`)

    zen = codecs.decode(this.s, "rot13")
    modules = (argparse, collections, json_module, logging, string, textwrap, inspect)
    texts = [zen] + [inspect.getdoc(m) or "" for m in modules]
    texts += [inspect.getdoc(obj) or "" for m in modules for _, obj in inspect.getmembers(m)][:400]
    return [t for t in texts if t]


def train_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes) wrapped for transformers."""
    import contextlib
    import io

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with contextlib.redirect_stdout(io.StringIO()):
        corpus = _training_corpus()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_config(family: str = "qwen2", vocab_size: int = 512, **beacon: Any) -> dict[str, Any]:
    """config.json content of a tiny model (2 layers, hidden 64, GQA 4/2 heads)."""
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"family: choose one of {', '.join(FAMILY_DEFAULTS)} (got {family!r})")
    config = {
        **FAMILY_DEFAULTS[family],
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "beacon_window": 64,
        "beacon_stride": 64,
        "beacon_attn": "full-coverage",
        "beacon_ratio": [2, 4, 8, 16, 32],
        "beacon_ratio_mix": "adapt-256",
        "beacon_param": ["q", "k", "v"],
        "beacon_embed_init": "eos",
        "beacon_sink_size": 0,
        "beacon_attend_prev": True,
        "beacon_pos": "interleave",
        "beacon_parallel_window": 1,
    }
    config.update(beacon)
    return config


def write_tiny_model(
    directory: str | os.PathLike, family: str = "qwen2", seed: int = 0, **beacon: Any
) -> Path:
    """Write a tiny random-weight beacon checkpoint + tokenizer to `directory` and return it.

    Beacon projections are the originals plus noise, so a test can tell them apart.
    """
    from safetensors.torch import save_file

    from .checkpoint import load_beacon_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer()
    tokenizer.save_pretrained(directory)
    config = tiny_config(family, vocab_size=len(tokenizer), **beacon)
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config["pad_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config["bos_token_id"] = config["pad_token_id"]
    with open(directory / "config.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)

    # Build the model (beacon parameters initialised from the base), then randomise everything.
    generator = torch.Generator().manual_seed(seed)
    base_only = {k: v for k, v in config.items() if not k.startswith("beacon_")}
    shapes = _base_shapes(base_only)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[name] = 0.05 * torch.randn(shape, generator=generator)
    save_file(state, str(directory / "model.safetensors"))
    model = load_beacon_model(directory, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for _, parameter in model.beacon_parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    from .checkpoint import save_beacon_model

    save_beacon_model(model, directory)
    generation = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
    with open(directory / "generation_config.json", "w", encoding="utf-8") as handle:
        json.dump(generation, handle, indent=2)
    return directory


def _base_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .checkpoint import FAMILIES

    hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    with torch.device("meta"):
        model = FAMILIES[config["model_type"]](hf_config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}
