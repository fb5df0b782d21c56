"""Every Activation Beacon setting, under the reference implementation's own `config.json` keys.

The released checkpoints store these fields next to the base model's fields in `config.json`; we
read and write exactly those keys so a checkpoint saved here loads in the reference and back.
Validation happens once, here, so the streaming code can trust its inputs and every error names
the field that is wrong.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ATTENTION_SCHEMES = ("segmentation", "step-expansion", "full-coverage")
POSITIONS = ("interleave", "append")
EMBED_INITS = ("eos", "bos")
PARAMS = ("q", "k", "v", "o")
_FIXED_MIXES = ("step-random", "instance-random", "sequence")
_ADAPT = re.compile(r"^adapt-(\d+)$")


class BeaconConfigError(ValueError):
    """A beacon setting is invalid; the message names the `config.json` field."""


@dataclass
class BeaconConfig:
    """The beacon settings (defaults are the reference's `configuration_*.py` defaults).

    `beacon_ratio_mix` also accepts `fixed-N` (always ratio N, whatever `beacon_ratio` lists): the
    document engine pins a per-document ratio this way so a cached condensed prefix stays valid.
    """

    beacon_window: int = 1024
    beacon_stride: int = 1024
    beacon_attn: str = "full-coverage"
    beacon_ratio: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    beacon_ratio_mix: str = "step-random"
    beacon_param: list[str] = field(default_factory=list)
    beacon_embed_init: str = "eos"
    beacon_sink_size: int = 0
    beacon_attend_prev: bool = True
    beacon_pos: str = "interleave"
    beacon_parallel_window: int = 1

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise BeaconConfigError(f"{name}: {problem} (got {getattr(self, name)!r})")

        if isinstance(self.beacon_ratio, int):
            self.beacon_ratio = [self.beacon_ratio]
        self.beacon_ratio = [int(r) for r in self.beacon_ratio]
        self.beacon_param = list(self.beacon_param)
        for name in ("beacon_window", "beacon_stride", "beacon_parallel_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        if not isinstance(self.beacon_sink_size, int) or self.beacon_sink_size < 0:
            fail("beacon_sink_size", "must be an integer >= 0")
        if self.beacon_stride > self.beacon_window:
            fail("beacon_stride", f"must not exceed beacon_window={self.beacon_window}")
        if self.beacon_attn not in ATTENTION_SCHEMES:
            fail("beacon_attn", f"unknown scheme; choose one of {', '.join(ATTENTION_SCHEMES)}")
        if self.beacon_pos not in POSITIONS:
            fail("beacon_pos", f"unknown position; choose one of {', '.join(POSITIONS)}")
        if self.beacon_embed_init not in EMBED_INITS:
            fail("beacon_embed_init", f"choose one of {', '.join(EMBED_INITS)}")
        unknown = [p for p in self.beacon_param if p not in PARAMS]
        if unknown:
            fail("beacon_param", f"unknown projection(s) {unknown}; allowed: {', '.join(PARAMS)}")
        if not self.beacon_ratio:
            fail("beacon_ratio", "needs at least one ratio")
        for ratio in self.beacon_ratio:
            if ratio < 0:
                fail("beacon_ratio", "ratios must be >= 0 (0 keeps raw activations)")
            if ratio > 0 and self.beacon_stride % ratio:
                fail(
                    "beacon_ratio",
                    f"ratio {ratio} does not divide beacon_stride={self.beacon_stride}",
                )
        self.parse_ratio_mix()
        fixed = self.fixed_ratio
        if fixed is not None and fixed > 0 and self.beacon_stride % fixed:
            fail("beacon_ratio_mix", f"ratio {fixed} does not divide beacon_stride")
        if self.beacon_pos == "interleave":
            if self.beacon_stride != self.beacon_window:
                fail("beacon_stride", "interleave needs beacon_stride == beacon_window")
            if self.beacon_attn != "full-coverage":
                # The reference masks the wrong columns (step-expansion) or raises
                # (segmentation) here; no released recipe uses either.
                fail("beacon_attn", "interleave supports only full-coverage")

    def parse_ratio_mix(self) -> tuple[str, int | None]:
        """Split `beacon_ratio_mix` into (kind, argument): ("adapt", 1024), ("fixed", 8)..."""
        mix = self.beacon_ratio_mix
        if mix in _FIXED_MIXES:
            return mix, None
        match = _ADAPT.match(mix)
        if match:
            return "adapt", int(match.group(1))
        match = re.match(r"^fixed-(\d+)$", mix)
        if match:
            return "fixed", int(match.group(1))
        raise BeaconConfigError(
            f"beacon_ratio_mix: unknown mix {mix!r}; choose step-random, instance-random, "
            "sequence, adapt-N or fixed-N"
        )

    @property
    def fixed_ratio(self) -> int | None:
        kind, arg = self.parse_ratio_mix()
        return arg if kind == "fixed" else None

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> BeaconConfig:
        """Read the `beacon_*` keys of a `config.json` dict; other keys are ignored."""
        names = cls.field_names()
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise BeaconConfigError(
                f"{unknown[0]}: not a beacon setting; known: {', '.join(names)}"
            )
        picked = {k: values[k] for k in names if k in values and values[k] is not None}
        picked.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**picked)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> BeaconConfig:
        """A validated copy with some fields changed (e.g. pinning the ratio for a document)."""
        return dataclasses.replace(self, **changes)
