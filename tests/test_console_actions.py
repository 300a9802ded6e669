"""The console's actions against a flood: POST /console/cancel needed no right and no rate
applied to it, and each call was one log line. Each test starts the real daemon (the tone
engine) and posts with aiohttp, as the page's fetch does."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until

TONE = "tests.engines.faulty:load"
VIEWER_KEY, ADMIN_KEY = "sk-actions-viewer-01", "sk-actions-admin-02"
RATE = 10  # requests per minute
FLOOD = 1000
# The lines a flood of actions may leave: each throttled count's first line, and its next
# one if the flood outlasts limits.THROTTLE_INTERVAL_S on a loaded machine.
MOST_LINES = 4
ACTION_EVENTS = ("console_action", "console_action_refused", "console_actions_refused",
                 "rate_limited")


def _daemon(make_daemon: DaemonFactory, tmp_path: Path, **sections: dict[str, object]) \
        -> tuple[Daemon, str]:
    listen = f"127.0.0.1:{free_port()}"
    http = {"listen": listen} | sections.pop("http", {})
    daemon = make_daemon(engine={"name": TONE}, http=http, log={"level": "info"}, **sections)
    daemon.start()
    return daemon, f"http://{listen}"


async def _cancels(base: str, count: int, key: str = "") -> tuple[Counter[int], set[str]]:
    """`count` cancels of ids no job has, one after another: their statuses, and the
    Retry-After headers of those refused 429."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    statuses: Counter[int] = Counter()
    retry_after: set[str] = set()
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(count):
            async with session.post(f"{base}/console/cancel",
                                    json={"job": uuid.uuid4().hex}) as reply:
                statuses[reply.status] += 1
                if reply.status == 429:
                    assert (await reply.json())["error"]["code"] == "rate_limit_exceeded"
                    retry_after.add(reply.headers.get("Retry-After", ""))
    return statuses, retry_after


def _action_lines(daemon: Daemon) -> list[dict[str, object]]:
    return [line for event in ACTION_EVENTS for line in daemon.log_events(event)]


def test_a_flood_of_cancels_is_held_to_the_key_s_rate_and_logged_as_a_count(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """A viewer key with rate_limit = 10 posted 3,000 cancels of random ids: 3,000 x 404 in
    3.56 s, 2.86 s of the supervisor's CPU, one console_action line each (180 of the
    admin's 200-line log tail). Past its rate it gets 429 now, and the misses and refusals
    are counted in a line or two; an admin's (no rate) misses are counted too."""
    keys = tmp_path / "api_keys"
    keys.write_text(f"viewer {VIEWER_KEY}\nadmin {ADMIN_KEY}\n")
    daemon, base = _daemon(make_daemon, tmp_path, http={"api_keys_file": str(keys)},
                           http__keys__viewer={"rate_limit": RATE},
                           http__keys__admin={"admin": True})
    statuses, retry_after = asyncio.run(_cancels(base, FLOOD, VIEWER_KEY))
    print("viewer:", dict(statuses))
    assert statuses[404] <= RATE + 2, statuses  # a few more refill while the flood goes
    assert statuses[429] == FLOOD - statuses[404], statuses
    assert retry_after, "no Retry-After"
    assert all(int(value) >= 1 for value in retry_after), retry_after
    admin, _ = asyncio.run(_cancels(base, FLOOD // 4, ADMIN_KEY))
    assert admin == {404: FLOOD // 4}, admin
    counted = wait_until(lambda: daemon.log_events("console_actions_refused"), 10,
                         "the refusals' count in the log")
    assert counted[0]["client"] in ("viewer", "admin"), counted  # a key's name, never the key
    lines = _action_lines(daemon)
    assert len(lines) <= MOST_LINES, lines


def test_without_keys_a_host_s_cancels_are_held_to_http_rate_limit(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Without keys the client is its host, held to http.rate_limit."""
    daemon, base = _daemon(make_daemon, tmp_path, http={"rate_limit": RATE})
    statuses, _ = asyncio.run(_cancels(base, FLOOD // 4))
    assert statuses[404] <= RATE + 2, statuses
    assert statuses[429] == FLOOD // 4 - statuses[404], statuses
    wait_until(lambda: daemon.log_events("console_actions_refused"), 10,
               "the refusals' count in the log")
    assert len(_action_lines(daemon)) <= MOST_LINES, _action_lines(daemon)
