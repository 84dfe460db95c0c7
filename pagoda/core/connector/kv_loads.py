"""Core layer: the scheduler's one record of KV store loads in flight.

A load starts when the scheduler allocates blocks for a store hit and ends
when the worker reports it (`LoadResult`). An in-step load ends in the step
that computes the rest of the prompt. An asynchronous one parks its request
(WAITING_FOR_REMOTE_KVS) until it ends; a parked request that finishes
(an abort) keeps its blocks until then, because the load still writes into
them. A request back from an asynchronous load already holds its blocks and
computed tokens, so it is admitted without asking the prefix cache or the
store again.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.core.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class EndedLoad:
    request: Request
    # An asynchronous load: the request waited for it, parked.
    parked: bool
    # The status the request takes back, on success or when a short load queues it again.
    resume_status: RequestStatus
    # The request finished while its load ran: only its blocks are left to free.
    orphaned: bool = False


class KVLoadTracker:
    def __init__(self) -> None:
        self._in_step: dict[str, Request] = {}
        self._parked: dict[str, tuple[Request, RequestStatus]] = {}
        self._orphaned: dict[str, Request] = {}
        self._resumed: set[str] = set()

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def has_orphans(self) -> bool:
        """Whether finished requests still wait for a load to end before their blocks are freed."""
        return bool(self._orphaned)

    def is_parked(self, request_id: str) -> bool:
        return request_id in self._parked

    def is_resumed(self, request_id: str) -> bool:
        return request_id in self._resumed

    def mark_resumed(self, request_id: str) -> None:
        """The request's asynchronous load succeeded: it waits to be admitted with the KV it holds."""
        self._resumed.add(request_id)

    def admitted(self, request_id: str) -> None:
        """A request back from a load was admitted: it runs like any other from now on."""
        self._resumed.discard(request_id)

    def start_in_step(self, request: Request) -> None:
        self._in_step[request.request_id] = request

    def park(self, request: Request) -> None:
        """Park the request while its asynchronous load runs; it resumes with its current status."""
        self._parked[request.request_id] = (request, request.status)

    def end(self, request_id: str) -> EndedLoad | None:
        """The worker reported the load's end; None when no live request or blocks wait for it."""
        request = self._orphaned.pop(request_id, None)
        if request is not None:
            return EndedLoad(request, parked=True, resume_status=request.status, orphaned=True)
        parked = self._parked.pop(request_id, None)
        if parked is not None:
            request, resume_status = parked
            return EndedLoad(request, parked=True, resume_status=resume_status)
        request = self._in_step.pop(request_id, None)
        if request is not None:
            # The worker knows the request now: should the load need redoing, it comes back as resumed.
            return EndedLoad(request, parked=False, resume_status=RequestStatus.PREEMPTED)
        return None

    def request_finished(self, request: Request) -> bool:
        """Forget the request; True when its blocks must stay allocated until its load ends."""
        request_id = request.request_id
        self._resumed.discard(request_id)
        self._in_step.pop(request_id, None)
        if self._parked.pop(request_id, None) is None:
            return False
        self._orphaned[request_id] = request
        return True
