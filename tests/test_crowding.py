"""Who gives up a connection when a listener is full (no sockets: the rules alone)."""

from __future__ import annotations

from cosyvoiced.intake import zmq as zmq_intake
from cosyvoiced.intake.crowding import QUIET_S, AddressBook, evictee, ip_host, peer_address
from cosyvoiced.intake.zmq_peers import Peer, Peers


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


def test_zap_and_the_socket_name_a_host_alike() -> None:
    """ZAP's address and getpeername's must meet in one spelling, and every local socket's
    peer is one address: libzmq names an IPC peer's process, which would make each one a
    newcomer that always finds room."""
    assert ip_host("127.0.0.2") == ip_host(peer_address(("127.0.0.2", 5555))) == "127.0.0.2"
    assert ip_host("[::1]") == ip_host("0:0::1") == "::1"
    assert ip_host("localhost:0:0:12401") == ip_host("") == ip_host(None) == ""


def test_zeromq_gives_up_the_least_active_peer_that_can_go_of_the_host_holding_most() -> None:
    peers = Peers()
    for fd, (address, active) in enumerate([("a", 3.0), ("a", 1.0), ("a", 2.0), ("b", 0.0),
                                            ("c", 5.0)]):
        peers.by_fd[fd] = Peer(inode=fd, active=active, address=address)
    peers.by_fd[1].client = b"busy"
    chosen = peers.make_room("c", lambda peer: peer.client != b"busy")  # c's is asking
    assert chosen is not None
    assert chosen[0] == 2  # a holds 3, c 0 besides the one asking; a's 1 cannot go
    chosen[1].given_up = True
    assert peers.leaving == 1
    def can_go(peer: Peer) -> bool:
        return peer.client != b"busy"
    assert peers.make_room("a", can_go) is None  # a asks: it holds 1 besides, b and c 1
    chosen = peers.make_room("b", can_go)  # b's one is the one asking: a holds 2 to its 0
    assert chosen is not None
    assert chosen[0] == 0


def test_a_zeromq_connection_with_anything_in_hand_is_never_given_up() -> None:
    """A job or a voice upload in flight, replies not taken, a request in the last QUIET_S,
    or requests the socket thread is not reading (the handoff full): each keeps it."""
    reading = [True]
    connections = zmq_intake._Connections(lambda: 1, lambda: reading[0])
    quiet = QUIET_S
    peer = Peer(inode=1, active=0.0, address="a", client=b"c")
    assert connections._can_go(peer, now=quiet)
    assert not connections._can_go(peer, now=quiet / 2)  # it asked just now
    connections.job_began(b"c")  # a job, or a voice being decoded
    assert not connections._can_go(peer, now=quiet)
    connections.job_ended(b"c")
    assert connections._can_go(peer, now=quiet)
    peer.holding = True
    assert not connections._can_go(peer, now=quiet)
    peer.holding, reading[0] = False, False
    assert not connections._can_go(peer, now=quiet)  # its request may wait in libzmq
    assert connections._can_go(Peer(inode=2, active=0.0), now=0.0)  # it never spoke
