"""The Activation Beacon core: config -> memory -> attention -> model, plus loading and decoding."""

from .checkpoint import CheckpointError, load_beacon_model, resolve_model_dir, save_beacon_model
from .config import BeaconConfig, BeaconConfigError
from .generation import GenerationSettings, generate, generate_tokens
from .memory import BeaconMemory
from .model import BeaconForCausalLM, BeaconOutput

__all__ = [
    "BeaconConfig",
    "BeaconConfigError",
    "BeaconForCausalLM",
    "BeaconMemory",
    "BeaconOutput",
    "CheckpointError",
    "GenerationSettings",
    "generate",
    "generate_tokens",
    "load_beacon_model",
    "resolve_model_dir",
    "save_beacon_model",
]
