"""llm_conformance: the certification suite of llm-core, every model x backend pair.

Operator level: every HAL operator and device-contract method against the float64 reference,
over generated shapes and edge cases. Model level: every supported architecture (tiny
random-weight checkpoints) and the demo model against Hugging Face transformers. Engine
audits: batching, prefix caching, chunked prefill and preemption change no token. The result
is a sealed (optionally signed) JSON certificate, Markdown/HTML reports and JUnit XML.

Run it with ``llm-core conformance``, from Python with :class:`Conformance`, or inside pytest
with ``pytest --pyargs llm_conformance --backend NAME``. See docs/conformance.md.
"""

from llm_conformance.certificate import (
    CertificateError,
    generate_keypair,
    load,
    seal,
    sign,
    verify,
)
from llm_conformance.opsuite import CaseResult, OpResult, OpSuite
from llm_conformance.replay import explain, replay
from llm_conformance.report import console, junit, markdown, to_html, write_reports
from llm_conformance.runner import CERTIFIED, NOT_RUN, Cell, Conformance
from llm_conformance.tolerances import SUITE_VERSION, TOLERANCES, WAIVERS, Tolerance, Waiver
from llm_conformance.tracing import RecordingBackend

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
