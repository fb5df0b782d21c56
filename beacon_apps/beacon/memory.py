"""The streaming beacon memory: what a beacon model remembers of everything it has read.

Per layer the memory holds `[sink | condensed beacon activations | raw activations of the open
window]`. Every entry sits at the RoPE position equal to its index in that list (the reference
re-rotates the whole memory with positions 0..n at every forward pass; entries never move once
they are in memory, so we keep keys rotated and only rotate what is new). The open window's raw
keys are also kept un-rotated, because when the window closes its beacons move to new positions.

`BeaconMemory.plan_step` decides what the next forward pass feeds (raw tokens, inserted beacon
tokens, positions, mask) exactly as the reference's `Memory._step` does; `commit` stores the new
keys/values afterwards (the reference's `update_memory`). The model runs the transformer in
between. See `docs/beacon_method.md` sections 4.3-4.7 for the rules implemented here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .config import BeaconConfig

IGNORE_INDEX = -100


class _Growable:
    """A `[batch, heads, length, dim]` tensor that grows along `length`.

    Inference writes in place into geometrically grown storage (no re-allocation per window);
    with autograd on, writes are functional (`torch.cat`) so gradients flow through the memory.
    """

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.length = 0

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, :, : self.length]

    def write(self, start: int, values: torch.Tensor) -> None:
        """Set entries `[start, start + n)` to `values` and drop everything after them."""
        end = start + values.shape[2]
        if torch.is_grad_enabled():
            head = [] if self.data is None or start == 0 else [self.data[:, :, :start]]
            self.data = torch.cat([*head, values], dim=2)
        else:
            self._reserve(end, values)
            self.data[:, :, start:end].copy_(values)
        self.length = end

    def truncate(self, length: int) -> None:
        self.length = length

    def _reserve(self, length: int, like: torch.Tensor) -> None:
        if self.data is not None and self.data.shape[2] >= length and not self.data.requires_grad:
            return
        capacity = max(length, 2 * (0 if self.data is None else self.data.shape[2]), 64)
        shape = (*like.shape[:2], capacity, like.shape[3])
        grown = like.new_empty(shape)
        if self.data is not None and self.length:
            grown[:, :, : self.length].copy_(self.data[:, :, : self.length].detach())
        self.data = grown


class LayerMemory:
    """One decoder layer's memory: rotated keys and values in one layout, raw pre-RoPE keys aside."""

    def __init__(self) -> None:
        self.keys = _Growable()
        self.values = _Growable()
        self.raw_keys = _Growable()  # pre-RoPE keys of the open window's raw section

    def past_view(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.keys.length == 0:
            return None, None
        return self.keys.view(), self.values.view()

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Past + new (rotated) keys and values for one attention call; the memory is unchanged.

        Without autograd the new entries are written into spare capacity after the past (no copy
        of the whole memory per window); `BeaconMemory.commit` decides what stays.
        """
        past = self.keys.length
        if past == 0:
            return keys, values
        self.keys.write(past, keys)
        self.values.write(past, values)
        all_keys, all_values = self.keys.view(), self.values.view()
        self.keys.truncate(past)
        self.values.truncate(past)
        return all_keys, all_values

    def nbytes(self) -> int:
        return sum(
            0 if b.data is None else b.length * b.data[:, :, :1].numel() * b.data.element_size()
            for b in (self.keys, self.values, self.raw_keys)
        )


@dataclass
class StepPlan:
    """What one forward pass over one window (or part of one) feeds to the transformer."""

    input_ids: torch.Tensor  # [batch, n] raw ids, beacon tokens as id == vocab_size
    labels: torch.Tensor | None  # [batch, n] targets (already shifted), -100 where none
    is_beacon: torch.Tensor  # [n] bool
    positions: torch.Tensor  # [n] RoPE positions of the fed tokens
    mask: torch.Tensor | None  # [n, past + n] bool (True = visible); None = causal
    past_length: int
    beacon_size: int  # >0 beacons fed, 0 none, -1 ratio 0 (raw kept as memory)
    ratio: int
    closes_window: bool
    next_start: int
    next_end: int
    interleave_remainder: int


class BeaconMemory:
    """The streaming state of a beacon model: cursors, ratio choices and per-layer activations.

    One instance belongs to one model. `reset()` forgets the stream (not the random generator,
    as in the reference); `snapshot()`/`restore()` copy the whole state, so a condensed document
    can be kept and resumed later with identical results.
    """

    def __init__(self, config: BeaconConfig, num_layers: int, vocab_size: int, max_positions: int):
        self.config = config
        self.num_layers = num_layers
        self.beacon_token_id = vocab_size
        self.max_positions = max_positions
        self.rng = np.random.default_rng(42)
        self.training = False
        # Training keeps each sequence's last window raw, as the reference does. False trains it
        # the way inference reads it: in interleave mode a question and its answer then sit among
        # beacons, as they do when a user asks (see training.TrainConfig.raw_last_window).
        self.raw_last_window = True
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything read so far (keeps the random generator, as the reference does).

        The ratio schedule is cleared too: it names windows of one stream (window k of *this*
        reading), so a schedule left over from a previous request would misplace its ratios.
        Callers set it after `reset()`, as the engine does.
        """
        self.input_ids: torch.Tensor | None = None  # [batch, L] all ids received, on CPU
        self.labels: torch.Tensor | None = None
        self.start = 0  # first raw token of the open window
        self.end = 0  # first raw token not yet fed
        self.step_index = 0
        self.window_closed = True  # did the previous step close a window
        self.window_ratio = 0  # interleave: the open window's ratio
        self.interleave_remainder = 0
        self.chosen_ratio: int | None = None  # instance-random / adapt: fixed after reset
        self.sequence_index = 0
        self.used_zero_ratio = False
        self.window_indicator: list[int] = []  # open window's raw section: 0 raw, 1 beacon
        self.ratios: list[int] = []  # ratio of every window started since reset
        self.ratio_schedule: list[int] | None = None  # window k uses schedule[k] if set
        self.sink_length = 0
        self.beacon_length = 0
        self.raw_length = 0
        self.layers = [LayerMemory() for _ in range(self.num_layers)]

    @property
    def num_tokens(self) -> int:
        """Raw tokens received since reset."""
        return 0 if self.input_ids is None else self.input_ids.shape[1]

    @property
    def pending(self) -> bool:
        return self.end < self.num_tokens

    def size(self) -> tuple[int, int, int]:
        """(sink, condensed beacons, raw) entries per layer, like the reference's get_memory_size."""
        return self.sink_length, self.beacon_length, self.raw_length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def snapshot(self) -> BeaconMemory:
        """A deep copy of the whole state (tensors cloned, rng state included)."""
        clone = copy.copy(self)
        clone.rng = copy.deepcopy(self.rng)
        clone.window_indicator = list(self.window_indicator)
        clone.ratios = list(self.ratios)
        clone.ratio_schedule = None if self.ratio_schedule is None else list(self.ratio_schedule)
        clone.layers = []
        for layer in self.layers:
            new = LayerMemory()
            for name in ("keys", "values", "raw_keys"):
                src, dst = getattr(layer, name), getattr(new, name)
                view = src.view()
                if view is not None:
                    dst.data = view.detach().clone()
                    dst.length = src.length
            clone.layers.append(new)
        for name in ("input_ids", "labels"):
            value = getattr(self, name)
            setattr(clone, name, None if value is None else value.clone())
        return clone

    def restore(self, snapshot: BeaconMemory) -> None:
        """Continue from `snapshot` (which stays untouched and can be restored again)."""
        state = snapshot.snapshot()
        self.__dict__.update(state.__dict__)

    _SCALARS = (
        "start", "end", "step_index", "window_closed", "window_ratio", "interleave_remainder",
        "chosen_ratio", "sequence_index", "used_zero_ratio", "window_indicator", "ratios",
        "sink_length", "beacon_length", "raw_length",
    )  # fmt: skip

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The whole state as tensors + JSON-able metadata (for the on-disk document cache)."""
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            for name in ("keys", "values", "raw_keys"):
                view = getattr(layer, name).view()
                if view is not None:
                    tensors[f"layer{i}.{name}"] = view.detach().contiguous()
        for name in ("input_ids", "labels"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        meta = {name: getattr(self, name) for name in self._SCALARS}
        meta["rng"] = self.rng.bit_generator.state
        meta["config"] = self.config.to_dict()
        meta["num_layers"] = self.num_layers
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict, device=None) -> None:
        """Load what `export_state` wrote; raises ValueError if it does not fit this model."""
        if meta.get("num_layers") != self.num_layers or meta.get("config") != self.config.to_dict():
            raise ValueError("memory state was written for another model or beacon settings")
        self.reset()
        for name in self._SCALARS:
            setattr(self, name, meta[name])
        self.rng.bit_generator.state = meta["rng"]
        for name in ("input_ids", "labels"):
            setattr(self, name, tensors.get(name))
        for i, layer in enumerate(self.layers):
            for name in ("keys", "values", "raw_keys"):
                tensor = tensors.get(f"layer{i}.{name}")
                if tensor is not None:
                    getattr(layer, name).write(0, tensor.to(device) if device else tensor)

    # ------------------------------------------------------------------ input
    def append(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Queue new raw tokens; labels are shifted so each token's target is the next token."""
        input_ids = input_ids.detach().to("cpu", torch.long)
        if self.input_ids is not None and input_ids.shape[0] != self.input_ids.shape[0]:
            raise ValueError(
                f"batch size changed from {self.input_ids.shape[0]} to {input_ids.shape[0]} "
                "without memory.reset()"
            )
        if labels is not None:
            labels = labels.detach().to("cpu", torch.long)
            shifted = torch.full_like(labels, IGNORE_INDEX)
            shifted[:, :-1] = labels[:, 1:]
            labels = shifted
        elif self.labels is not None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        if self.input_ids is None:
            self.input_ids, self.labels = input_ids, labels
            return
        if labels is not None and self.labels is None:
            self.labels = torch.full_like(self.input_ids, IGNORE_INDEX)
        self.input_ids = torch.cat([self.input_ids, input_ids], dim=1)
        if labels is not None:
            self.labels = torch.cat([self.labels, labels], dim=1)

    # ------------------------------------------------------------------ ratio choice
    def set_ratio_schedule(self, schedule: list[int] | None) -> None:
        """Pin the ratio of the next windows: window k of the stream uses `schedule[k]`.

        Windows beyond the schedule follow `beacon_ratio_mix` as usual; None removes it. A
        schedule lets question-aware reading (`beacon_apps.ratio_plan`) keep relevant windows
        at low ratios and condense the rest hard. Ratios must be 0 or divide the stride (they
        may lie outside `beacon_ratio`). Cleared by `reset()`; kept by `snapshot()`, not by
        `export_state()` (the engine never caches a question-specific stream).
        """
        if schedule is not None:
            schedule = [int(r) for r in schedule]
            stride = self.config.beacon_stride
            bad = [r for r in schedule if r < 0 or (r > 0 and stride % r)]
            if bad:
                raise ValueError(
                    f"ratio schedule: {bad[0]} must be 0 or divide the stride {stride}"
                )
        self.ratio_schedule = schedule

    def _choose_ratio(self, total: int) -> int:
        cfg = self.config
        schedule, index = self.ratio_schedule, len(self.ratios)  # index of the window starting
        if schedule is not None and index < len(schedule):
            return schedule[index]
        kind, arg = cfg.parse_ratio_mix()
        if kind == "fixed":
            return arg
        candidates = list(cfg.beacon_ratio)
        if len(candidates) == 1:
            return candidates[0]
        stride, window = cfg.beacon_stride, cfg.beacon_window
        if self.training and 0 in candidates:
            if self.used_zero_ratio or self.start + stride + window > total:
                candidates = [r for r in candidates if r != 0]
        if kind == "step-random":
            return int(self.rng.choice(candidates))
        if kind == "sequence":
            ratio = candidates[self.sequence_index % len(candidates)]
            self.sequence_index += 1
            return ratio
        if self.chosen_ratio is None:
            if kind == "instance-random":
                self.chosen_ratio = int(self.rng.choice(candidates))
            else:  # adapt-N: the smallest ratio whose reach covers the input + N new tokens
                needed = total + arg
                reach = {
                    r: (self.max_positions - window) * r + window if r else self.max_positions
                    for r in candidates
                }
                fitting = [r for r in candidates if reach[r] >= needed]
                self.chosen_ratio = (
                    min(fitting, key=lambda r: reach[r]) if fitting else max(candidates)
                )
        return self.chosen_ratio

    # ------------------------------------------------------------------ planning one step
    def plan_step(self) -> StepPlan:
        """Decide the next forward pass (the reference's `Memory._step`). Mutates ratio state only."""
        cfg = self.config
        total = self.num_tokens
        window, stride = cfg.beacon_window, cfg.beacon_stride
        start = self.start
        end = min(start + window, total)
        full = start + window <= total
        raw_ids = self.input_ids[:, self.end : end]
        n_raw = raw_ids.shape[1]
        remainder = self.interleave_remainder
        layout: list[int]  # 0 raw / 1 beacon for every fed token, in order
        if self.training and end == total and self.raw_last_window:
            # The sequence's last window in training: never condensed, no beacons.
            ratio, beacon_size, closes, next_start = -1, 0, False, start
            layout = [0] * n_raw
        elif cfg.beacon_pos == "append":
            if full:
                ratio = self._choose_ratio(total)
                self.ratios.append(ratio)
                beacon_size = stride // ratio if ratio > 0 else -1
                closes, next_start = True, start + stride
            else:
                ratio, beacon_size, closes, next_start = 0, 0, False, start
            layout = [0] * n_raw + [1] * max(beacon_size, 0)
        else:  # interleave: one beacon after every r-th raw token of the window
            if self.window_closed:
                self.window_ratio = self._choose_ratio(total)
                self.ratios.append(self.window_ratio)
            ratio = self.window_ratio
            closes, next_start = full, start + window if full else start
            if ratio > 0:
                beacon_size = (n_raw + remainder) // ratio
                layout = []
                for _ in range(n_raw):
                    layout.append(0)
                    remainder += 1
                    if remainder == ratio:
                        layout.append(1)
                        remainder = 0
            else:
                beacon_size, layout = -1, [0] * n_raw
        n_fed = len(layout)
        is_beacon = torch.tensor(layout, dtype=torch.bool)
        ids = torch.full((raw_ids.shape[0], n_fed), self.beacon_token_id, dtype=torch.long)
        ids[:, ~is_beacon] = raw_ids
        labels = None
        if self.labels is not None:
            labels = torch.full_like(ids, IGNORE_INDEX)
            # Training only: the first window has nothing condensed before it to learn from.
            first_masked = (
                self.training
                and self.step_index == 0
                and not (cfg.beacon_pos == "interleave" and cfg.beacon_attn == "full-coverage")
            )
            if not first_masked:
                labels[:, ~is_beacon] = self.labels[:, self.end : end]

        past = self.sink_length + self.beacon_length + self.raw_length
        positions = torch.arange(past, past + n_fed)
        mask = None
        if beacon_size > 0 and cfg.beacon_pos == "append" and cfg.beacon_attn != "full-coverage":
            positions, mask = self._expansion_layout(n_raw, beacon_size, ratio, past)
        return StepPlan(
            input_ids=ids,
            labels=labels,
            is_beacon=is_beacon,
            positions=positions,
            mask=mask,
            past_length=past,
            beacon_size=beacon_size,
            ratio=ratio,
            closes_window=closes,
            next_start=next_start,
            next_end=end,
            interleave_remainder=remainder if closes is False else 0,
        )

    def _expansion_layout(
        self, n_raw: int, n_beacons: int, ratio: int, past: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and mask of appended beacons under step-expansion or segmentation."""
        cfg = self.config
        memory = self.sink_length + self.beacon_length  # entries before the open window
        window_raw = self.raw_length + n_raw
        n_fed = n_raw + n_beacons
        causal = torch.ones(n_fed, past + n_fed, dtype=torch.bool).tril(past)
        mask = causal.clone()
        index = torch.arange(n_beacons)
        raw_index = torch.arange(window_raw)  # window raw entry w sits at column memory + w
        if cfg.beacon_attn == "step-expansion":
            sees_raw = raw_index[None, :] < ((index + 1) * ratio)[:, None]
            first = memory + (index + 1) * ratio
        else:  # segmentation
            sees_raw = (raw_index[None, :] >= (index * ratio)[:, None]) & (
                raw_index[None, :] < ((index + 1) * ratio)[:, None]
            )
            # every segment restarts right after the memory (v1 semantics, chunk-independent)
            first = torch.full_like(index, memory + ratio)
        if cfg.beacon_attend_prev:
            sees_beacon = index[None, :] <= index[:, None]
            first = first + index
        else:
            sees_beacon = torch.eye(n_beacons, dtype=torch.bool)
        rows = mask[n_raw:]
        rows[:, memory:] = False
        raw_columns = torch.cat([torch.arange(memory, past), torch.arange(past, past + n_raw)])
        rows[:, raw_columns] = sees_raw
        rows[:, past + n_raw :] = sees_beacon
        positions = torch.cat([torch.arange(past, past + n_raw), first])
        return positions, mask

    # ------------------------------------------------------------------ committing one step
    def commit(
        self,
        plan: StepPlan,
        new_keys: list[torch.Tensor],
        new_rotated: list[torch.Tensor],
        new_values: list[torch.Tensor],
        rotate,
    ) -> None:
        """Store the step's new activations (the reference's `update_memory`).

        `new_keys` are the fed tokens' pre-RoPE keys per layer, `new_rotated` the same keys at the
        plan's positions; `rotate(keys, positions)` re-rotates keys moved to new positions.
        """
        cfg = self.config
        sink_size = cfg.beacon_sink_size
        sink_changes = self.beacon_length == 0 and sink_size > 0
        n_fed = plan.input_ids.shape[1]
        indicator = self.window_indicator + plan.is_beacon.long().tolist()
        if plan.closes_window and plan.beacon_size < 0:
            indicator[: cfg.beacon_stride] = [-1] * cfg.beacon_stride
        keep_raw = cfg.beacon_window - cfg.beacon_stride if plan.closes_window else None

        new_sink = min(sink_size, n_fed) if sink_changes else self.sink_length
        sink_moved = sink_changes  # sink re-set from this step's first tokens
        if plan.closes_window:
            device = new_keys[0].device
            chosen = torch.tensor(
                [i for i, x in enumerate(indicator) if x != 0], dtype=torch.long, device=device
            )
            # append mode with stride < window: the window's last W - S raw tokens stay raw
            kept = torch.arange(cfg.beacon_stride, cfg.beacon_window, device=device)
        for layer, k_pre, k_rot, v in zip(
            self.layers, new_keys, new_rotated, new_values, strict=True
        ):
            raw_start = self.sink_length + self.beacon_length
            layer.raw_keys.write(self.raw_length, k_pre)
            if sink_moved:
                raw_pre = layer.raw_keys.view()
                raw_values = self._raw_values(layer, raw_start, v)
                layer.keys.write(0, rotate(k_pre[:, :, :new_sink], torch.arange(new_sink)))
                layer.values.write(0, v[:, :, :new_sink])
                raw_start = new_sink  # beacon memory is empty here
                layer.keys.write(
                    raw_start, rotate(raw_pre, torch.arange(raw_pre.shape[2]) + raw_start)
                )
                layer.values.write(raw_start, raw_values)
            else:
                layer.keys.write(plan.past_length, k_rot)
                layer.values.write(plan.past_length, v)
            if not plan.closes_window:
                continue
            raw_pre = layer.raw_keys.view()
            raw_values = layer.values.view()[:, :, raw_start:]
            at = raw_start
            layer.keys.write(at, rotate(raw_pre[:, :, chosen], torch.arange(at, at + len(chosen))))
            layer.values.write(at, raw_values[:, :, chosen])
            layer.raw_keys.truncate(0)
            if keep_raw:
                kept_keys, kept_values = raw_pre[:, :, kept], raw_values[:, :, kept]
                at += len(chosen)
                layer.keys.write(at, rotate(kept_keys, torch.arange(at, at + len(kept))))
                layer.values.write(at, kept_values)
                layer.raw_keys.write(0, kept_keys)

        if sink_moved:
            self.sink_length = new_sink
        if plan.closes_window:
            self.beacon_length += len(chosen)
            self.raw_length = keep_raw
            self.window_indicator = [0] * keep_raw
            self.used_zero_ratio |= plan.beacon_size < 0
        else:
            self.raw_length += n_fed
            self.window_indicator = indicator
        self.start = plan.next_start
        self.end = plan.next_end
        self.window_closed = plan.closes_window
        self.interleave_remainder = plan.interleave_remainder
        self.step_index += 1

    @staticmethod
    def _raw_values(layer: LayerMemory, raw_start: int, new_values: torch.Tensor) -> torch.Tensor:
        old = layer.values.view()
        old_raw = None if old is None else old[:, :, raw_start:]
        if old_raw is None or old_raw.shape[2] == 0:
            return new_values
        return torch.cat([old_raw, new_values], dim=2)
