"""The exceptions that cross the HAL boundary. Each message says what was wrong and what to do."""


class HALError(RuntimeError):
    """Base class of every error raised by the HAL or a backend."""


class BackendUnavailableError(HALError):
    """A backend was asked for but cannot run here (missing SDK, no device, ...)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"backend {name} unavailable: {reason}")
        self.backend = name
        self.reason = reason


class BackendLoadError(HALError):
    """A plugin's entry point failed to import or returned an unusable spec."""


class APIVersionMismatchError(BackendLoadError):
    """A plugin was built against another HAL API version."""

    def __init__(self, name: str, plugin_version: str, host_version: str):
        host_major = host_version.split(".")[0]
        if plugin_version.split(".")[0] == host_major:  # the same major, a newer minor
            fix = f"upgrade llm-core to a release with HAL API {plugin_version} or newer"
        else:
            fix = (
                f"install a release of the plugin built for HAL API {host_major}.x, or a "
                f"release of llm-core with HAL API {plugin_version.split('.')[0]}.x"
            )
        super().__init__(
            f"backend {name} was built for HAL API {plugin_version}, but this llm-core provides "
            f"HAL API {host_version}; {fix}"
        )
        self.backend = name
        self.plugin_version = plugin_version
        self.host_version = host_version


class UnsupportedOpError(HALError):
    """The backend does not implement an operator (or not for these dtypes and shapes)."""

    def __init__(self, backend: str, op: str, detail: str = ""):
        msg = f"backend {backend} does not support operator {op}"
        if detail:
            msg += f" ({detail})"
        msg += "; choose another backend, or enable per-op fallback (LLM_CORE_FALLBACK=cpu)"
        super().__init__(msg)
        self.backend = backend
        self.op = op
