"""Entry-point module of the CPU backend: the spec pluggy discovers."""

from __future__ import annotations

from llm_hal import Availability, BackendConfig, BackendSpec, DeviceInfo, hookimpl
from llm_hal.backend import Backend
from llm_hal.spec import host_cpu_name

from llm_core_cpu.version import __version__

#: The HAL API this plugin was written and tested against: a literal, so that the registry
#: can refuse it when the host's HAL is incompatible (it must never be the host's version).
BUILT_FOR_HAL_API = "1.3"  # 1.2: apply_token_bitmask; 1.3: gemma_rms_norm, scale, soft_cap

#: ``BackendConfig.options`` the factory understands (``--backend-option KEY=VALUE``).
OPTIONS = {
    "batch_invariant": (
        "1: a row's result never depends on the batch, in fp32 and bf16 (every linear layer "
        "on the C kernels); 0: oneDNN/MKL GEMMs above 64 tokens, no such promise; auto (the "
        "default, or $LLM_CORE_CPU_BATCH_INVARIANT): 1 in fp32, and in bf16 unless the CPU has "
        "a bf16 GEMM (AVX512-BF16/AMX)"
    ),
}


def _probe() -> Availability:
    from llm_hal.reference import host_memory_info

    name = host_cpu_name()
    return Availability.yes([DeviceInfo(0, name, host_memory_info().total,
                                        {"threads": str(_threads())})])  # fmt: skip


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _factory(config: BackendConfig) -> Backend:
    unknown = sorted(set(config.options) - set(OPTIONS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
        raise ValueError(f"unknown cpu backend option(s) {', '.join(unknown)}; known: {known}")
    from llm_core_cpu.backend import CpuBackend, parse_batch_invariant

    option = config.options.get("batch_invariant")
    invariant = None if option is None else parse_batch_invariant(option)
    return CpuBackend(batch_invariant=invariant)


@hookimpl
def llm_core_backends() -> BackendSpec:
    return BackendSpec(
        name="cpu",
        version=__version__,
        api_version=BUILT_FOR_HAL_API,
        priority=0,  # the last resort: any accelerator that is available wins
        probe=_probe,
        factory=_factory,
        description="PyTorch CPU kernels (fp32, bf16); the default backend",
    )
