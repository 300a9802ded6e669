"""Client JSON is read in one place, and every way `json` fails on it is one `NotJSON`."""

from __future__ import annotations

import pytest

from cosyvoiced.untrusted import REASON_CHARS, NotJSON, json_value


@pytest.mark.parametrize(("data", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    ("1" * 5000, "Exceeds the limit"),  # an integer of over 4300 digits
    (b"\xff\xfe\xfa", ""),  # not UTF-8 (nor UTF-16/32)
    ("{", "Expecting property name enclosed in double quotes at line 1 column 2"),
    ("", "Expecting value at line 1 column 1"),
])
def test_every_failure_of_json_on_client_input_is_not_json(data: str | bytes,
                                                           reason: str) -> None:
    with pytest.raises(NotJSON) as refused:
        json_value(data)
    assert reason in str(refused.value)
    assert 0 < len(str(refused.value)) <= REASON_CHARS


def test_a_value_that_is_not_text_is_not_json() -> None:
    with pytest.raises(NotJSON):
        json_value(12)  # type: ignore[arg-type]


def test_json_is_read_as_json() -> None:
    assert json_value(b'{"text": "hi", "n": [1, 2.5, null]}') == {"text": "hi",
                                                                  "n": [1, 2.5, None]}
