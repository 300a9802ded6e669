"""The console's boards, taken once for many event streams (no daemon: a stand-in host
counts the snapshots the supervisor's tick would be asked for)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from cosyvoiced import clients
from cosyvoiced.intake.console import _Boards

T = TypeVar("T")


class _CountingHost:
    """Answers every question at once, counting them: each is a snapshot of the board."""

    def __init__(self) -> None:
        self.asked = 0

    async def ask(self, question: Callable[[Any], T], timeout_s: float = 5.0) -> T:
        self.asked += 1
        return {"snapshot": self.asked}  # type: ignore[return-value]

    async def expect_continue(self, request: Any) -> None:
        return None

    async def read_body(self, request: Any, limit: int, setting: str) -> bytes:
        return b""


def test_every_anonymous_viewer_shares_one_board_and_keys_keep_their_own() -> None:
    """Each anonymous stream (keys off, another address) was a client of its own: 500
    streams were 500 snapshots a second on the supervisor's tick. Their connections own no
    job, so they now share one board; a key's board stays its own."""
    host = _CountingHost()

    async def view() -> list[str | None]:
        # All within one SETTLE_S, as the loop's clock has it: on a loaded 2-core machine
        # the 500 calls once took longer, and a second board was taken (asked 3).
        loop = asyncio.get_running_loop()
        frozen = loop.time()
        loop.time = lambda: frozen  # type: ignore[method-assign]
        boards = _Boards(host)
        viewers = [clients.anonymous(f"http:{n:x}", client="peer:192.0.2.7", host="192.0.2.7")
                   for n in range(500)]
        texts = await asyncio.gather(*(boards.text(viewer) for viewer in viewers))
        texts.append(await boards.text(clients.keyed("key", "alice")))
        return texts

    texts = asyncio.run(view())
    assert host.asked == 2
    assert set(texts[:-1]) == {'{"snapshot": 1}'}
    assert texts[-1] == '{"snapshot": 2}'
