"""What one operator case runs in: seeded inputs, the float64 oracle, guarded outputs.

A :class:`Harness` is made per case. It draws inputs from a generator seeded by the suite seed
and the case's identity, rounds them to the tested dtype on the host, and hands the backend its
copy through ``from_host`` (tensors on the backend side are backend-native: this module never
assumes they are torch tensors). The oracle, :class:`llm_hal.TorchBackend` on the CPU, gets the
same rounded values upcast to float64.

Outputs written through ``out=`` go into the interior of a wider buffer filled with random
sentinel values, so an out-of-bounds write changes a sentinel and is caught bit-exactly; the
same goes for the untouched parts of in-place operands.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from llm_hal import Backend, DType, TorchBackend
from llm_hal.dtypes import to_torch

from llm_conformance.compare import Check, compare, exact_match
from llm_conformance.tolerances import (
    ATTENTION_KV_SCALE,
    Tolerance,
    Waiver,
    tolerance,
)

F64 = torch.float64
#: Width of the sentinel columns on each side of a guarded output.
GUARD = 5


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a host tensor: compares NaN payloads and signed zeros too."""
    return t.contiguous().view(-1).view(torch.uint8)


def case_seed(seed: int, op: str, index: int, dtype: DType) -> int:
    """The seed of one case: stable across runs, processes and machines."""
    return zlib.crc32(f"{seed}:{op}:{index}:{dtype.value}".encode())


@dataclass(slots=True)
class Guarded:
    """A device buffer ``(rows, GUARD + n + GUARD)`` and its interior view ``(rows, n)``."""

    buffer: Any
    view: Any
    sentinel: torch.Tensor  # the buffer's initial host content
    width: int


class Harness:
    """Inputs, oracle and comparisons for one case of one operator on one backend."""

    def __init__(
        self,
        backend: Backend,
        op: str,
        op_class: str,
        dtype: DType,
        seed: int,
        waivers: Sequence[Waiver] = (),
    ):
        self.backend = backend
        self.op = op
        self.op_class = op_class
        self.dtype = dtype
        self.torch_dtype = to_torch(dtype)
        self.gen = torch.Generator().manual_seed(seed)
        self.oracle = TorchBackend("cpu")
        self.waivers = list(waivers)
        self.waived: set[str] = set()
        self.checks: list[Check] = []

    # -- inputs --------------------------------------------------------------------------------

    def randn(
        self, shape: Sequence[int], scale: float = 1.0, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal values rounded to the tested dtype (or ``dtype``), and the same in float64."""
        x = (torch.randn(tuple(shape), generator=self.gen, dtype=F64) * scale).to(
            dtype or self.torch_dtype
        )
        return x, x.to(F64)

    def randint(self, low: int, high: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.randint(low, high, tuple(shape), generator=self.gen, dtype=torch.int64)

    def randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)

    def inject(self, *tensors: torch.Tensor, kind: str | None, count: int = 3) -> None:
        """Put NaN or +/-Inf at a few random places of the host tensors (the same places in
        each: pass a value and its float64 copy)."""
        if kind is None or tensors[0].numel() == 0:
            return
        flat = torch.randint(0, tensors[0].numel(), (count,), generator=self.gen)
        for i, pos in enumerate(flat.tolist()):
            value = float("nan") if kind == "nan" else (float("inf") if i % 2 else -float("inf"))
            for t in tensors:
                t[torch.unravel_index(torch.tensor(pos), t.shape)] = value

    def up(self, host: torch.Tensor) -> Any:
        """A backend copy of a host tensor, same dtype."""
        return self.backend.from_host(host.contiguous())

    def down(self, device: Any) -> torch.Tensor:
        return self.backend.to_host(device)

    def strided(self, host: torch.Tensor, extra: int = 24) -> Any:
        """A ``(rows, n)`` device view out of a wider ``(rows, n + extra)`` tensor, as ``split`` of
        a fused projection gives; the view holds ``host``."""
        rows, n = host.shape
        filler = self.randn((rows, extra), dtype=host.dtype)[0]
        full = self.up(torch.cat([host, filler], dim=1))
        return self.backend.split(full, [n, extra])[0]

    def guarded(self, rows: int, n: int, dtype: DType | None = None) -> Guarded:
        """An output view ``(rows, n)`` with sentinel columns around it on the device."""
        tdt = to_torch(dtype or self.dtype)
        sentinel = self.randn((rows, GUARD + n + GUARD), 1e3, dtype=tdt)[0]
        buffer = self.up(sentinel)
        view = self.backend.split(buffer, [GUARD, n, GUARD])[1]
        return Guarded(buffer, view, sentinel, n)

    # -- verdicts ------------------------------------------------------------------------------

    def tol(self, op_class: str | None = None, dtype: DType | None = None) -> Tolerance:
        cls = op_class or self.op_class
        dt = dtype or self.dtype
        for waiver in self.waivers:
            if waiver.applies(self.backend.name, self.op, cls, dt):
                self.waived.add(waiver.name)
                return waiver.tolerance
        return tolerance(cls, dt)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def close(
        self,
        name: str,
        got: Any,
        want: torch.Tensor,
        op_class: str | None = None,
        dtype: DType | None = None,
        kv_len: int = 0,
    ) -> Check:
        """Compare a device (or host) result with the oracle's float64 answer."""
        host = self.down(got)
        dt = dtype or self.dtype
        tol = self.tol(op_class, dt)
        cap = None
        if (op_class or self.op_class) == "attention" and not tol.exact:
            cap = tol.nmse * max(1.0, kv_len / ATTENTION_KV_SCALE)
        return self.add(compare(name, host, want, tol, dt, nmse_cap=cap))

    def same(self, name: str, got: Any, want: torch.Tensor) -> Check:
        """Integer results must be identical."""
        return self.add(exact_match(name, self.down(got), want))

    def expect_dtype(self, name: str, got: Any, dtype: DType) -> Check:
        actual = self.backend.dtype_of(got)
        ok = actual == dtype
        return self.add(
            Check(f"{name} dtype", ok, "" if ok else f"{actual.value}, want {dtype.value}")
        )

    def unchanged(self, name: str, device: Any, before: torch.Tensor) -> Check:
        """A tensor the operator must not write is bit-identical to what it was."""
        after = self.down(device)
        ok = after.shape == before.shape and torch.equal(bits(after), bits(before))
        return self.add(
            Check(name, ok, "" if ok else "modified by an operator that must not write it")
        )

    def guard_intact(self, name: str, guarded: Guarded) -> Check:
        """The sentinel columns of a guarded output are bit-identical (no out-of-bounds write)."""
        full = self.down(guarded.buffer)
        n = guarded.width
        keep = torch.ones(full.shape, dtype=torch.bool)
        keep[:, GUARD : GUARD + n] = False
        bad = int((full[keep] != guarded.sentinel[keep]).sum())
        return self.add(
            Check(name, bad == 0, "" if not bad else f"{bad} sentinel values overwritten")
        )

    def with_out(
        self,
        call: Callable[[Any], Any],
        want: torch.Tensor,
        pick: Callable[[Any], Any] = lambda r: r,
        kv_len: int = 0,
    ) -> None:
        """Run ``call(out)`` with a guarded ``out``: the result and ``out`` must both hold the
        answer, and nothing outside ``out`` may change."""
        rows, n = want.shape
        guarded = self.guarded(rows, n)
        result = pick(call(guarded.view))
        self.close("out= result", result, want, kv_len=kv_len)
        self.close("out= buffer", guarded.view, want, kv_len=kv_len)
        self.guard_intact("out= guard", guarded)
