"""The certificate: one JSON document with everything a run decided, sealed and optionally signed.

Integrity: ``integrity.digest`` is the SHA-256 of the certificate's canonical JSON (sorted keys,
no whitespace, UTF-8, no NaN) without the ``integrity`` field itself, so any edit of any
number is detected. Signature: Ed25519 (the ``cryptography`` package) over the same canonical
bytes. The vendor keeps the private key and publishes the public key; anyone verifies with
``llm-core conformance verify FILE --key PUBLIC.pem``. The certificate names the key it was
signed with (its SHA-256 fingerprint), never carries a secret.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import pathlib
from typing import TYPE_CHECKING, Any

from llm_hal import HAL_API_VERSION

from llm_conformance.cases import FP32_ONLY
from llm_conformance.cell import CELL_FAILED, CELL_UNSUPPORTED, CERTIFIED, NOT_RUN
from llm_conformance.environment import describe_backend, fingerprint
from llm_conformance.opsuite import checked_ops
from llm_conformance.tolerances import (
    MODEL_THRESHOLDS,
    SAMPLING_DRAWS,
    SAMPLING_TV_MAX,
    SUITE_VERSION,
    table_as_dict,
)

if TYPE_CHECKING:
    from llm_conformance.runner import Conformance

FORMAT = "llm-core-conformance-certificate/1"


class CertificateError(ValueError):
    """A certificate is malformed, tampered with, wrongly signed or incomplete."""


# -------------------------------------------------------------------------------------------
# building
# -------------------------------------------------------------------------------------------


def build_certificate(run: Conformance, seconds: float) -> dict[str, Any]:
    """The unsigned certificate of a finished run, sealed with its digest."""
    backends = []
    for backend in run.backends():
        entry: dict[str, Any] = {
            "name": backend.name,
            "status": "ran" if backend.available else NOT_RUN,
            "reason": backend.reason,
            "dtypes": [d.value for d in backend.dtypes],
            **describe_backend(backend.instance, backend.record),
        }
        if backend.ops is not None:
            entry["ops"] = [
                {
                    "op": op,
                    "dtype": dtype.value,
                    "status": result.status,
                    "declared_supported": result.declared_supported,
                    "passed": result.count("passed"),
                    "failed": result.count("failed"),
                    "unsupported": result.count("unsupported"),
                    "seconds": round(sum(c.seconds for c in result.cases), 2),
                    "cases": [c.as_dict(backend.name, run.seed) for c in result.cases],
                }
                for (op, dtype), result in backend.ops.results.items()
            ]
        backends.append(entry)
    cells = [c.as_dict() for c in run.cells()]
    for backend in run.backends():  # every model of an unavailable backend is a NOT RUN cell
        if backend.available:
            continue
        for model in run.models():
            for dtype in backend.dtypes:
                cells.append(run.cell(backend, model, dtype).as_dict())
    counts = {
        s: sum(c["status"] == s for c in cells)
        for s in (CERTIFIED, CELL_FAILED, CELL_UNSUPPORTED, NOT_RUN)
    }
    document: dict[str, Any] = {
        "format": FORMAT,
        "suite_version": SUITE_VERSION,
        "hal_api_version": HAL_API_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "environment": fingerprint(),
        "seeds": {
            "seed": run.seed,
            "case_seed": "crc32(f'{seed}:{op}:{case}:{dtype}')",
            "model_weights_seed": run.seed % 2**31,
        },
        "request": {
            "backends": [b.name for b in run.backends()],
            "models": [m[0] if isinstance(m, tuple) else m.name for m in run.models()],
            "dtypes": [d.value for d in run.requested_dtypes] if run.requested_dtypes else None,
            "quick": run.quick,
            "ops": run.ops,
            "audits": run.run_audits,
        },
        "mandatory": {
            "architectures": run.mandatory_architectures(),
            "dtypes": "each backend's dtypes (backends[].dtypes)",
            "ops": list(checked_ops()),
        },
        "tolerances": table_as_dict(),
        "sampling": {"draws": SAMPLING_DRAWS, "tv_max": SAMPLING_TV_MAX},
        "model_thresholds": {d.value: t.as_dict() for d, t in MODEL_THRESHOLDS.items()},
        "waivers": [w.as_dict() for w in run.waivers],
        "backends": backends,
        "cells": cells,
        "summary": {
            **counts,
            "failed_ops": len(run.failed_ops()),
            "exit_status": run.exit_status(),
        },
    }
    return seal(_finite(document))


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such metrics are written as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# -------------------------------------------------------------------------------------------
# digest and signature
# -------------------------------------------------------------------------------------------


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """The bytes the digest and the signature cover: everything but ``integrity``."""
    body = {k: v for k, v in document.items() if k != "integrity"}
    text = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def seal(document: dict[str, Any]) -> dict[str, Any]:
    """Set ``integrity.digest``; drops any signature, which no longer covers the content."""
    digest = hashlib.sha256(canonical_bytes(document)).hexdigest()
    document["integrity"] = {"digest": {"algorithm": "sha256", "value": digest}, "signature": None}
    return document


def sign(document: dict[str, Any], private_key_pem: bytes) -> dict[str, Any]:
    """Seal and sign with an Ed25519 private key (PEM, PKCS#8, unencrypted)."""
    ed25519, serialization = _crypto()
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CertificateError("the signing key must be an Ed25519 private key (PEM, PKCS#8)")
    seal(document)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    document["integrity"]["signature"] = {
        "algorithm": "ed25519",
        "key_fingerprint": hashlib.sha256(public).hexdigest(),
        "value": base64.b64encode(key.sign(canonical_bytes(document))).decode("ascii"),
    }
    return document


def generate_keypair(
    directory: pathlib.Path, name: str = "conformance"
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a new Ed25519 key pair: ``NAME.key`` (private, mode 0600) and ``NAME.pub``."""
    ed25519, serialization = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def _crypto() -> tuple[Any, Any]:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - cryptography is a dependency
        raise CertificateError(
            "signing and verifying signatures needs the cryptography package: "
            "pip install cryptography"
        ) from exc
    return ed25519, serialization


# -------------------------------------------------------------------------------------------
# verification
# -------------------------------------------------------------------------------------------


def load(path: pathlib.Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{path}: not a readable JSON certificate ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CertificateError(f"{path}: not an llm-core conformance certificate ({FORMAT})")
    return document


def verify(
    document: dict[str, Any],
    public_key_pem: bytes | None = None,
    require_complete: bool = True,
) -> list[str]:
    """Check a certificate; returns what was verified, raises CertificateError on the first
    problem: a digest mismatch, a missing or wrong signature (when a key is given), cells that
    contradict their operator results, or (``require_complete``) a mandatory set not run."""
    checked = []
    integrity = document.get("integrity") or {}
    digest = (integrity.get("digest") or {}).get("value")
    actual = hashlib.sha256(canonical_bytes(document)).hexdigest()
    if digest != actual:
        raise CertificateError(
            "digest mismatch: the certificate was modified after it was issued "
            f"(recorded {digest}, content hashes to {actual})"
        )
    checked.append(f"digest sha256:{actual[:16]}... matches the content")
    signature = integrity.get("signature")
    if public_key_pem is not None:
        checked.append(_verify_signature(document, signature, public_key_pem))
    elif signature:
        checked.append(
            f"signed with key {signature.get('key_fingerprint', '?')[:16]}... "
            "(not checked: pass --key PUBLIC.pem)"
        )
    else:
        checked.append("not signed")
    checked += _verify_consistency(document)
    if require_complete:
        checked += _verify_mandatory(document)
    if document.get("suite_version") != SUITE_VERSION:
        checked.append(
            f"note: issued by suite {document.get('suite_version')}, this is suite {SUITE_VERSION}"
        )
    return checked


def _verify_signature(document: dict[str, Any], signature: Any, public_key_pem: bytes) -> str:
    ed25519, serialization = _crypto()
    if not signature:
        raise CertificateError("the certificate is not signed, but a key was given")
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise CertificateError(f"cannot read the public key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CertificateError("the verification key must be an Ed25519 public key (PEM)")
    if signature.get("algorithm") != "ed25519":
        raise CertificateError(f"unknown signature algorithm {signature.get('algorithm')!r}")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(signature.get("value", "")), canonical_bytes(document))
    except (InvalidSignature, ValueError) as exc:
        raise CertificateError(
            "bad signature: the certificate was not signed by this key, or was modified"
        ) from exc
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"Ed25519 signature valid for key {hashlib.sha256(raw).hexdigest()[:16]}..."


def _verify_consistency(document: dict[str, Any]) -> list[str]:
    """A CERTIFIED cell must rest on a run backend whose traced operators all passed."""
    ops: dict[tuple[str, str, str], str] = {}
    ran = set()
    for backend in document.get("backends", []):
        if backend.get("status") == "ran":
            ran.add(backend["name"])
        for op in backend.get("ops", []):
            ops[(backend["name"], op["op"], op["dtype"])] = op["status"]
    for cell in document.get("cells", []):
        if cell.get("status") != "CERTIFIED":
            continue
        where = f"{cell['model']} x {cell['backend']} x {cell['dtype']}"
        if cell["backend"] not in ran:
            raise CertificateError(f"{where} is CERTIFIED on a backend that did not run")
        if not cell.get("traced_ops"):
            raise CertificateError(f"{where} is CERTIFIED without a traced operator set")
        for op in cell["traced_ops"]:
            dtype = "float32" if op in FP32_ONLY else cell["dtype"]
            status = ops.get((cell["backend"], op, dtype))
            if status != "passed":
                raise CertificateError(
                    f"{where} is CERTIFIED but its operator {op} ({dtype}) is {status or 'missing'}"
                )
    return ["every CERTIFIED cell rests on passed operator results"]


def _verify_mandatory(document: dict[str, Any]) -> list[str]:
    mandatory = document.get("mandatory") or {}
    archs, required_ops = mandatory.get("architectures", []), mandatory.get("ops", [])
    missing = []
    for backend in document.get("backends", []):
        if backend.get("status") != "ran":
            continue
        name = backend["name"]
        dtypes = backend.get("dtypes") or []
        if not dtypes:
            missing.append(f"{name}: no dtype was certified")
        cells = {
            (c["architecture"], c["dtype"])
            for c in document.get("cells", [])
            if c["backend"] == name and c["kind"] == "tiny" and c["status"] != "NOT RUN"
        }
        missing += [
            f"{name}: model {a} in {d}" for a in archs for d in dtypes if (a, d) not in cells
        ]
        have = {(o["op"], o["dtype"]) for o in backend.get("ops", [])}
        for op in required_ops:
            for d in dtypes:
                if (op, "float32" if op in FP32_ONLY else d) not in have:
                    missing.append(f"{name}: operator {op} in {d}")
        if document.get("request", {}).get("quick"):
            missing.append(f"{name}: quick mode ran only part of the operator cases")
    if missing:
        shown = "; ".join(missing[:12]) + (
            f"; and {len(missing) - 12} more" if len(missing) > 12 else ""
        )
        raise CertificateError(f"the mandatory set was not run: {shown}")
    if not any(b.get("status") == "ran" for b in document.get("backends", [])):
        raise CertificateError("no backend ran: the certificate certifies nothing")
    return [
        f"mandatory set complete: {len(archs)} architectures in every dtype of each backend, "
        f"and {len(required_ops)} operators, on every backend that ran"
    ]
