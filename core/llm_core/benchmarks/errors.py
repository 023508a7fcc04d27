"""The benchmark's one error type for a comparison that cannot run here."""

from __future__ import annotations


class BaselineUnavailableError(RuntimeError):
    """A baseline cannot run on this machine; the message says why and what to install."""
