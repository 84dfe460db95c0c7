"""Core layer: what the scheduler and the worker ask of every connector, whatever it moves.

A connector kind extends these with its own calls (`kv`); the scheduler
calls these on each connector it holds without knowing which kind it is.
"""

from __future__ import annotations

from typing import Protocol

from pagoda.core.request import Request


class SchedulerConnector(Protocol):
    def request_finished(self, request: Request) -> None:
        """Forget the request (finished, aborted or failed)."""

    def close(self) -> None:
        """Release what reaches the store (sockets, clients)."""


class WorkerConnector(Protocol):
    def flush(self) -> None:
        """Return once everything saved so far is in the store."""

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        """Counters by group (a tier, the connector itself) and name."""

    def close(self) -> None:
        """Stop the connector's threads and close the store behind it."""
