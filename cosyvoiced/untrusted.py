"""JSON from clients, read so that no input escapes as anything but one error.

`json` fails on untrusted input in more ways than `JSONDecodeError`: bytes that are not
UTF-8 (`UnicodeDecodeError`), nesting too deep for its parser (`RecursionError`, which
once killed the ZeroMQ thread), an integer of more than 4300 digits (`ValueError`), a
value that is not text at all (`TypeError`). Every intake reads client JSON here and gets
one `NotJSON` with the reason, which it turns into its own protocol's error.
"""

from __future__ import annotations

import json
from typing import Any

REASON_CHARS = 200  # a reason quotes the input: bounded, for the error and the log


class NotJSON(ValueError):
    """Not one usable JSON value; the message says why."""


def json_value(data: str | bytes) -> Any:
    """The JSON value of `data`, or `NotJSON`."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise NotJSON(f"{error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise NotJSON("nested too deep") from None
    except (ValueError, TypeError) as error:
        reason = str(error) or type(error).__name__
        raise NotJSON(reason[:REASON_CHARS]) from None
