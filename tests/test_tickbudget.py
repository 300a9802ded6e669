"""One tick's budget for an intake's messages: a burst of long texts is spread over ticks,
so the tick comes back to the workers, the other intakes and WATCHDOG=1 in between."""

from __future__ import annotations

import asyncio
from typing import Any

from cosyvoiced import clients
from cosyvoiced.intake.reply import Exchange, ReplyIntake, Submission
from cosyvoiced.intake.tickbudget import CHARS_PER_TICK, MESSAGES_PER_TICK, TickBudget
from cosyvoiced.job import ErrorCode, JobError

LONG = "x" * 50_000  # a quarter of CHARS_PER_TICK


def _spent_after(texts: list[Any]) -> int:
    budget = TickBudget()
    for handled, text in enumerate(texts, start=1):
        if not budget.spend(text):
            return handled
    return len(texts)


def test_the_budget_is_messages_or_characters_whichever_ends_first() -> None:
    assert _spent_after(["hi"] * 1000) == MESSAGES_PER_TICK
    assert _spent_after([LONG] * 100) == CHARS_PER_TICK // len(LONG)
    assert _spent_after([None] * 1000) == MESSAGES_PER_TICK  # a ping, a cancel
    assert _spent_after(["x" * (2 * CHARS_PER_TICK)]) == 1  # one always goes


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
        intake.handle_inbound(service)  # type: ignore[arg-type]
        assert service.asked == CHARS_PER_TICK // len(LONG)
        assert wakes, "the tick that left messages asked for the next"
        while service.asked < 10:
            intake.handle_inbound(service)  # type: ignore[arg-type]
        assert not list(intake.inbound())
    finally:
        loop.close()
