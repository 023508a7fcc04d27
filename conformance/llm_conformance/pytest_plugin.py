"""The suite's pytest command-line options, registered through the ``pytest11`` entry point.

pytest reads options before it imports the package it is asked to collect with ``--pyargs``,
so they cannot live in the package's conftest. Everything else of the plugin does (see
``llm_conformance/conftest.py``); until the entry point is installed, load this module with
``pytest -p llm_conformance.pytest_plugin``.
"""

from __future__ import annotations

import pathlib

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llm-conformance", "llm-core conformance suite")
    group.addoption(
        "--backend",
        action="append",
        default=None,
        metavar="NAME",
        help="llm-core conformance: backend to certify (repeatable; default: every "
        "installed backend)",
    )
    group.addoption(
        "--conformance-model",
        action="append",
        default=None,
        metavar="NAME",
        help="architecture, smollm2, or a checkpoint path (repeatable)",
    )
    group.addoption(
        "--conformance-dtype",
        action="append",
        default=None,
        metavar="D",
        help="float32, bfloat16, float16 (repeatable; default: each backend's serving dtypes)",
    )
    group.addoption(
        "--conformance-seed",
        type=int,
        default=1234,
        metavar="N",
        help="seed of every input (default 1234)",
    )
    group.addoption(
        "--conformance-quick",
        action="store_true",
        default=False,
        help="a subset of the operator cases: development, not certification",
    )
    group.addoption(
        "--conformance-no-real-model",
        action="store_true",
        default=False,
        help="skip the demo model",
    )
    group.addoption(
        "--conformance-report",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="write the certificate and the reports here when the session ends",
    )
