"""The pluggy hook specifications a backend plugin implements.

A plugin is a module named by an entry point in the group ``llm_core.backends``; it decorates
its functions with :data:`hookimpl`. Hook implementations may accept fewer arguments than the
spec declares, so specs can grow without breaking plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from llm_hal.spec import BackendSpec

PROJECT = "llm_core"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The entry point group every backend, built-in or third-party, registers in.
ENTRY_POINT_GROUP = "llm_core.backends"


# -------------------------------------------------------------------------------------------
# discovery
# -------------------------------------------------------------------------------------------


@hookspec
def llm_core_backends() -> BackendSpec | list[BackendSpec]:  # type: ignore[empty-body]
    """Describe the backend(s) this plugin provides.

    Called once per plugin at discovery. Must be cheap and must not import the vendor SDK:
    put those imports inside ``BackendSpec.probe`` and ``BackendSpec.factory``.

    :return: one :class:`~llm_hal.spec.BackendSpec` or a list of them.
    """
