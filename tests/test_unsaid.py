"""Streamed text that says nothing, read at a pace (pure: the clock is passed in)."""

from __future__ import annotations

import pytest

from cosyvoiced.intake.unsaid import CHARS_PER_S, FREE_CHARS, Unsaid


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_up_to_the_free_characters_nothing_waits() -> None:
    clock = _Clock()
    unsaid = Unsaid(clock)
    unsaid.add(int(FREE_CHARS))
    assert unsaid.wait_s() == 0.0


def test_past_them_the_next_message_waits_until_they_are_forgiven() -> None:
    clock = _Clock()
    unsaid = Unsaid(clock)
    unsaid.add(int(FREE_CHARS) + 2_000)
    assert unsaid.wait_s() == pytest.approx(2_000 / CHARS_PER_S)
    clock.now += 1_000 / CHARS_PER_S
    assert unsaid.wait_s() == pytest.approx(1_000 / CHARS_PER_S)
    clock.now += 10.0
    assert unsaid.wait_s() == 0.0
    unsaid.add(int(FREE_CHARS))  # forgiven down to none, not below
    assert unsaid.wait_s() == 0.0


def test_a_client_that_keeps_sending_is_held_to_the_pace() -> None:
    clock = _Clock()
    unsaid = Unsaid(clock)
    sent = 0.0
    for _ in range(100):  # 20,000 characters a message, read as soon as allowed
        unsaid.add(20_000)
        sent += 20_000
        clock.now += unsaid.wait_s()
    assert sent / (clock.now - 100.0) == pytest.approx(CHARS_PER_S, rel=0.05)
