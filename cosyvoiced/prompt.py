"""Prompt audio for voice cloning: read whatever soundfile reads, check it, make it mono.

Used by the worker before a prompt reaches an engine and by the supervisor when a voice is
registered, so both refuse the same files with the same error codes. No torch here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

from cosyvoiced.job import ErrorCode, JobFailure

# Under a second there is too little speech to take a voice from; CosyVoice's speech
# tokenizer asserts on more than 30 s.
MIN_PROMPT_S = 1.0
MAX_PROMPT_S = 30.0
# A header may claim any rate and channel count (FLAC: up to 655,350 Hz, 8 channels): 30 s
# of that decoded at once was 719 MiB. Read a block at a time, mixed down as it comes.
MAX_PROMPT_RATE = 192_000
_BLOCK_FRAMES = 1 << 16
FIELD = "prompt_audio"

Samples = npt.NDArray[np.float32]


def read_prompt(source: str | Path | bytes, sample_rate: int) -> Samples:
    """Mono float32 samples at `sample_rate`; `JobFailure` naming what is wrong otherwise."""
    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes)
                                 else source) as audio:
            rate, frames = audio.samplerate, audio.frames
            if rate > MAX_PROMPT_RATE:
                raise JobFailure(ErrorCode.PROMPT_AUDIO_UNREADABLE, f"{FIELD}: {rate} Hz is "
                                 f"over {MAX_PROMPT_RATE} Hz", FIELD)
            if frames > (MAX_PROMPT_S + 1) * rate:  # refuse before decoding it all
                raise _too_long(frames / rate)
            blocks = [block.mean(axis=1) for block in audio.blocks(
                _BLOCK_FRAMES, dtype="float32", always_2d=True)]
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise JobFailure(ErrorCode.PROMPT_AUDIO_UNREADABLE, f"{FIELD}: not an audio file "
                         f"soundfile can read ({error})", FIELD) from None
    mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if mono.shape[0] == 0 or rate <= 0:
        raise JobFailure(ErrorCode.PROMPT_AUDIO_UNREADABLE, f"{FIELD}: holds no audio", FIELD)
    check_duration(mono.shape[0] / rate)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_duration(seconds: float) -> None:
    if seconds < MIN_PROMPT_S:
        raise JobFailure(ErrorCode.PROMPT_AUDIO_TOO_SHORT, f"{FIELD}: {seconds:.2f} s is too "
                         f"short; give at least {MIN_PROMPT_S:g} s of speech", FIELD)
    if seconds > MAX_PROMPT_S:
        raise _too_long(seconds)


def _too_long(seconds: float) -> JobFailure:
    return JobFailure(ErrorCode.PROMPT_AUDIO_TOO_LONG, f"{FIELD}: {seconds:.1f} s is too "
                      f"long; CosyVoice takes at most {MAX_PROMPT_S:g} s", FIELD)
