"""A Llama-family decoder (Llama, Qwen2, Mistral) that reads through a beacon memory.

`BeaconForCausalLM` reuses the Hugging Face model's embeddings, norms, MLPs, projections and
rotary embedding, and adds the beacon parameters under the names of the released checkpoints
(`model.beacon_embed_tokens`, `model.layers.N.self_attn.beacon_{q,k,v,o}_proj`), so its
`state_dict` *is* the released format. A forward pass queues the new tokens in the memory, then
runs one transformer pass per window step that the memory plans, and stores what the step
produced. Windows are sequential (a window's beacons depend on all earlier memory); inside one
step, raw tokens and beacons go through the layers in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from .attention import ATTENTION_IMPLEMENTATIONS, apply_rope, attend, step_mask
from .config import BeaconConfig
from .memory import IGNORE_INDEX, BeaconMemory, StepPlan

BEACON_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


@dataclass
class BeaconOutput:
    """Logits of the raw tokens fed by this call (float32) and, with labels, the loss."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    batch_loss: torch.Tensor | None = None
    num_label_tokens: int = 0


def max_positions(config) -> int:
    """The base model's positional reach.

    `max_position_embeddings`, times the RoPE scaling factor when the scaling extends the
    context beyond it. Configs whose RoPE parameters give an `original_max_position_embeddings`
    below `max_position_embeddings` already state the extended length there (Llama 3.1/3.2
    `llama3`, Phi-3 `longrope`, DeepSeek `yarn`: e.g. 8192 x 8 -> 131072 is written as 131072),
    so it is not scaled again. Otherwise the reach is the original length (transformers defaults
    it to `max_position_embeddings`) times the factor (e.g. Qwen2 `yarn`: 32768 x 4).
    """
    positions = int(config.max_position_embeddings)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") == "default" or not rope.get("factor"):
        return positions
    original = rope.get("original_max_position_embeddings")
    if original and int(original) < positions:
        return positions
    return int((int(original) if original else positions) * rope["factor"])


