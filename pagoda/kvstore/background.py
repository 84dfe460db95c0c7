"""KV store layer: keeps the store's bulk work (encoding, checksums, file writes) below the engine's compute.

On a CPU the forward pass keeps every core busy with OpenMP threads that meet
at barriers hundreds of times per step: a store thread that takes a core
stalls the whole team, not one thread. Measured on the 2-core dev machine,
~1.8 s of store work slowed a 30 s batch by ~2.6 s at equal priority, still
~10% at nice 19. Under SCHED_IDLE the store's writers only fill the gaps the
engine leaves (the same batch: ~3% slower with the store than without); under a
load that never leaves any, their queue grows until its byte bound drops
saves, which are counted (`dropped_saves`), never lost silently.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)


def lower_current_thread_priority() -> None:
    """Run the calling thread only when a core would otherwise idle (SCHED_IDLE); Linux only, where
    scheduling policies are per thread."""
    if sys.platform != "linux":
        return
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a sandbox may forbid it: the thread then runs at the engine's priority
        logger.debug("KV store: cannot lower a writer thread's priority (%s)", exc)
