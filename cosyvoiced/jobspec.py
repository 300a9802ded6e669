"""Validate the fields of a job request (drop-folder JSON, and later ZeroMQ headers).

Every problem becomes a `JobFailure` whose message names the field and says what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cosyvoiced import captions, cleanup, pauses
from cosyvoiced.job import (
    FILE_FORMATS,
    MAX_SAMPLE_RATE,
    MAX_SPEED,
    MIN_SAMPLE_RATE,
    MIN_SPEED,
    ErrorCode,
    Job,
    JobFailure,
)

FIELDS = ("text", "voice", "format", "sample_rate", "speed", "output", "prompt_audio",
          "prompt_text", "instruct", "language", "cache", "normalize", "captions")
# A reply's captions come with it (HTTP, ZeroMQ `synthesize`); a spool job's are a file.
REPLY_ONLY = ("timestamps",)
MAX_OUTPUT_NAME = 200  # bytes: with "-JOBID.captions.json" and a temp name's ends, < 255
# Captions are written as OUT.captions.json beside OUT.json: an output named "x.captions"
# would have its record where output "x"'s captions go.
CAPTIONS_STEM = ".captions"
MAX_PROMPT_CHARS = 1000
# CosyVoice's language tags (`<|en|>` ...), for cross-lingual synthesis.
LANGUAGES = ("zh", "en", "jp", "yue", "ko")


# What no engine can take: C0 and C1 control characters but tab, line feed and carriage
# return (NUL ends a C string in an engine library), and lone surrogates (half a UTF-16
# pair: JSON can carry "\\ud800", UTF-8 cannot encode it).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_UNSPEAKABLE = re.compile(f"{_CONTROL.pattern}|{_SURROGATE.pattern}")


@dataclass(frozen=True)
class Limits:
    max_text_chars: int
    default_format: str
    normalize_txt: bool = True  # spool.normalize: the drop folder's .txt files cleaned up


def _typed(fields: dict[str, Any], name: str, kind: type | tuple[type, ...],
           described: str) -> Any:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise JobFailure(ErrorCode.INVALID_FIELD,
                         f"{name}: expected {described}; got {type(value).__name__}", name)
    if isinstance(value, str):
        _refuse(_SURROGATE, value, name)
    return value


def _refuse(forbidden: re.Pattern[str], value: str, name: str) -> None:
    """A `JobFailure` naming the first character of `value` that `forbidden` matches."""
    found = forbidden.search(value)
    if found is None:
        return
    char = found.group()
    what = "a lone surrogate (half of a UTF-16 pair)" if _SURROGATE.match(char) else \
        "a control character; of those only tab, line feed and carriage return may be sent"
    raise JobFailure(ErrorCode.INVALID_FIELD, f"{name}: character {found.start()} (counting "
                     f"from 0) is U+{ord(char):04X}, {what}", name)


def check_text(text: str, limits: Limits, normalize: bool = True) -> str:
    """`text` if an engine can speak it: not empty, not too long, no control character
    but tab and line breaks, no lone surrogate, its pauses valid. `normalize`: cleaned up
    first (cleanup.py: markdown read as prose, emoji dropped, URLs as their host); the
    length is checked before, which bounds the clean-up's work."""
    _refuse(_UNSPEAKABLE, text, "text")
    if not text.strip():
        raise JobFailure(ErrorCode.EMPTY_TEXT, "text: is empty or only whitespace", "text")
    if len(text) > limits.max_text_chars:
        raise JobFailure(ErrorCode.TEXT_TOO_LONG, f"text: {len(text)} characters is over the "
                         f"limit of {limits.max_text_chars}", "text")
    if normalize:
        text = cleanup.clean(text)
        if not text.strip():
            raise JobFailure(ErrorCode.EMPTY_TEXT, "text: nothing is left to say once "
                             "markdown, emoji and URLs are cleaned up; to have it read as "
                             "written, send normalize: false (spool.normalize = false for "
                             "the drop folder's .txt files)", "text")
    pauses.check(text)
    return text


def check_output_name(name: str, field: str = "output") -> str:
    """A bare base name that stays inside its directory: no separators, no dotfiles."""
    problem = None
    if not name or name in (".", ".."):
        problem = "must be a non-empty file name"
    elif "/" in name or "\\" in name or "\0" in name:
        problem = "must be a bare file name, without directories"
    elif name.startswith("."):
        problem = "must not start with a dot"
    elif _SURROGATE.search(name):  # a file name of bytes not UTF-8 (surrogateescape)
        problem = "must be UTF-8 text"
    elif len(name.encode()) > MAX_OUTPUT_NAME:
        problem = f"must be at most {MAX_OUTPUT_NAME} bytes (in UTF-8)"
    elif any(ord(char) < 32 for char in name):
        problem = "must not contain control characters"
    elif field == "output" and name.endswith(CAPTIONS_STEM):
        problem = f"must not end in {CAPTIONS_STEM!r}: the name of another job's captions"
    if problem:
        code = ErrorCode.INVALID_OUTPUT_NAME if field == "output" else ErrorCode.INVALID_FIELD
        raise JobFailure(code, f"{field}: {problem}; got {name!r}", field)
    return name


