"""Reading the audio a test got back, whatever its format, as a player would."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import soundfile


def read_audio(source: Path | bytes) -> tuple[npt.NDArray[np.float32], int]:
    """(mono float32 samples, sample rate). soundfile where it can; FFmpeg (PyAV) for what
    libsndfile refuses: AAC, and a streamed FLAC whose STREAMINFO does not say its length."""
    data = source.read_bytes() if isinstance(source, Path) else source
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
        return np.asarray(samples, dtype=np.float32), int(rate)
    except (soundfile.LibsndfileError, ValueError, RuntimeError, MemoryError):
        return decode_with_ffmpeg(data)


def decode_with_ffmpeg(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    """(mono float32 samples, rate) as FFmpeg decodes them (Opus: always at 48 kHz)."""
    pieces: list[npt.NDArray[np.float32]] = []
    rate = 0
    with av.open(io.BytesIO(data), "r") as container:
        for frame in container.decode(audio=0):
            rate = frame.sample_rate
            array = frame.to_ndarray().astype(np.float32)
            if frame.format.name.startswith("s16"):
                array /= 32768.0
            elif frame.format.name.startswith("s32"):
                array /= 2147483648.0
            pieces.append(array.reshape(-1) if frame.format.is_planar or array.shape[0] == 1
                          else array.mean(axis=0))
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), rate
