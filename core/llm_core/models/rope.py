"""Rotary-embedding tables: the ``cos_sin_cache`` the HAL's rotary_embedding op reads.

Built once at load time on the host in float64 from the model's config (a constant table,
like any other buffer), then copied to the device in fp32: ``(rows, R)`` with the cosines of
the ``R / 2`` angles of a row first, then their sines, and the variant's attention factor
(YaRN, LongRoPE) multiplied into both. Rope scaling variants change only this table and which
row a token reads, so every backend gets them for free.

Supported ``rope_type`` values, each computed as transformers' ``ROPE_INIT_FUNCTIONS`` (5.x)
computes it: ``default``, ``linear``, ``dynamic`` (dynamic NTK), ``yarn``, ``longrope`` and
``llama3``. :func:`rope_parameters` reads them from either config layout: transformers 4.x
(``rope_theta`` + ``rope_scaling`` with ``type`` or ``rope_type``) or 5.x (``rope_parameters``,
possibly keyed by layer type as in Gemma 3).

Length-dependent variants. transformers picks a forward's frequencies from its
``seq_len = max(position) + 1`` (``dynamic_rope_update``); under ``generate()`` a prompt of
length ``L`` is one forward and the decode step at position ``p`` one forward of
``seq_len = p + 1``, so the token at position ``p`` is rotated with the frequencies of
``S = max(L, p + 1)`` (and its key is cached rotated that way). The table reproduces that
without any per-step recomputation; :meth:`RopeTable.rows` maps (position, prompt length) to
the row to read:

- ``longrope``: frequencies switch from ``short_factor`` to ``long_factor`` when
  ``S > original_max_position_embeddings`` (``O``). The table holds the short-factor rows of
  positions ``[0, P)`` followed by the long-factor rows of ``[0, P)`` (``long_offset = P``); a
  token with ``S > O`` reads row ``p + P``. This is transformers' choice exactly, for every
  prompt length, chunked or not. (Short rows at ``p >= O`` are never read; they are kept so
  every table of a model has the same row layout.)
- ``dynamic``: transformers recomputes ``inv_freq(seq_len)`` when ``seq_len`` exceeds
  ``max_position_embeddings`` (``M``; frequencies are those of ``max(seq_len, M)``). The table has
  one row per position ``p``, rotated with ``inv_freq(max(p + 1, M))``: identical to
  transformers whenever the prompt fits in ``M`` (every decode step then has ``S = p + 1``).
  Decision: a prompt longer than ``M`` differs — transformers prefills all its tokens with
  ``inv_freq(L)``, which depends on how the prompt is fed (one forward or chunks) and would make
  cached keys depend on the prompt length; we keep rows a function of position alone (batch-,
  chunking- and prefix-cache-invariant), as vLLM does with one fixed scaled base.
- every other variant: row ``p`` for position ``p``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: rope_type values this module builds tables for.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
#: Older names some checkpoints still carry (transformers 4.x renamed them).
_ALIASES = {"su": "longrope"}
#: Variants whose ``original_max_position_embeddings`` transformers fills in (standardization).
_WITH_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
_DEFAULT_THETA = 10000.0


@dataclass(frozen=True, slots=True)
class RopeTable:
    """A rotary table and the rule that picks the row each token reads."""

    table: np.ndarray  # (rows, R) float32: cos | sin, attention factor baked in
    #: LongRoPE: a token with ``S = max(prompt_len, p + 1) > long_after`` reads row
    #: ``p + long_offset`` (the long-factor rows); None: row ``p`` always.
    long_after: int | None = None
    long_offset: int = 0

    def rows(self, positions: np.ndarray, prompt_lens: np.ndarray) -> np.ndarray:
        """int64 table row per token, from its position and its sequence's prompt length
        (the original one, also after a preemption's recompute). ``positions`` itself where
        the row is the position."""
        if self.long_after is None:
            return positions
        pos = np.asarray(positions, dtype=np.int64)
        seq_len = np.maximum(np.asarray(prompt_lens, dtype=np.int64), pos + 1)
        return np.where(seq_len > self.long_after, pos + self.long_offset, pos)


# ---------------------------------------------------------------------------------------------
# config -> parameters
# ---------------------------------------------------------------------------------------------


def _field(config: Any, name: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def _is_nested(params: Mapping[str, Any]) -> bool:
    """Keyed by layer type ({"full_attention": {...}, ...}) rather than one flat dict."""
    values = list(params.values())
    return any(isinstance(v, Mapping) for v in values) and all(
        v is None or isinstance(v, Mapping) for v in values
    )


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameters of ``config`` (a transformers config, any object with the same
    attributes, or a config.json dict) for layers of ``layer_type``.

    Returns a new flat dict with ``rope_type`` (normalized from ``type``), ``rope_theta``,
    ``partial_rotary_factor`` (1.0 when absent), the variant's scaling fields,
    ``original_max_position_embeddings`` where the variant uses it (filled as transformers'
    standardization does: a top-level config field wins for a flat layout, else it defaults to
    ``max_position_embeddings``), and ``max_position_embeddings`` from the config (dynamic NTK
    and the derived YaRN/LongRoPE factors need it).

    Layouts: 5.x ``rope_parameters`` (flat, or keyed by layer type: then ``layer_type`` is
    required), 4.x ``rope_theta`` + ``rope_scaling``, and Gemma 3's 4.x layout where
    ``rope_local_base_freq`` is the unscaled theta of ``sliding_attention`` layers. A flat
    layout gives the same parameters for every layer type.
    """
    top_theta = _field(config, "rope_theta")
    raw = _field(config, "rope_parameters")
    scaling = _field(config, "rope_scaling")
    nested_source = next(
        (p for p in (raw, scaling) if isinstance(p, Mapping) and _is_nested(p)), None
    )
    if nested_source is not None:
        kinds = sorted(nested_source)
        if layer_type is None:
            raise ValueError(
                f"the config has rope parameters per layer type ({', '.join(kinds)}): "
                "pass layer_type to rope_parameters"
            )
        if nested_source.get(layer_type) is None:
            raise ValueError(
                f"the config has no rope parameters for layer type {layer_type!r} "
                f"(it has: {', '.join(kinds)})"
            )
        params = dict(nested_source[layer_type])
    else:
        local_theta = _field(config, "rope_local_base_freq")
        if layer_type == "sliding_attention" and local_theta is not None:
            # Gemma 3, transformers 4.x: sliding layers use their own theta, unscaled.
            params = {"rope_type": "default", "rope_theta": float(local_theta)}
        else:
            params = dict(raw or {})
            if isinstance(scaling, Mapping) and scaling is not raw:
                params.update(scaling)
    kind = params.pop("type", None)
    kind = params.get("rope_type") or kind or "default"
    params["rope_type"] = _ALIASES.get(kind, kind)
    if params.get("rope_theta") is None:
        params["rope_theta"] = float(top_theta) if top_theta is not None else _DEFAULT_THETA
    if params.get("partial_rotary_factor") is None:
        partial = _field(config, "partial_rotary_factor")
        params["partial_rotary_factor"] = 1.0 if partial is None else float(partial)
    max_pos = _field(config, "max_position_embeddings")
    if max_pos is not None:
        params["max_position_embeddings"] = int(max_pos)
    if params["rope_type"] in _WITH_ORIGINAL_MAX:
        top_original = _field(config, "original_max_position_embeddings")
        if nested_source is None and top_original is not None:
            params["original_max_position_embeddings"] = int(top_original)  # Phi-3's layout
        elif params.get("original_max_position_embeddings") is None and max_pos is not None:
            params["original_max_position_embeddings"] = int(max_pos)
    return params


# ---------------------------------------------------------------------------------------------
# parameters -> frequencies
# ---------------------------------------------------------------------------------------------


def _require(params: Mapping[str, Any], kind: str, name: str) -> Any:
    value = params.get(name)
    if value is None:
        raise ValueError(
            f"rope type {kind!r} needs the field {name!r} in the rope parameters "
            f"(supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return value


def _rope_type(params: Mapping[str, Any]) -> str:
    kind = params.get("rope_type") or params.get("type") or "default"
    kind = _ALIASES.get(kind, kind)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {kind!r} is not supported (field 'rope_type'; supported rope types: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return str(kind)


def _check_rotary_dim(rotary_dim: int) -> None:
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"the rotary dimension must be even and >= 2, got {rotary_dim}")


def _exponents(rotary_dim: int) -> np.ndarray:
    return np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim  # (R/2,)


def _derived_factor(params: Mapping[str, Any], kind: str, original: float) -> float:
    """``factor``, or ``max_position_embeddings / original_max_position_embeddings`` where the
    config leaves it out (Phi-3, DeepSeek-V3), as transformers derives it."""
    factor = params.get("factor")
    if factor is not None:
        return float(factor)
    if params.get("max_position_embeddings") is None:
        _require(params, kind, "factor")  # raises, naming the field
    return float(params["max_position_embeddings"]) / original


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _dynamic_inv_freq(
    rotary_dim: int, params: Mapping[str, Any], seq_len: np.ndarray
) -> np.ndarray:
    """Dynamic NTK frequencies for each ``seq_len``: (len(seq_len), R/2)."""
    if rotary_dim <= 2:
        raise ValueError(f"dynamic NTK rope needs a rotary dimension > 2, got {rotary_dim}")
    theta = float(_require(params, "dynamic", "rope_theta"))
    factor = float(_require(params, "dynamic", "factor"))
    max_pos = float(_require(params, "dynamic", "max_position_embeddings"))
    s = np.maximum(seq_len.astype(np.float64), max_pos)
    base = theta * ((factor * s / max_pos) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return 1.0 / (base[:, None] ** _exponents(rotary_dim)[None, :])


def inverse_frequencies(
    rotary_dim: int, params: Mapping[str, Any], seq_len: int | None = None
) -> tuple[np.ndarray, float]:
    """transformers' ``ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)`` in float64:
    the per-pair angular frequencies, (rotary_dim / 2,), and the attention factor that
    multiplies cos and sin. ``seq_len`` (a forward's ``max(position) + 1``) matters only to
    ``dynamic`` and ``longrope``; None is the frequencies a model starts with."""
    _check_rotary_dim(rotary_dim)
    kind = _rope_type(params)
    theta = float(_require(params, kind, "rope_theta"))
    inv_freq = 1.0 / (theta ** _exponents(rotary_dim))
    half = rotary_dim // 2
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(_require(params, kind, "factor")), 1.0
    if kind == "dynamic":
        s = np.asarray([0 if seq_len is None else seq_len])
        return _dynamic_inv_freq(rotary_dim, params, s)[0], 1.0
    if kind == "llama3":
        factor = float(_require(params, kind, "factor"))
        low = float(_require(params, kind, "low_freq_factor"))
        high = float(_require(params, kind, "high_freq_factor"))
        old_len = float(_require(params, kind, "original_max_position_embeddings"))
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled), 1.0
    original = float(_require(params, kind, "original_max_position_embeddings"))
    if kind == "yarn":
        factor = _derived_factor(params, kind, original)
        attention = params.get("attention_factor")
        if attention is None:
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(
                    factor, float(mscale_all_dim)
                )
            else:
                attention = _yarn_mscale(factor)
        beta_fast = float(params.get("beta_fast") or 32)
        beta_slow = float(params.get("beta_slow") or 1)

        def correction_dim(rotations: float) -> float:
            return (rotary_dim * math.log(original / (rotations * 2 * math.pi))) / (
                2 * math.log(theta)
            )

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, rotary_dim - 1)
        if lo == hi:
            hi += 0.001  # as transformers: no zero-width ramp
        ramp = np.clip((np.arange(half, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        extrapolate = 1.0 - ramp
        inv = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
        return inv, float(attention)
    # longrope
    short = _longrope_factors(params, "short_factor", half)
    long = _longrope_factors(params, "long_factor", half)
    factor = _derived_factor(params, kind, original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = long if seq_len is not None and seq_len > original else short
    return inv_freq / ext, float(attention)


def _longrope_factors(params: Mapping[str, Any], name: str, half: int) -> np.ndarray:
    values = np.asarray(_require(params, "longrope", name), dtype=np.float64)
    if values.shape != (half,):
        raise ValueError(
            f"rope type 'longrope': the field {name!r} must list rotary_dim / 2 = {half} "
            f"numbers, got shape {values.shape}"
        )
    return values


def _cos_sin(angles: np.ndarray, attention: float) -> np.ndarray:
    table = np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)
    if attention != 1.0:
        table = table * attention
    return table.astype(np.float32)


def rope_table(rotary_dim: int, num_positions: int, params: Mapping[str, Any]) -> RopeTable:
    """The rotary table of positions ``[0, num_positions)`` for ``params`` (as
    :func:`rope_parameters` returns them; ``rope_theta`` required). See the module docstring
    for the rows of the length-dependent variants. ValueError for an unknown ``rope_type`` or a
    missing field, naming it."""
    _check_rotary_dim(rotary_dim)
    kind = _rope_type(params)
    positions = np.arange(num_positions, dtype=np.float64)
    if kind == "dynamic":
        inv = _dynamic_inv_freq(rotary_dim, params, positions + 1)  # (P, R/2)
        return RopeTable(_cos_sin(positions[:, None] * inv, 1.0))
    inv_freq, attention = inverse_frequencies(rotary_dim, params)
    if kind != "longrope":
        return RopeTable(_cos_sin(np.outer(positions, inv_freq), attention))
    original = int(params["original_max_position_embeddings"])
    short = _cos_sin(np.outer(positions, inv_freq), attention)
    long_freq, _ = inverse_frequencies(rotary_dim, params, seq_len=original + 1)
    long = _cos_sin(np.outer(positions, long_freq), attention)
    return RopeTable(np.concatenate([short, long]), long_after=original, long_offset=num_positions)


def cos_sin_cache(
    rotary_dim: int, max_position: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> np.ndarray:
    """The table of :func:`rope_table` with ``rope_theta = theta`` (rows past ``max_position``
    are LongRoPE's long-factor rows)."""
    params = dict(scaling or {})
    params["rope_theta"] = theta
    return rope_table(rotary_dim, max_position, params).table
