"""Rotary position embeddings, with the HF ``rope_scaling`` variants Llama-family models use."""

from __future__ import annotations

import math
from typing import Any

import torch


class RopeConfigError(ValueError):
    """A ``rope_scaling`` block this implementation does not understand."""


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    factor = float(cfg["factor"])
    low = float(cfg.get("low_freq_factor", 1.0))
    high = float(cfg.get("high_freq_factor", 4.0))
    old_ctx = float(cfg["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


def _yarn_inv_freq(
    inv_freq: torch.Tensor, cfg: dict[str, Any], base: float, dim: int
) -> tuple[torch.Tensor, float]:
    factor = float(cfg["factor"])
    old_ctx = float(cfg["original_max_position_embeddings"])
    beta_fast = float(cfg.get("beta_fast", 32.0))
    beta_slow = float(cfg.get("beta_slow", 1.0))

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / max(high - low, 1e-3)
    extrapolation = 1 - ramp.clamp(0, 1)
    new = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    attention_factor = cfg.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = cfg.get("mscale"), cfg.get("mscale_all_dim")
        if mscale and mscale_all_dim:  # DeepSeek: the cos/sin factor is their ratio
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return new, float(attention_factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 · mscale · ln(factor) + 1`` (1 when not scaled up)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _longrope_inv_freq(inv_freq: torch.Tensor, cfg: dict[str, Any], context_length: int | None
                       ) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE: per-dimension divisors, ``long_factor`` when the served context goes
    past the trained ``original_max_position_embeddings`` (as llama.cpp decides it: by the
    context, so every token of a sequence shares one rotation), ``short_factor`` otherwise;
    cos/sin scaled by √(1 + ln(factor) / ln(original)) as transformers does."""
    original = int(cfg["original_max_position_embeddings"])
    long = context_length is not None and context_length > original
    factors = torch.tensor(cfg["long_factor" if long else "short_factor"], dtype=torch.float32,
                           device="cpu")
    if factors.numel() != inv_freq.numel():
        raise RopeConfigError(
            f"longrope has {factors.numel()} factors for {inv_freq.numel()} frequencies")
    attention_factor = cfg.get("attention_factor")
    if attention_factor is None:
        factor = float(cfg.get("factor") or cfg.get("max_position_embeddings", original) / original)
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(
            1 + math.log(factor) / math.log(original))
    return inv_freq / factors, float(attention_factor)


def rope_inv_freq(
    head_dim: int, base: float, scaling: dict[str, Any] | None,
    context_length: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention (magnitude) factor for a scaling config.

    Always computed on the CPU, also under ``with torch.device("meta")``: ``arange`` on meta
    goes through PyTorch's reference implementation, which imports sympy (~2 s of start-up).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
                               / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, scaling, base, head_dim)
    if kind in ("longrope", "su"):
        return _longrope_inv_freq(inv_freq, scaling, context_length)
    if kind == "proportional":  # Gemma 4's global layers: the first angles of each half rotate
        angles = int(float(scaling.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        inv_freq = inv_freq.clone()
        inv_freq[angles:] = 0.0
        return inv_freq / float(scaling.get("factor") or 1.0), 1.0
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor (Llama 3.1 GGUFs): divisors
        factors = torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
        return inv_freq / factors, 1.0
    raise RopeConfigError(f"unsupported rope_scaling type {kind!r}")


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position, looked up by absolute position."""

    def __init__(
        self, head_dim: int, max_positions: int, base: float, scaling: dict[str, Any] | None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        self._spec = (head_dim, max_positions, base, scaling, context_length or max_positions)
        self.materialize()

    def materialize(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables on ``device`` (None: the CPU, whatever the default device)."""
        head_dim, max_positions, base, scaling, context = self._spec
        inv_freq, attn_factor = rope_inv_freq(head_dim, base, scaling, context)
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        emb = torch.outer(t, inv_freq).repeat(1, 2)
        self.register_buffer("cos", (emb.cos() * attn_factor).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * attn_factor).to(device), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for these positions; computed once per forward, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hk, D] (rotate-half layout); with tables
    narrower than D (partial rotary), only the first dims rotate."""
    cos, sin = cos_sin
    dim = cos.shape[-1]
    if dim < q.shape[-1]:
        (q_rot, q_pass), (k_rot, k_pass) = q.split([dim, q.shape[-1] - dim], -1), k.split(
            [dim, k.shape[-1] - dim], -1)
        q_rot, k_rot = apply_rope(q_rot, k_rot, cos_sin)
        return torch.cat((q_rot, q_pass), -1), torch.cat((k_rot, k_pass), -1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
