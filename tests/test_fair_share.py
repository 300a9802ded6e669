"""Turns between clients (shares), without processes: the scheduler is a pure function."""

from __future__ import annotations

from cosyvoiced.scheduler import Assignment, Priority, Waiting, assign, order

INTERACTIVE = Priority.INTERACTIVE


def _flood(share: str, count: int, since: float = 0.0) -> list[Waiting]:
    return [Waiting(f"{share}-{n}", INTERACTIVE, since + n, share=share) for n in range(count)]


def test_a_newcomer_goes_after_one_job_of_a_client_with_two_hundred_queued() -> None:
    waiting = [*_flood("anonymous", 200), Waiting("newcomer", INTERACTIVE, 500.0, share="key:b")]
    first, second, third = (w.job_id for w in order(waiting)[:3])
    assert (first, second, third) == ("anonymous-0", "newcomer", "anonymous-1")


def test_shares_take_turns_job_by_job() -> None:
    waiting = [*_flood("a", 3), *_flood("b", 2, since=10.0)]
    assert [w.job_id for w in order(waiting)] == ["a-0", "b-0", "a-1", "b-1", "a-2"]


def test_a_retry_still_goes_first_of_all() -> None:
    waiting = [*_flood("a", 2), Waiting("crashed", INTERACTIVE, 50.0, started=True,
                                        retry=True, share="b")]
    assert order(waiting)[0].job_id == "crashed"


def test_a_share_alone_may_take_every_place() -> None:
    choices = assign(_flood("a", 5), [0, 1, 2, 3], {}, 4)
    assert [c.job_id for c in choices] == ["a-0", "a-1", "a-2", "a-3"]


def test_a_share_holding_every_place_leaves_the_next_one_to_a_newcomer() -> None:
    # "a" has 4 long jobs in progress (all the class's places) and more queued; a place
    # frees up: the newcomer's job starts there, not a fifth of a's.
    waiting = [*_flood("a", 3, since=100.0), Waiting("newcomer", INTERACTIVE, 200.0,
                                                      share="b")]
    choices = assign(waiting, [0], {INTERACTIVE: 3}, 4, {(INTERACTIVE, "a"): 3})
    assert choices == [Assignment("newcomer", 0)]
    # And while b waits, a holds at most its half of the places.
    newcomer = Waiting("b-1", INTERACTIVE, 300.0, share="b")
    assert assign([*_flood("a", 3, since=100.0), newcomer], [0, 1], {INTERACTIVE: 2}, 4,
                  {(INTERACTIVE, "a"): 2}) == [Assignment("b-1", 0)]


def test_jobs_in_progress_keep_their_turns_whatever_the_places() -> None:
    waiting = [Waiting("a-0", INTERACTIVE, 1.0, started=True, share="a"),
               Waiting("a-1", INTERACTIVE, 2.0, started=True, share="a")]
    choices = assign(waiting, [0, 1], {INTERACTIVE: 2}, 2, {(INTERACTIVE, "a"): 2})
    assert [c.job_id for c in choices] == ["a-0", "a-1"]


def test_a_share_served_last_waits_for_the_others_turn() -> None:
    """Turns, not just ranks: once an anonymous job has run, the newcomer's goes next,
    though the next anonymous job is older."""
    waiting = [*_flood("anonymous", 30), Waiting("newcomer", INTERACTIVE, 100.0, share="b")]
    assert order(waiting, {"anonymous": 5.0})[0].job_id == "newcomer"
    assert assign(waiting, [0], {}, 8, {}, {"anonymous": 5.0}) == [Assignment("newcomer", 0)]
    # And the share that has waited longest since its turn goes first among equals.
    two = [*_flood("a", 2), *_flood("b", 2)]
    assert [w.job_id for w in order(two, {"a": 2.0, "b": 1.0})] == ["b-0", "a-0", "b-1", "a-1"]


def test_hosts_take_turns_within_the_anonymous_share_and_it_keeps_its_one_turn() -> None:
    """One host's 50 anonymous jobs went ahead of another host's (Home Assistant's) one:
    the share was served oldest first. Its hosts take turns now; keys still see the
    anonymous share as one client."""
    flood = [Waiting(f"flood-{n}", INTERACTIVE, float(n), share="anonymous", party="host:a")
             for n in range(50)]
    home = Waiting("home", INTERACTIVE, 100.0, share="anonymous", party="host:b")
    key = Waiting("key", INTERACTIVE, 200.0, share="key:k", party="key:k")
    served = [w.job_id for w in order([*flood, home, key])]
    assert served[:4] == ["flood-0", "key", "home", "flood-1"]
    # The flood's last job just went: whatever its age, the other host's goes next.
    after_a_turn = order([*flood[1:], home, key], {"host:a": 60.0, "anonymous": 60.0})
    assert [w.job_id for w in after_a_turn][:3] == ["key", "home", "flood-1"]
