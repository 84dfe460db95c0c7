"""Engine layer: errors the front end raises about the engine itself rather than one request."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine process is gone: nothing in flight will finish and nothing new is accepted."""
