"""Encoding synthesized audio into the formats a job can ask for."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import soundfile

# format name -> (soundfile container, subtype)
_CONTAINERS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
}


def join(chunks: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def encode(samples: npt.NDArray[np.float32], sample_rate: int, fmt: str) -> bytes:
    """Mono float32 samples in [-1, 1] as a complete file of format `fmt`."""
    container, subtype = _CONTAINERS[fmt]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, subtype=subtype,
                    format=container)
    return buffer.getvalue()
