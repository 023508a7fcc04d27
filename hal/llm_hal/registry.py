"""Backend discovery through entry points and pluggy, and the choice of a backend.

Every backend, the in-tree ones included, is a module named by an entry point in the group
``llm_core.backends``. The registry imports each one, registers it with a pluggy plugin
manager and asks it for its specs. Nothing is skipped silently: a plugin that fails to import,
returns a bad spec or was built for another HAL API version stays in the list with its error.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass, field

import pluggy

from llm_hal import hookspecs
from llm_hal.backend import Backend
from llm_hal.errors import (
    APIVersionMismatchError,
    BackendLoadError,
    BackendUnavailableError,
    HALError,
)
from llm_hal.spec import Availability, BackendConfig, BackendSpec
from llm_hal.version import HAL_API_VERSION, api_compatible

#: Comma-separated names: only these backends may be used.
ENV_ALLOW = "LLM_CORE_BACKENDS"
#: Comma-separated names: these backends are never used.
ENV_DENY = "LLM_CORE_DISABLED_BACKENDS"


@dataclass(slots=True)
class BackendRecord:
    """One discovered backend, usable or not."""

    name: str
    entry_point: str  # "module" as declared, for messages
    distribution: str  # the installed package that declared it
    dist_version: str
    spec: BackendSpec | None = None
    error: str = ""  # why it could not be loaded; empty when it loaded
    _availability: Availability | None = field(default=None, repr=False)

    @property
    def loaded(self) -> bool:
        return self.spec is not None and not self.error

    def availability(self) -> Availability:
        """The probe's answer (cached); a crashing probe counts as unavailable with its error."""
        if self._availability is None:
            if not self.loaded:
                self._availability = Availability.no(f"failed to load: {self.error}")
            else:
                assert self.spec is not None
                try:
                    self._availability = self.spec.probe()
                except Exception as exc:  # a probe must never take the host down
                    self._availability = Availability.no(
                        f"availability probe raised {type(exc).__name__}: {exc}"
                    )
        return self._availability


def _csv(value: str | None) -> set[str]:
    return {x.strip() for x in (value or "").split(",") if x.strip()}


class Registry:
    """The backends installed in this environment."""

    def __init__(self, group: str = hookspecs.ENTRY_POINT_GROUP):
        self.group = group
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        self.records: dict[str, BackendRecord] = {}
        self._discover()

    def _discover(self) -> None:
        for ep in sorted(md.entry_points(group=self.group), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            dist_version = ep.dist.version if ep.dist is not None else "?"
            record = BackendRecord(ep.name, ep.value, dist, dist_version)
            self.records.setdefault(ep.name, record)
            try:
                module = ep.load()
                specs = self._specs_of(ep.name, module)
            except Exception as exc:
                record.error = f"{type(exc).__name__}: {exc}"
                continue
            self.records.pop(ep.name, None)
            for spec in specs:
                self._add(spec, ep.value, dist, dist_version)

    def _specs_of(self, name: str, module: object) -> list[object]:
        """Register one plugin module with pluggy and call its hook through pluggy's relay.

        The hook is called for this plugin alone (a subset hook caller), so a plugin whose
        hook raises is reported with its error and never stops the others.
        """
        pm = self.plugin_manager
        if pm.get_plugin(name) is None:
            pm.register(module, name=name)
        try:
            pm.check_pending()  # a misspelled hook name is an error, not a silent no-op
            if not any(i.plugin is module for i in pm.hook.llm_core_backends.get_hookimpls()):
                raise HALError("the module implements no llm_core_backends hook")
        except Exception:
            pm.unregister(name=name)
            raise
        others = [plugin for plugin in pm.get_plugins() if plugin is not module]
        call_this_plugin = pm.subset_hook_caller("llm_core_backends", remove_plugins=others)
        return [spec for answer in call_this_plugin() for spec in _as_list(answer)]

    def _add(self, spec: object, entry: str, dist: str, dist_version: str) -> None:
        if not isinstance(spec, BackendSpec):
            name = f"{entry}:?"
            self.records[name] = BackendRecord(
                name, entry, dist, dist_version,
                error=f"llm_core_backends returned {type(spec).__name__}, not a BackendSpec",
            )  # fmt: skip
            return
        record = BackendRecord(spec.name, entry, dist, dist_version, spec=spec)
        if not api_compatible(spec.api_version):
            record.error = str(
                APIVersionMismatchError(spec.name, spec.api_version, HAL_API_VERSION)
            )
        elif spec.name in self.records and self.records[spec.name].loaded:
            other = self.records[spec.name]
            record.error = f"name {spec.name!r} is already provided by {other.distribution}"
            spec_name = f"{spec.name} ({dist})"
            record.name = spec_name
            self.records[spec_name] = record
            return
        self.records[spec.name] = record

    # ------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.records)

    def allowed(self, name: str) -> tuple[bool, str]:
        allow, deny = _csv(os.environ.get(ENV_ALLOW)), _csv(os.environ.get(ENV_DENY))
        if allow and name not in allow:
            return False, f"not in {ENV_ALLOW}={os.environ.get(ENV_ALLOW)}"
        if name in deny:
            return False, f"listed in {ENV_DENY}"
        return True, ""

    def spec(self, name: str) -> BackendSpec:
        """The spec of a usable backend, or a clear error saying why it cannot be used."""
        record = self.records.get(name)
        if record is None:
            known = ", ".join(self.names()) or "none"
            raise BackendUnavailableError(
                name, f"no such backend is installed (installed: {known}); "
                f"try `pip install \"llm-core[{name}]\"`",
            )  # fmt: skip
        ok, why = self.allowed(name)
        if not ok:
            raise BackendUnavailableError(name, why)
        availability = record.availability()
        if not availability.available:
            raise BackendUnavailableError(name, availability.reason)
        assert record.spec is not None
        return record.spec

    def choose(self, name: str | None = None) -> BackendSpec:
        """The named backend, or the available allowed one with the highest priority."""
        if name:
            return self.spec(name)
        candidates, reasons = [], []
        for rec_name, record in self.records.items():
            ok, why = self.allowed(rec_name)
            availability = record.availability() if ok else Availability.no(why)
            if availability.available and record.spec is not None:
                candidates.append(record.spec)
            else:
                reasons.append(f"{rec_name}: {availability.reason}")
        if not candidates:
            raise BackendUnavailableError(
                "(auto)", "no backend can run here: " + "; ".join(reasons)
            )
        return max(candidates, key=lambda s: s.priority)

    def create(self, name: str | None = None, config: BackendConfig | None = None) -> Backend:
        """Choose a backend and build an instance of it."""
        spec = self.choose(name)
        try:
            backend = spec.factory(config or BackendConfig())
        except Exception as exc:  # e.g. the SDK the probe found fails to initialize
            raise BackendLoadError(
                f"backend {spec.name} failed to start: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(backend, Backend):
            raise HALError(f"backend {spec.name}'s factory returned {type(backend).__name__}")
        return backend


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


_default: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, discovered on first use."""
    global _default
    if _default is None or refresh:
        _default = Registry()
    return _default
