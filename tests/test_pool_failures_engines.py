"""Engine doubles for the pool-failure tests (tests/test_pool_failures_*.py): engines that
fail to load on one GPU, at all, after their READY, or when another model already holds
the memory. A test config names one: engine.name = "tests.test_pool_failures_engines:...".
It holds no tests of its own."""

from __future__ import annotations

import fcntl
import os
import threading
import time

from cosyvoiced.config import EngineConfig
from tests.engines.faulty import ToneEngine

OUT_OF_MEMORY = "CUDA out of memory (a test double)"
ONE_MODEL_LOCK = "COSYVOICED_TEST_ONE_MODEL"  # the env var naming the lock file of one_fits
ABORT_AFTER_READY_S = 0.5
SLOW_LOAD_S = 3.0

_held: list[int] = []  # one_fits: the lock's descriptor, held for the worker's life


def gpu1_broken(config: EngineConfig) -> ToneEngine:
    """The tone engine, except on the worker placed on cuda:1, which cannot load it."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "1":
        raise RuntimeError(OUT_OF_MEMORY)
    return ToneEngine()


def out_of_memory(config: EngineConfig) -> ToneEngine:
    raise RuntimeError(OUT_OF_MEMORY)


def aborts_after_ready(config: EngineConfig) -> ToneEngine:
    """Loads, then dies (SIGABRT) ABORT_AFTER_READY_S later, idle: an engine that cannot
    stay up."""
    def abort() -> None:
        time.sleep(ABORT_AFTER_READY_S)
        os.abort()

    threading.Thread(target=abort, name="aborts-after-ready", daemon=True).start()
    return ToneEngine()


def slow_load(config: EngineConfig) -> ToneEngine:
    time.sleep(SLOW_LOAD_S)
    return ToneEngine()


class OneFitsEngine(ToneEngine):
    name = "one-fits"


class OneFitsAgainEngine(ToneEngine):
    name = "one-fits-again"  # the same model, other settings: what a reload changes


def _one_model_only() -> None:
    """Raise as a GPU out of memory would while another worker holds the one model that
    fits: the lock file of $COSYVOICED_TEST_ONE_MODEL is held by the worker that loaded."""
    descriptor = os.open(os.environ[ONE_MODEL_LOCK], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RuntimeError(OUT_OF_MEMORY) from None
    _held.append(descriptor)


def one_fits(config: EngineConfig) -> OneFitsEngine:
    _one_model_only()
    return OneFitsEngine()


def one_fits_again(config: EngineConfig) -> OneFitsAgainEngine:
    _one_model_only()
    return OneFitsAgainEngine()
