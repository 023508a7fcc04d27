"""llm_conformance: the certification suite of llm-core, every model x backend pair.

Operator level: every HAL operator and device-contract method against the float64 reference,
over generated shapes and edge cases. Model level: every supported architecture (tiny
random-weight checkpoints) and the demo model against Hugging Face transformers. Engine
audits: batching, prefix caching, chunked prefill, preemption, graph capture and speculative
decoding change no token. The result is a sealed (optionally signed) JSON certificate,
Markdown/HTML reports and JUnit XML.

Run it with ``llm-core conformance``, from Python with :class:`Conformance`, or inside pytest
with ``pytest --pyargs llm_conformance --backend NAME``. See docs/conformance.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_conformance.cell import CERTIFIED, NOT_RUN, Cell
    from llm_conformance.certificate import (
        CertificateError,
        generate_keypair,
        load,
        seal,
        sign,
        verify,
    )
    from llm_conformance.diff import Diff
    from llm_conformance.opsuite import CaseResult, OpResult, OpSuite
    from llm_conformance.replay import explain, replay
    from llm_conformance.report import console, junit, markdown, to_html, write_reports
    from llm_conformance.runner import Conformance
    from llm_conformance.tolerances import SUITE_VERSION, TOLERANCES, WAIVERS, Tolerance, Waiver
    from llm_conformance.tracing import RecordingBackend

# Public names are imported on first use: the pytest plugin (llm_conformance.pytest_plugin,
# loaded by every pytest run in an environment where llm-core is installed) must not import
# torch, transformers or triton before the test session's own setup runs.
_HOME = {
    "diff": ["Diff"],
    "certificate": ["CertificateError", "generate_keypair", "load", "seal", "sign", "verify"],
    "opsuite": ["CaseResult", "OpResult", "OpSuite"],
    "replay": ["explain", "replay"],
    "report": ["console", "junit", "markdown", "to_html", "write_reports"],
    "cell": ["CERTIFIED", "NOT_RUN", "Cell"],
    "runner": ["Conformance"],
    "tolerances": ["SUITE_VERSION", "TOLERANCES", "WAIVERS", "Tolerance", "Waiver"],
    "tracing": ["RecordingBackend"],
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_conformance' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llm_conformance.{module}"), name)
    # Importing llm_conformance.replay binds the submodule to the package attribute "replay";
    # the public name is the function, so bind that instead.
    globals()[name] = value
    return value


__all__ = [
    "CERTIFIED",
    "NOT_RUN",
    "SUITE_VERSION",
    "TOLERANCES",
    "WAIVERS",
    "CaseResult",
    "Cell",
    "CertificateError",
    "Conformance",
    "Diff",
    "OpResult",
    "OpSuite",
    "RecordingBackend",
    "Tolerance",
    "Waiver",
    "console",
    "explain",
    "generate_keypair",
    "junit",
    "load",
    "markdown",
    "replay",
    "seal",
    "sign",
    "to_html",
    "verify",
    "write_reports",
]
