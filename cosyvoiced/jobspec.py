"""Validate the fields of a job request (drop-folder JSON, and later ZeroMQ headers).

Every problem becomes a `JobFailure` whose message names the field and says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

FIELDS = ("text", "voice", "format", "sample_rate", "speed", "output")
MAX_OUTPUT_NAME = 200


@dataclass(frozen=True)
class Limits:
    max_text_chars: int
    default_format: str


def _typed(fields: dict[str, Any], name: str, kind: type | tuple[type, ...],
           described: str) -> Any:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise JobFailure(ErrorCode.INVALID_FIELD,
                         f"{name}: expected {described}; got {type(value).__name__}", name)
    return value


def check_text(text: str, limits: Limits) -> str:
    if not text.strip():
        raise JobFailure(ErrorCode.EMPTY_TEXT, "text: is empty or only whitespace", "text")
    if len(text) > limits.max_text_chars:
        raise JobFailure(ErrorCode.TEXT_TOO_LONG, f"text: {len(text)} characters is over the "
                         f"limit of {limits.max_text_chars}", "text")
    return text


def check_output_name(name: str) -> str:
    """A bare base name that stays inside the outbox: no separators, no dotfiles."""
    problem = None
    if not name or name in (".", ".."):
        problem = "must be a non-empty file name"
    elif "/" in name or "\\" in name or "\0" in name:
        problem = "must be a bare file name, without directories"
    elif name.startswith("."):
        problem = "must not start with a dot"
    elif len(name) > MAX_OUTPUT_NAME:
        problem = f"must be at most {MAX_OUTPUT_NAME} characters"
    elif any(ord(char) < 32 for char in name):
        problem = "must not contain control characters"
    if problem:
        raise JobFailure(ErrorCode.INVALID_OUTPUT_NAME, f"output: {problem}; got {name!r}",
                         "output")
    return name


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
    return Job(
        id=job_id,
        source=source,
        origin=origin,
        text=check_text(text, limits),
        voice=_typed(fields, "voice", str, "a string"),
        format=_format(fields, limits, formats),
        sample_rate=_sample_rate(fields),
        speed=_speed(fields),
        output=check_output_name(output if output is not None else default_output),
        **extra,
    )
