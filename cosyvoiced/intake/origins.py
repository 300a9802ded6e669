"""Without API keys, a request is trusted for where it comes from: this checks that it is not
a web page's, nor a proxy's.

With `http.api_keys_file` off, a loopback peer is the operator (the console's buttons, every
voice) and the API needs no key. A browser on the same machine is a loopback peer too, and
it sends what any web page asks: a `fetch` with a text/plain body needs no preflight, and a
WebSocket is not held to the same-origin rule at all. So without keys:

- a request that names an `Origin` other than the address it was sent to (the `Host` it
  names) is a page of another site (cross-site request forgery): refused;
- a browser sends no `Origin` on a GET that an `<iframe>`, an `<img>` or a no-cors `fetch`
  makes, but it always sends `Sec-Fetch-Site` (clients other than browsers send none): one
  that says `cross-site` or `same-site` (another port of this host is same-site) is a page
  of another origin, which could hold the operator's console streams with a few iframes:
  refused, but for the user's own top-level navigation to a page (a link followed from
  another site), which opens a tab the user sees;
- a `Host` that is a name, not an IP address or `localhost`, may be a DNS rebinding (a
  foreign site's name made to point at 127.0.0.1, so that its page is "same-origin"):
  refused unless listed in `http.allowed_hosts`;
- a request carrying a proxy's `Forwarded` / `X-Forwarded-For` / `X-Real-IP` came through
  one, which makes every client a loopback peer: refused unless `http.allow_insecure`.

With keys on, nothing is trusted for where it comes from, and a key is never sent by the
browser on its own (the console keeps it in the tab, not in a cookie): nothing to check.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
# Sec-Fetch-Site's values for a request a page of another origin made (Fetch Metadata);
# "same-origin" is the console's own page, "none" the user (typed, a bookmark).
OTHER_ORIGINS = ("cross-site", "same-site")
CROSS_ORIGIN = "cross_origin"
HOST_NOT_ALLOWED = "host_not_allowed"
PROXIED_WITHOUT_KEYS = "proxied_without_keys"


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str


def refusal(headers: Mapping[str, str], *, keys_on: bool, allow_insecure: bool,
            allowed_hosts: tuple[str, ...] = ()) -> Refusal | None:
    """Why a request with these headers is not taken without a key (None: it is)."""
    if keys_on:
        return None
    host = headers.get("Host", "")
    if not _trusted_host(_hostname(host), allowed_hosts):
        return Refusal(HOST_NOT_ALLOWED, f"Host: {host[:80]!r} is a name this daemon was not "
                       "told of, and there are no API keys (a DNS rebinding would look so): "
                       "use an IP address or localhost, list the name in http.allowed_hosts, "
                       "or set http.api_keys_file")
    origin = headers.get("Origin")
    if origin is not None and not _same_origin(origin, host):
        return Refusal(CROSS_ORIGIN, f"Origin: {origin[:80]!r} is another site than this "
                       "daemon's, and there are no API keys: a web page may not act here "
                       "(set http.api_keys_file to serve pages of other sites)")
    site = headers.get("Sec-Fetch-Site", "").lower()
    if site in OTHER_ORIGINS and not _followed_link(headers):
        return Refusal(CROSS_ORIGIN, f"Sec-Fetch-Site: {site}: a page of another site or "
                       "port made this request, and there are no API keys: a web page may "
                       "not use this daemon (set http.api_keys_file to serve pages of other "
                       "sites)")
    proxied = [name for name in PROXY_HEADERS if name in headers]
    if proxied and not allow_insecure:
        return Refusal(PROXIED_WITHOUT_KEYS, f"{proxied[0]}: this request came through a "
                       "proxy, which makes every client look local, and there are no API "
                       "keys: set http.api_keys_file (or, on a trusted network, "
                       "http.allow_insecure = true)")
    return None


def _followed_link(headers: Mapping[str, str]) -> bool:
    """A top-level navigation (a link the user followed, into a tab of its own), not a
    frame, an image or a script's request. A page may navigate its own tab too, but what
    it opens it can neither read nor hide, and a POST of a form names its Origin."""
    return headers.get("Sec-Fetch-Mode", "").lower() == "navigate" and \
        headers.get("Sec-Fetch-Dest", "").lower() == "document"


def _hostname(host: str) -> str:
    """The name or address of a Host header, without its port (an IPv6 one in brackets)."""
    try:
        return (urlsplit(f"//{host}").hostname or "").rstrip(".")
    except ValueError:  # a bad port, unbalanced brackets: no host we know
        return ""


def _trusted_host(name: str, allowed: tuple[str, ...]) -> bool:
    if not name:
        return False
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name in {a.lower().rstrip(".") for a in allowed}
    return True  # an address cannot be rebound; one not ours never reaches us


def _same_origin(origin: str, host: str) -> bool:
    """Does the page at `origin` come from the address the request was sent to?"""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (a sandbox, a file), or something no browser sends
    return parts.netloc.lower() == host.lower()
