"""Who gives up a connection when a listener is full (pure: no sockets)."""

from __future__ import annotations

from cosyvoiced.intake.crowding import AddressBook, evictee, peer_address


def test_the_host_holding_the_most_gives_one_up_to_a_host_holding_fewer() -> None:
    held = {"a": 5, "b": 3, "c": 1}
    assert evictee(held, ["a", "b", "c"], newcomer="d") == "a"
    assert evictee(held, ["b", "c"], newcomer="d") == "b"  # a's are all busy
    assert evictee(held, ["a", "b"], newcomer="c") == "a"


def test_shares_that_would_only_swap_are_left_alone() -> None:
    # b would hold 3 and a 3: a gives one up. a would hold 3 and b 3 the other way: no.
    assert evictee({"a": 4, "b": 2}, ["a", "b"], newcomer="b") == "a"
    assert evictee({"a": 3, "b": 2}, ["a", "b"], newcomer="b") is None
    assert evictee({"a": 1}, ["a"], newcomer="a") is None  # one host: the cap holds
    assert evictee({"a": 4}, [], newcomer="b") is None  # nothing idle: refuse


def test_the_book_offers_the_oldest_connection_that_can_go() -> None:
    book: AddressBook[str] = AddressBook()
    for name in ("a1-busy", "a2", "a3", "b1"):
        book.add(name[0], name)
    assert book.open == 4
    assert book.make_room("c", lambda c: not c.endswith("busy")) == "a2"
    assert book.open == 3  # its slot is the newcomer's at once
    assert book.make_room("a", lambda c: True) is None
    book.remove("a", "a2")
    book.remove("a", "a2")  # a second time (closed, then gone): counted once
    assert book.open == 3
    assert book.make_room("c", lambda c: True) == "a1-busy"
    for name in ("a1-busy", "a3", "b1"):
        book.remove(name[0], name)
    assert book.open == 0
    assert book.make_room("c", lambda c: True) is None


def test_a_peer_is_known_by_its_host_alone() -> None:
    assert peer_address(("192.0.2.7", 40000)) == "192.0.2.7"
    assert peer_address(("::1", 40000, 0, 0)) == "::1"
    assert peer_address("") == ""  # a Unix socket's peer
    assert peer_address(None) == ""
