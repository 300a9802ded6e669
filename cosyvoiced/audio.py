"""Encoding synthesized audio into the formats a job can ask for."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import soundfile

from cosyvoiced.job import PCM_FORMAT

# format name -> (soundfile container, subtype)
_CONTAINERS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
}


def join(chunks: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def to_pcm16(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    """The one float -> 16-bit conversion, so streamed chunks and whole files agree exactly."""
    pcm: npt.NDArray[np.int16] = np.rint(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    return pcm


def encode(samples: npt.NDArray[np.float32], sample_rate: int, fmt: str) -> bytes:
    """Mono float32 samples in [-1, 1] as a complete file of format `fmt`."""
    if fmt == PCM_FORMAT:
        return to_pcm16(samples).tobytes()
    container, subtype = _CONTAINERS[fmt]
    data = to_pcm16(samples) if subtype == "PCM_16" else np.clip(samples, -1.0, 1.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, data, sample_rate, subtype=subtype, format=container)
    return buffer.getvalue()