class BeaconForCausalLM(nn.Module):
    """A causal LM whose context is a streaming beacon memory instead of a KV cache."""

    def __init__(
        self,
        base: PreTrainedModel,
        beacon_config: BeaconConfig,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation: {attn_implementation!r} is not supported; choose "
                f"{' or '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        self.config = base.config
        self.model = base.model
        self.lm_head = base.lm_head
        self.beacon_config = beacon_config
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = False
        hidden = self.config.hidden_size
        reference = self.model.embed_tokens.weight
        self.model.beacon_embed_tokens = nn.Embedding(
            1, hidden, device=reference.device, dtype=reference.dtype
        )
        for layer in self.model.layers:
            attention = layer.self_attn
            for short in beacon_config.beacon_param:
                original: nn.Linear = getattr(attention, BEACON_PROJECTIONS[short])
                copy = nn.Linear(
                    original.in_features,
                    original.out_features,
                    bias=original.bias is not None,
                    device=original.weight.device,
                    dtype=original.weight.dtype,
                )
                setattr(attention, f"beacon_{BEACON_PROJECTIONS[short]}", copy)
        self.memory = BeaconMemory(
            beacon_config,
            num_layers=len(self.model.layers),
            vocab_size=self.config.vocab_size,
            max_positions=max_positions(self.config),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def beacon_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters a beacon adds (the only ones trained; the base LLM stays frozen)."""
        return [(n, p) for n, p in self.named_parameters() if "beacon_" in n]

    def init_beacon_parameters(self, missing: set[str]) -> None:
        """Initialise beacon parameters absent from a checkpoint as the reference does.

        The embedding starts as the eos (or bos) token's row; each beacon projection as a copy of
        the original projection, so an untrained beacon behaves like an ordinary token.
        """
        with torch.no_grad():
            if "model.beacon_embed_tokens.weight" in missing:
                name = f"{self.beacon_config.beacon_embed_init}_token_id"
                token = getattr(self.config, name, None)
                if isinstance(token, (list, tuple)):
                    token = token[0]
                if token is None:
                    raise ValueError(
                        f"beacon_embed_init: the base config has no {name} to copy the beacon "
                        "embedding from"
                    )
                self.model.beacon_embed_tokens.weight.copy_(
                    self.model.embed_tokens.weight[token : token + 1]
                )
            for i, layer in enumerate(self.model.layers):
                for short in self.beacon_config.beacon_param:
                    target = BEACON_PROJECTIONS[short]
                    prefix = f"model.layers.{i}.self_attn.beacon_{target}"
                    if not any(key.startswith(prefix) for key in missing):
                        continue
                    original = getattr(layer.self_attn, target)
                    copy = getattr(layer.self_attn, f"beacon_{target}")
                    copy.weight.copy_(original.weight)
                    if copy.bias is not None:
                        copy.bias.copy_(original.bias)

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys `[batch, heads, n, dim]` rotated to `positions` (keys moving into the memory)."""
        cos, sin = self.model.rotary_emb(keys, positions.to(keys.device)[None])
        return apply_rope(keys, cos, sin)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
    ) -> BeaconOutput:
        """Read `input_ids` ([batch, n], rows of equal length) after everything read since reset.

        Returns the logits of these raw tokens (the last `logits_to_keep` of them if given; 0 for
        none). With `labels` the loss is the mean next-token loss over all label tokens.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.numel() == 0:
            raise ValueError("input_ids: empty input; give at least one token")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels: shape {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        vocab = self.config.vocab_size
        if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
            raise ValueError(f"input_ids: token ids must lie in [0, {vocab})")
        grad = self.training and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            return self._forward(input_ids, labels, logits_to_keep)

    def _forward(self, input_ids, labels, logits_to_keep) -> BeaconOutput:
        memory = self.memory
        memory.training = self.training
        memory.append(input_ids, labels)
        batch = input_ids.shape[0]
        kept: list[torch.Tensor] = []
        kept_rows = 0
        loss_sum = torch.zeros(batch, device=self.device, dtype=torch.float32)
        loss_count = torch.zeros(batch, device=self.device, dtype=torch.float32)
        while memory.pending:
            plan = memory.plan_step()
            hidden = self._step(plan)  # final-normed hidden states of the raw fed tokens
            if plan.labels is not None:
                targets = plan.labels[:, ~plan.is_beacon].to(self.device)
                if (targets != IGNORE_INDEX).any():
                    logits = self.lm_head(hidden).float()
                    losses = F.cross_entropy(
                        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
                    )
                    loss_sum = loss_sum + losses.sum(-1)
                    loss_count = loss_count + (targets != IGNORE_INDEX).sum(-1)
            if logits_to_keep != 0:
                kept.append(hidden if self.training else hidden.detach())
                kept_rows += hidden.shape[1]
                if logits_to_keep is not None:
                    while kept_rows - kept[0].shape[1] >= logits_to_keep:
                        kept_rows -= kept.pop(0).shape[1]
        logits = None
        if kept:
            hidden = torch.cat(kept, dim=1)
            if logits_to_keep is not None:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.lm_head(hidden).float()
        output = BeaconOutput(logits=logits)
        if labels is not None:
            total = loss_count.sum()
            output.loss = loss_sum.sum() / total.clamp(min=1)
            output.batch_loss = loss_sum / loss_count.clamp(min=1)
            output.num_label_tokens = int(total)
        return output

    def _step(self, plan: StepPlan) -> torch.Tensor:
        device = self.device
        ids = plan.input_ids.to(device)
        is_beacon = plan.is_beacon.to(device)
        has_beacons = plan.beacon_size > 0
        vocab = self.config.vocab_size
        hidden = self.model.embed_tokens(ids.clamp(max=vocab - 1))
        if has_beacons:
            beacon = self.model.beacon_embed_tokens.weight[0]
            hidden = torch.where(is_beacon[None, :, None], beacon, hidden)
        cos, sin = self.model.rotary_emb(hidden, plan.positions.to(device)[None])
        beacon_rows = is_beacon.nonzero().flatten() if has_beacons else None
        n_fed = ids.shape[1]
        mask = step_mask(plan.mask, n_fed, plan.past_length, device, self.attn_implementation)
        new_keys, new_rotated, new_values = [], [], []
        for layer, layer_memory in zip(self.model.layers, self.memory.layers, strict=True):
            past_keys, past_values = layer_memory.past_view()
            args = (hidden, cos, sin, past_keys, past_values, beacon_rows, mask)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                out = checkpoint(self._layer, layer, *args, use_reentrant=False)
            else:
                out = self._layer(layer, *args, layer_memory=layer_memory)
            hidden, k_pre, k_rot, v = out
            new_keys.append(k_pre)
            new_rotated.append(k_rot)
            new_values.append(v)
        self.memory.commit(plan, new_keys, new_rotated, new_values, self.rotate)
        raw = hidden[:, ~is_beacon] if has_beacons else hidden
        return self.model.norm(raw)

    def _layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_keys: torch.Tensor | None,
        past_values: torch.Tensor | None,
        beacon_rows: torch.Tensor | None,
        mask: torch.Tensor | None,
        layer_memory=None,
    ):
        """One decoder layer; pure in its inputs (so gradient checkpointing can recompute it)."""
        attention = layer.self_attn
        residual = hidden
        x = layer.input_layernorm(hidden)
        batch, n, _ = x.shape
        shape = (batch, n, -1, attention.head_dim)

        def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
            out = getattr(attention, name)(inputs)
            beacon_proj = getattr(attention, f"beacon_{name}", None)
            if beacon_rows is None or beacon_proj is None:
                return out
            return out.index_copy(1, beacon_rows, beacon_proj(inputs.index_select(1, beacon_rows)))

        query = project("q_proj", x).view(shape).transpose(1, 2)
        key = project("k_proj", x).view(shape).transpose(1, 2)
        value = project("v_proj", x).view(shape).transpose(1, 2)
        query = apply_rope(query, cos, sin)
        key_rotated = apply_rope(key, cos, sin)
        if past_keys is None:
            keys, values = key_rotated, value
        elif layer_memory is not None and not torch.is_grad_enabled():
            keys, values = layer_memory.extend(key_rotated, value)
        else:
            keys = torch.cat([past_keys, key_rotated], dim=2)
            values = torch.cat([past_values, value], dim=2)
        out = attend(query, keys, values, mask, attention.scaling, self.attn_implementation)
        out = project("o_proj", out.reshape(batch, n, -1).contiguous())
        hidden = residual + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, key, key_rotated, value

    # ------------------------------------------------------------------ training switches
    def freeze_base_model(self) -> None:
        """Only beacon parameters train; the LLM stays exactly as released."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_("beacon_" in name)

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True
