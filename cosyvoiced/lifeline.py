"""A spawned child (a worker, the encoder) dies with the supervisor, never lingers as an orphan
holding a model, a GPU or a pipe nobody reads.

The kernel kills a child whose parent dies once the child has asked it to (PR_SET_PDEATHSIG),
but only a parent that dies after the asking: a child takes a second or more to start
(`spawn`: a new interpreter, its imports), and a supervisor killed meanwhile left it running
(a worker was found loading its engine 40 minutes after its daemon was SIGKILLed). So the
child asks, then looks whether the parent that spawned it is already gone, and goes too.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child started with `spawn`: SIGKILL when the supervisor dies, or now if it has."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before we asked
        os.kill(os.getpid(), signal.SIGKILL)
