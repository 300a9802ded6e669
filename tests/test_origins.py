"""Without API keys, which requests are taken for where they come from (pure)."""

from __future__ import annotations

import pytest

from cosyvoiced.intake.origins import (
    CROSS_ORIGIN,
    HOST_NOT_ALLOWED,
    PROXIED_WITHOUT_KEYS,
    refusal,
)


def _code(headers: dict[str, str], *, keys_on: bool = False, allow_insecure: bool = False,
          allowed_hosts: tuple[str, ...] = ()) -> str | None:
    refused = refusal(headers, keys_on=keys_on, allow_insecure=allow_insecure,
                      allowed_hosts=allowed_hosts)
    return None if refused is None else refused.code


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000",
                                  "app.localhost:8000", "192.168.1.20:8000", "10.0.0.1"])
def test_an_address_or_localhost_is_taken(host: str) -> None:
    assert _code({"Host": host}) is None
    assert _code({"Host": host, "Origin": f"http://{host}"}) is None  # the console's own page


@pytest.mark.parametrize("host", ["rebind.evil.example:8000", "x", "", "tts.lan:99999",
                                  "[::1:8000"])
def test_a_name_not_listed_is_refused_as_a_rebinding_may_be(host: str) -> None:
    assert _code({"Host": host}) == HOST_NOT_ALLOWED
    assert _code({"Host": host}, keys_on=True) is None  # a key is no browser's to send


def test_a_listed_name_is_taken() -> None:
    assert _code({"Host": "tts.lan:8000"}, allowed_hosts=("TTS.lan",)) is None
    assert _code({"Host": "tts.lan.:8000"}, allowed_hosts=("tts.lan",)) is None
    assert _code({"Host": "tts.lan.evil:8000"}, allowed_hosts=("tts.lan",)) == HOST_NOT_ALLOWED


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1:9000",
                                    "https://127.0.0.1:8000", "null", "file://", ""])
def test_a_page_of_another_origin_is_refused(origin: str) -> None:
    headers = {"Host": "127.0.0.1:8000", "Origin": origin}
    if origin.startswith("https"):  # the scheme is not compared: the address is
        assert _code(headers) is None
        return
    assert _code(headers) == CROSS_ORIGIN
    assert _code(headers, keys_on=True) is None


def test_a_proxied_request_needs_keys_or_allow_insecure() -> None:
    for header in ("Forwarded", "X-Forwarded-For", "X-Real-IP"):
        headers = {"Host": "127.0.0.1:8000", header: "203.0.113.5"}
        assert _code(headers) == PROXIED_WITHOUT_KEYS
        assert _code(headers, allow_insecure=True) is None
        assert _code(headers, keys_on=True) is None


FRAME = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}
IMAGE = {"Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
LINK = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}


@pytest.mark.parametrize("site", ["cross-site", "same-site", "Cross-Site"])
def test_a_frame_or_image_of_another_site_is_refused_though_it_names_no_origin(
        site: str) -> None:
    """A browser names no Origin on a frame's or an image's GET, but always its
    Sec-Fetch-Site; another port of this host is same-site."""
    for kind in (FRAME, IMAGE, {}):
        headers = {"Host": "127.0.0.1:8000", "Sec-Fetch-Site": site} | kind
        assert _code(headers) == CROSS_ORIGIN, kind
        assert _code(headers, keys_on=True) is None


def test_the_console_s_own_page_the_user_and_a_followed_link_are_taken() -> None:
    host = {"Host": "127.0.0.1:8000"}
    assert _code(host | {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}) is None
    assert _code(host | {"Sec-Fetch-Site": "none"} | LINK) is None  # typed, a bookmark
    assert _code(host | {"Sec-Fetch-Site": "cross-site"} | LINK) is None  # into its own tab
    assert _code(host) is None  # curl, the SDKs: no browser
