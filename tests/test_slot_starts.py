"""The decisions about failed starts, without processes: which deaths count against a
slot, when the daemon gives up, how a slot backs off, and when a reload's engine settings
give way to the last that loaded."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import pytest

from cosyvoiced.config import Config, EngineConfig, WorkerConfig
from cosyvoiced.placement import Placement
from cosyvoiced.policy import SETTLED_S, failed_start, no_slot_can_serve
from cosyvoiced.pool import GIVE_UP, REVERT_ENGINE, Slot, Starts
from cosyvoiced.workerhandle import WorkerHandle


@dataclass
class FakeWorker:
    generation: int
    ready: bool = False


@pytest.mark.parametrize(("ready_at", "now", "in_hand", "counts"), [
    (None, 5.0, False, True),  # never got ready
    (10.0, 10.5, False, True),  # died idle just after its READY
    (10.0, 10.0 + SETTLED_S + 1, False, False),  # had settled: a crash, not a start
    (10.0, 10.5, True, False),  # died on a segment: the job's doing (retried, poison)
])
def test_which_deaths_count_as_failed_starts(ready_at: float | None, now: float,
                                             in_hand: bool, counts: bool) -> None:
    assert failed_start(ready_at, now, in_hand) is counts


@pytest.mark.parametrize(("slots", "gives_up"), [
    ([(2, False), (0, True)], False),  # one slot serves: the other keeps trying
    ([(2, False), (1, False)], False),  # one still has tries left
    ([(2, False), (5, False)], True),  # none can serve
    ([(3, True)], False),  # failed before, ready now
    ([], False),
])
def test_the_daemon_gives_up_only_when_no_slot_can_serve(
        slots: list[tuple[int, bool]], gives_up: bool) -> None:
    assert no_slot_can_serve(slots, 2) is gives_up


def config(engine: str, max_start_failures: int = 2) -> Config:
    return Config(engine=EngineConfig(name=engine),
                  worker=WorkerConfig(max_start_failures=max_start_failures, per_device=1))


def slot(index: int, worker: FakeWorker | None = None) -> Slot:
    return Slot(Placement(index, f"cuda:{index}", 0),
                cast("WorkerHandle | None", worker))


def test_a_slot_backs_off_on_its_own_and_the_daemon_gives_up_when_every_slot_failed() -> None:
    running = config("model")
    starts = Starts(lambda: running)
    serving, failing = slot(0, FakeWorker(1, ready=True)), slot(1)
    slots = [serving, failing]
    retries = []
    for generation in range(2, 6):
        starts.engines[generation] = running.engine
        verdict = starts.failed(failing, slots, cast("WorkerHandle", FakeWorker(generation)),
                                100.0, "out of memory")
        assert verdict is None  # slot 0 serves
        retries.append(failing.respawn_at - 100.0)
    assert retries == [1.0, 2.0, 4.0, 8.0]
    assert failing.failing(2)
    assert not serving.failing(2)
    assert starts.failing(slots) == [{"slot": 1, "device": "cuda:1", "tries": 4,
                                      "error": "out of memory"}]
    serving.worker, serving.start_failures = None, 1  # slot 0's worker died too
    starts.engines[6] = running.engine
    assert starts.failed(serving, slots, cast("WorkerHandle", FakeWorker(6)), 100.0,
                         "out of memory") == GIVE_UP


def test_a_reloads_engine_that_cannot_load_gives_way_to_the_last_that_did() -> None:
    running = config("good")
    starts = Starts(lambda: running)
    starts.engines[1] = running.engine
    only = slot(0, FakeWorker(1))
    starts.loaded(only, cast("WorkerHandle", only.worker), 1.0)
    running = replace(running, engine=EngineConfig(name="broken"))  # the SIGHUP
    starts.engines[2] = running.engine
    only.worker = cast("WorkerHandle", FakeWorker(2))
    verdict = starts.failed(only, [only], cast("WorkerHandle", FakeWorker(2)), 5.0, "oom")
    assert verdict == REVERT_ENGINE
    assert only.start_failures == 0  # the settings failed, not the slot
    engine, stale = starts.revert([only])
    assert engine.name == "good"
    assert stale == {0}  # its worker was started with the failed settings
    running = replace(running, engine=engine)
    # A worker started with the failed settings before the revert is not counted either.
    assert starts.failed(only, [only], cast("WorkerHandle", FakeWorker(2)), 6.0,
                         "oom") is None
    assert only.start_failures == 0
