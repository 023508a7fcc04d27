"""Linear-layer weights as the HAL sees them: dense or quantized, prepared once by the backend."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class QuantScheme(str, enum.Enum):
    """How a linear weight is stored. Shapes are for a layer with ``N`` outputs and ``K`` inputs.

    - ``NONE``: ``weight (N, K)`` in the activation dtype.
    - ``W8A16``: ``weight (N, K)`` int8, ``scales (N, K // group_size)``; symmetric,
      ``W = weight * scales`` expanded along K. Activations stay floating point.
    - ``W4A16``: ``weight (N, K // 2)`` uint8, two unsigned 4-bit values per byte, element
      ``2j`` in the low nibble and ``2j + 1`` in the high nibble; ``scales`` and ``zeros``
      ``(N, K // group_size)``; ``W = (q - zeros) * scales``.
    - ``W8A8``: ``weight (N, K)`` int8 with per-output-channel ``scales (N, 1)``; activations
      are quantized per token, symmetrically, at run time: ``a_scale = max|x| / 127``,
      ``xq = clamp(round(x / a_scale), -127, 127)``, ``y = (xq @ weight.T) * a_scale * scales.T``
      accumulated in int32.
    """

    NONE = "none"
    W8A16 = "w8a16"
    W4A16 = "w4a16"
    W8A8 = "w8a8"


@dataclass(slots=True)
class LinearWeight:
    """A weight after ``Backend.prepare_linear``. Core treats it as opaque except for the shape.

    ``packed`` holds the backend's private form (a transposed, blocked or NZ layout, a
    pre-packed oneDNN weight, ...); the other fields keep the documented form so the reference
    and conformance can read it.
    """

    weight: Any
    bias: Any | None
    scheme: QuantScheme
    out_features: int
    in_features: int
    scales: Any | None = None
    zeros: Any | None = None
    group_size: int = 0  # 0 = one group over all of K
    packed: Any | None = None
