"""Which parts of another host's audio for a whole reply are kept (remoteaudio.py): pure
decisions, no Redis."""

from __future__ import annotations

from cosyvoiced.remoteaudio import Arriving, PartAction, entry_order, part_action

KEEP, RESTART, SKIP, BREAK = (PartAction.KEEP, PartAction.RESTART, PartAction.SKIP,
                              PartAction.BREAK)


def _act(arriving: Arriving, sender: str, entry: str, seq: int, frames: int = 10) -> PartAction:
    """What a host does with the part, as sharing.py does."""
    action = part_action(arriving, sender, entry, seq)
    if action is RESTART:
        arriving.begin_again()
    if action in (KEEP, RESTART):
        arriving.kept(sender, entry, frames)
    elif action is BREAK:
        arriving.noted(entry)
    return action


def test_parts_in_order_make_the_reply_whole() -> None:
    arriving = Arriving()
    assert [_act(arriving, "b", f"5-{n}", n) for n in range(3)] == [KEEP] * 3
    assert arriving.whole("b", 30)
    assert not arriving.whole("b", 31), "a sample short is not whole"
    assert not arriving.whole("c", 30), "another host's outcome is not for these parts"
    assert arriving.entries == ["5-0", "5-1", "5-2"]


def test_parts_read_again_after_a_restart_are_kept_once() -> None:
    arriving = Arriving()
    for n in range(2):
        _act(arriving, "b", f"7-{n}", n)
    assert _act(arriving, "b", "7-0", 0) is SKIP  # the stream read again from its start
    assert _act(arriving, "b", "7-1", 1) is SKIP
    assert _act(arriving, "b", "8-0", 2) is KEEP
    assert arriving.whole("b", 30)


def test_another_try_starts_the_reply_again() -> None:
    """A serving host that died (or lost Redis) after some parts: the next try sends its
    own from the first."""
    arriving = Arriving()
    _act(arriving, "b", "1-0", 0)
    _act(arriving, "b", "1-1", 1)
    assert _act(arriving, "c", "9-0", 0) is RESTART
    assert _act(arriving, "c", "9-1", 1) is KEEP
    assert arriving.whole("c", 20)
    assert arriving.entries == ["9-0", "9-1"]


def test_a_missing_part_breaks_the_reply_until_another_try() -> None:
    arriving = Arriving()
    _act(arriving, "b", "1-0", 0)
    assert _act(arriving, "b", "1-2", 2) is BREAK  # the part between was let go by Redis
    assert _act(arriving, "b", "1-3", 3) is BREAK
    assert not arriving.whole("b", 40)
    assert arriving.entries == ["1-0", "1-2", "1-3"], "deleted from Redis with the rest"
    assert _act(arriving, "c", "2-0", 0) is RESTART, "another try mends it"
    assert arriving.whole("c", 10)
    late = Arriving()
    assert _act(late, "b", "4-1", 1) is BREAK, "its first part went before it was read"
    assert not late.whole("b", 10)


def test_a_reply_with_no_audio_has_no_part() -> None:
    assert Arriving().whole("b", 0)
    assert not Arriving().whole("b", 1)


def test_entries_order_by_time_then_sequence() -> None:
    assert entry_order("1700000000000-12") > entry_order("1700000000000-9")
    assert entry_order("1700000000001-0") > entry_order("1700000000000-99")
