"""What an intake may make the supervisor do and hold, the real intake with a test's
service: one tick's budget of messages (a burst of long texts is spread over ticks, so the
tick comes back to the workers, the other intakes and WATCHDOG=1 in between), and every
client's unread audio together."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from cosyvoiced import clients
from cosyvoiced.admission import TOTAL_BUFFERED_FACTOR
from cosyvoiced.intake.reply import Exchange, ReplyIntake, Submission, _Route
from cosyvoiced.intake.tickbudget import (
    CHARS_PER_TICK,
    MESSAGES_PER_TICK,
    SECONDS_PER_TICK,
    TickBudget,
    in_turn,
)
from cosyvoiced.job import ErrorCode, Job, JobError

LONG = "x" * 50_000  # a quarter of CHARS_PER_TICK


def _spent_after(texts: list[Any], seconds_each: float = 0.0) -> int:
    now = [0.0]
    budget = TickBudget(clock=lambda: now[0])
    for handled, text in enumerate(texts, start=1):
        now[0] += seconds_each  # the message was handled
        if not budget.spend(text):
            return handled
    return len(texts)


def test_the_budget_is_messages_or_characters_whichever_ends_first() -> None:
    assert _spent_after(["hi"] * 1000) == MESSAGES_PER_TICK
    assert _spent_after([LONG] * 100) == CHARS_PER_TICK // len(LONG)
    assert _spent_after([None] * 1000) == MESSAGES_PER_TICK  # a ping, a cancel
    assert _spent_after(["x" * (2 * CHARS_PER_TICK)]) == 1  # one always goes


def test_the_budget_ends_with_the_time_the_messages_took_whatever_they_counted() -> None:
    """A text of one-character sentences takes three times as long to split as its count
    says: 20,000 of them took 0.15 s each, 1.5 s a tick within the other bounds."""
    assert _spent_after(["a。" * 10_000] * 10, seconds_each=0.15) == 1
    assert _spent_after(["hi"] * 1000, seconds_each=SECONDS_PER_TICK / 4) == 4


class _Refusing:
    """Every submission is refused (busy): what the intake admits is all this counts."""

    def __init__(self) -> None:
        self.asked = 0

    def refusal(self, _identity: Any, _per_client: Any = None) -> JobError:
        self.asked += 1
        return JobError(ErrorCode.BUSY, "a test's service refuses everything")


def test_a_reply_intake_handles_one_budget_a_tick_and_asks_for_the_next() -> None:
    wakes: list[int] = []
    intake = ReplyIntake(lambda: wakes.append(1), "test-loop", lambda: 16)
    loop = asyncio.new_event_loop()
    try:
        for n in range(10):
            intake._put(Submission(f"job-{n}", {"text": LONG}, clients.anonymous(f"c{n}"),
                                   Exchange(loop)))
        wakes.clear()
        service = _Refusing()
        intake.handle_inbound(service, TickBudget())  # type: ignore[arg-type]
        assert service.asked == CHARS_PER_TICK // len(LONG)
        assert wakes, "the tick that left messages asked for the next"
        while service.asked < 10:
            intake.handle_inbound(service, TickBudget())  # type: ignore[arg-type]
        assert not list(intake.inbound())
    finally:
        loop.close()


def test_an_intake_takes_nothing_from_a_spent_budget_and_asks_for_the_next_tick() -> None:
    """The tick's one budget, spent by the intakes before it: the messages wait, and the
    next tick comes at once for them."""
    wakes: list[int] = []
    intake = ReplyIntake(lambda: wakes.append(1), "test-loop", lambda: 16)
    loop = asyncio.new_event_loop()
    try:
        intake._put(Submission("job-0", {"text": "hi"}, clients.anonymous("c0"), Exchange(loop)))
        wakes.clear()
        service = _Refusing()
        spent = TickBudget(messages=1)
        spent.spend("another intake's message")
        intake.handle_inbound(service, spent)  # type: ignore[arg-type]
        assert (service.asked, len(wakes)) == (0, 1)
        intake.handle_inbound(service, TickBudget())  # type: ignore[arg-type]
        assert service.asked == 1
    finally:
        loop.close()


class _Cancelling:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        return True


def test_a_client_too_slow_has_its_job_cancelled_whatever_is_left_of_the_budget() -> None:
    """Its audio piles up in the daemon until the job is cancelled: that waits for no
    budget (other intakes may have spent this tick's)."""
    intake = _SmallBound(lambda: None, "test-loop", lambda: 16)
    loop = asyncio.new_event_loop()  # never run: what is posted stays unread
    try:
        intake._routes["job-0"] = _Route(Exchange(loop), clients.anonymous("wyoming:0"))
        chunk = np.zeros((300 << 10) // 4, dtype=np.float32)
        for _ in range(4):  # 1.2 MiB unread, over its 1 MiB
            intake.chunk(_job("job-0"), 0, chunk)
        service = _Cancelling()
        spent = TickBudget(messages=1)
        spent.spend(None)
        intake.handle_inbound(service, spent)  # type: ignore[arg-type]
        assert service.cancelled == ["job-0"]
    finally:
        loop.close()


def test_each_intake_takes_first_from_the_ticks_budget_in_its_turn() -> None:
    takers = ["claims", "http", "wyoming", "zmq"]
    firsts = [in_turn(takers, tick)[0] for tick in range(8)]
    assert firsts == takers + takers
    assert sorted(in_turn(takers, 3)) == sorted(takers)
    assert in_turn([], 5) == []

# -- every client's unread audio together ---------------------------------------------------
def _job(job_id: str) -> Job:
    return Job(id=job_id, text="x", source="wyoming", origin=job_id, output=job_id)


class _SmallBound(ReplyIntake):
    """The real intake, with 1 MiB of unread audio a client (64 MiB in the daemon)."""

    def max_buffered_bytes(self) -> int:
        return 1 << 20


def test_a_reply_intakes_clients_together_leave_a_bounded_amount_unread() -> None:
    """Wyoming counts each connection as a client: 256 that never read held 64 MiB each.
    Together they hold at most TOTAL_BUFFERED_FACTOR times one's bound; past it a client
    that holds some has its job ended (busy), and one that reads is served."""
    intake = _SmallBound(lambda: None, "test-loop", lambda: 16)
    loop = asyncio.new_event_loop()  # never run: what is posted stays unread
    try:
        routes = []
        for n in range(12):
            identity = clients.anonymous(f"wyoming:{n}")
            exchange = Exchange(loop)
            intake._routes[f"job-{n}"] = _Route(exchange, identity)
            routes.append(f"job-{n}")
        chunk = np.zeros((300 << 10) // 4, dtype=np.float32)  # 300 KiB: 3 fit under 1 MiB
        for _ in range(3):
            for job_id in routes:
                intake.chunk(_job(job_id), 0, chunk)
        held = sum(route.exchange.pending_bytes for route in intake._routes.values())
        ended = [job_id for job_id in routes if intake._routes[job_id].ended]
    finally:
        loop.close()
    limit = TOTAL_BUFFERED_FACTOR * intake.max_buffered_bytes()
    assert ended, "12 clients held 12 MiB under a bound of 8"
    assert held <= limit + chunk.nbytes, f"{held >> 20} MiB held"
