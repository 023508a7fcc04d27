"""The pytest plugin: ``pytest --pyargs llm_conformance --backend NAME``.

This conftest is loaded when pytest collects the package (its options come from
``pytest_plugin``, registered through the ``pytest11`` entry point). It turns every operator x
dtype and every model x dtype of every requested backend into its own test (``test_suite.py``);
a backend that cannot run here makes its tests skip with the reason. ``--conformance-report
DIR`` writes the certificate and the reports when the session ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_conformance.opsuite import OpSuite
from llm_conformance.runner import Conformance


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _make_run(config: pytest.Config) -> Conformance:
    run = getattr(config, "_llm_conformance", None)
    if run is None:
        run = Conformance(
            backends=_split(config.getoption("--backend")),
            models=_split(config.getoption("--conformance-model")),
            dtypes=_split(config.getoption("--conformance-dtype")),
            seed=config.getoption("--conformance-seed"),
            quick=config.getoption("--conformance-quick"),
            real_model=not config.getoption("--conformance-no-real-model"),
        )
        config._llm_conformance = run  # type: ignore[attr-defined]
    return run


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    run = _make_run(metafunc.config)
    if "op_case" in metafunc.fixturenames:
        params = [
            pytest.param((b.name, op, dtype), id=f"{b.name}-{op}-{dtype.value}")
            for b in run.backends()
            for op, dtype in OpSuite.keys_for(b.dtypes)
        ]
        metafunc.parametrize("op_case", params)
    if "model_case" in metafunc.fixturenames:
        names = run._model_requests()
        params = [
            pytest.param((b.name, index, dtype), id=f"{b.name}-{name}-{dtype.value}")
            for b in run.backends()
            for index, name in enumerate(names)
            for dtype in b.dtypes
        ]
        metafunc.parametrize("model_case", params)


@pytest.fixture(scope="session")
def conformance(request: pytest.FixtureRequest) -> Iterator[Conformance]:
    """The session's run; reports are written when the session ends."""
    run = _make_run(request.config)
    yield run
    directory = request.config.getoption("--conformance-report")
    if directory is not None:
        from llm_conformance.certificate import build_certificate
        from llm_conformance.report import write_reports

        write_reports(build_certificate(run, 0.0), directory)
    run.close()