def _short_text(fields: dict[str, Any], name: str) -> str | None:
    value = _typed(fields, name, str, "a string")
    if value is None:
        return None
    if not value.strip():
        raise JobFailure(ErrorCode.INVALID_FIELD, f"{name}: is empty; leave it out instead",
                         name)
    _refuse(_UNSPEAKABLE, value, name)  # the engine reads it too
    if len(value) > MAX_PROMPT_CHARS:
        raise JobFailure(ErrorCode.INVALID_FIELD, f"{name}: {len(value)} characters is over "
                         f"the limit of {MAX_PROMPT_CHARS}", name)
    return str(value).strip()


def _language(fields: dict[str, Any]) -> str | None:
    value = _typed(fields, "language", str, "a string")
    if value is not None and value not in LANGUAGES:
        raise JobFailure(ErrorCode.INVALID_FIELD, f"language: {value!r} is not one of "
                         f"{', '.join(LANGUAGES)}", "language")
    return None if value is None else str(value)


def _prompt_audio(fields: dict[str, Any]) -> str | None:
    value = _typed(fields, "prompt_audio", str, "the file name of audio in the inbox")
    return None if value is None else check_output_name(value, "prompt_audio")


def _format(fields: dict[str, Any], limits: Limits, formats: tuple[str, ...]) -> str:
    value = _typed(fields, "format", str, "a string") or limits.default_format
    if value not in formats:
        raise JobFailure(ErrorCode.UNSUPPORTED_FORMAT, f"format: {value!r} is not supported; "
                         f"choose one of: {', '.join(formats)}", "format")
    return str(value)


def _sample_rate(fields: dict[str, Any]) -> int | None:
    value = _typed(fields, "sample_rate", int, "an integer (Hz)")
    if value is not None and not MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE:
        raise JobFailure(ErrorCode.INVALID_FIELD, f"sample_rate: {value} Hz is outside "
                         f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}", "sample_rate")
    return int(value) if value is not None else None


def _speed(fields: dict[str, Any]) -> float:
    value = _typed(fields, "speed", (int, float), "a number")
    if value is None:
        return 1.0
    if not MIN_SPEED <= value <= MAX_SPEED:
        raise JobFailure(ErrorCode.INVALID_FIELD,
                         f"speed: {value} is outside {MIN_SPEED}..{MAX_SPEED}", "speed")
    return float(value)


def _choice(fields: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = _typed(fields, name, str, "a string")
    if value is not None and value not in allowed:
        raise JobFailure(ErrorCode.INVALID_FIELD, f"{name}: {value[:40]!r} is not one of "
                         f"{', '.join(allowed)}", name)
    return None if value is None else str(value)


def _flag(fields: dict[str, Any], name: str, default: bool) -> bool:
    value = fields.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise JobFailure(ErrorCode.INVALID_FIELD,
                         f"{name}: expected true or false; got {type(value).__name__}", name)
    return value


def build_job(fields: dict[str, Any], *, job_id: str, source: str, origin: str,
              default_output: str, limits: Limits, known: tuple[str, ...] = FIELDS,
              formats: tuple[str, ...] = FILE_FORMATS, **extra: Any) -> Job:
    """A `Job` from request fields, or a `JobFailure` naming the first bad field.

    `known` lists the fields this kind of request may carry; `extra` sets `Job` attributes
    the intake decides (sink, stream).
    """
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise JobFailure(ErrorCode.UNKNOWN_FIELD, f"{unknown[0]}: unknown field; known fields "
                         f"are: {', '.join(known)}", unknown[0])
    if "text" not in fields:
        raise JobFailure(ErrorCode.MISSING_FIELD, "text: required field is missing", "text")
    text = _typed(fields, "text", str, "a string")
    if text is None:
        raise JobFailure(ErrorCode.INVALID_FIELD, "text: expected a string; got null", "text")
    output = _typed(fields, "output", str, "a string")
    checked: dict[str, Any] = {
        "text": check_text(text, limits, _flag(fields, "normalize", True)),
        "voice": _typed(fields, "voice", str, "a string"),
        "format": _format(fields, limits, formats),
        "sample_rate": _sample_rate(fields),
        "speed": _speed(fields),
        "output": check_output_name(output if output is not None else default_output),
        "prompt_audio": _prompt_audio(fields),
        "prompt_text": _short_text(fields, "prompt_text"),
        "instruct": _short_text(fields, "instruct"),
        "language": _language(fields),
        "timestamps": _choice(fields, "timestamps", captions.LEVELS),
        "captions": _choice(fields, "captions", captions.FILE_KINDS),
    }
    # A cached result has no timings: a job that wants them is always made.
    checked["cache"] = _flag(fields, "cache", True) and checked["timestamps"] is None \
        and checked["captions"] is None
    return Job(id=job_id, source=source, origin=origin, **(checked | extra))
