"""Attention over `[memory | fed tokens]` for one window, and RoPE for keys entering the memory.

The projections, norms and MLPs are the Hugging Face model's own modules; only the attention call
is ours, because the memory sits before the fed tokens (a bottom-right causal mask, which SDPA's
`is_causal` does not express) and because appended beacons need the scheme masks of
`BeaconMemory._expansion_layout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[batch, heads, n, dim]` by `cos`/`sin` of shape `[batch, n, dim]`.

    Same arithmetic, in the same order, as transformers' `apply_rotary_pos_emb`, so keys rotated
    here when they enter the memory equal keys rotated by the base model.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def _causal_mask(n: int, past: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)


def step_mask(
    mask: torch.Tensor | None,
    n: int,
    past: int,
    device: torch.device,
    implementation: str = "sdpa",
) -> torch.Tensor | None:
    """The mask of one step's attention, built once and passed to `attend` for every layer.

    `mask` is the step plan's (`[n, past + n]` bool, True = visible; None = causal over
    `[memory | fed]`). Returns it on `device`; for None, the causal mask wherever `attend` would
    otherwise build one per call (eager with several fed tokens; SDPA on CPU with a memory before
    the fed tokens), else None (SDPA's own causal paths). `attend` gives the same numbers either
    way; this only saves building the mask once per layer.
    """
    if mask is not None:
        return mask.to(device)
    if n == 1:
        return None
    if implementation == "eager" or (past > 0 and device.type != "cuda"):
        return _causal_mask(n, past, device)
    return None


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    implementation: str = "sdpa",
) -> torch.Tensor:
    """Attention of the fed queries over all keys; returns `[batch, n, heads, dim]`.

    `mask` is `[n, keys]` bool (True = visible) or None for causal over `[memory | fed]`; build
    it once per step with `step_mask` when many layers attend with it.
    """
    n, total = query.shape[2], key.shape[2]
    past = total - n
    groups = query.shape[1] // key.shape[1]
    if implementation == "eager":
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if mask is None and n > 1:
            mask = _causal_mask(n, past, query.device)
        if mask is not None:  # (where, not masked_fill(~mask): no inverted mask per call)
            weights = torch.where(mask.to(query.device), weights, torch.finfo(weights.dtype).min)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, value).transpose(1, 2)
    if implementation != "sdpa":
        raise ValueError(
            f"attn_implementation: {implementation!r} is not supported; choose "
            f"{' or '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if mask is None and (past == 0 or n == 1):
        # The base model's own fast path: same call, same numbers.
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=n > 1, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2)
    if mask is None and query.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(n, total)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, scale=scaling
        ).transpose(1, 2)
    if mask is None:
        mask = _causal_mask(n, past, query.device)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask.to(query.device)[None, None], scale=scaling
    )
    return out.transpose(1, 2)
