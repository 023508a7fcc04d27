"""llm_core_cpu: the CPU backend of llm-core (PyTorch CPU kernels, fp32 and bf16)."""

from llm_core_cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
