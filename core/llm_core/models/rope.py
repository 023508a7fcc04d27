"""Rotary-embedding tables: the ``cos_sin_cache`` the HAL's rotary_embedding op reads.

Built once at load time on the host in float64 from the model's config (a constant table,
like any other buffer), then copied to the device in fp32. Rope scaling variants change only
this table, so every backend gets them for free.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def inverse_frequencies(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None
) -> np.ndarray:
    """Per-pair angular frequencies, (rotary_dim / 2,) float64, after rope scaling."""
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv_freq
    assert scaling is not None
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(
        f"rope scaling type {kind!r} is not supported yet (supported: default, linear, llama3)"
    )


def cos_sin_cache(
    rotary_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None = None
) -> np.ndarray:
    """(max_position, rotary_dim) float32: cos of every angle, then sin (the HAL layout)."""
    inv_freq = inverse_frequencies(rotary_dim, theta, scaling)
    angles = np.outer(np.arange(max_position, dtype=np.float64), inv_freq)  # (P, R/2)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
