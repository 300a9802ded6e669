"""The CosyVoice engine: CosyVoice-300M (v1), CosyVoice2 and CosyVoice3, driven through the
upstream inference code (FunAudioLLM/CosyVoice), installed or from a checkout.

Upstream is built for notebooks and demos; this adapter makes it safe to serve from:
- the version is read from the model directory, and only the options the detected class
  accepts are passed (CosyVoice3 has no `load_jit`); nothing is ever downloaded;
- both API generations work: the prompt as a 16 kHz tensor (before Dec 2025, `622a3a1`)
  or as a file path (after), detected from the signature, not from a version string;
- prompt audio of any rate and format is checked and converted here (cosyvoiced.prompt);
- one request at a time, and after each one (finished, failed or abandoned) the per-request
  state is dropped, the LLM thread is stopped and the CUDA cache emptied: upstream has no
  try/finally there, so a closed generator used to leave all of that behind;
- an exception in upstream's LLM thread ends the request with that error instead of
  leaving a `stream=True` consumer polling forever;
- the shared `token_hop_len` (grown during each streamed call, never reset: upstream
  PR #1849) is reset before every job's first segment, and its later segments carry on
  with the hop it reached, as upstream's own calls of several text segments do;
- the LLM's, the flow's and HiFT's calls are timed (stageclock.py) for the stage timings;
- the RNG reseeding done while loading (yaml `__set_seed*`, `set_all_random_seed(0)`) is
  undone, and the root-logger set-up done on import is put back.

CosyVoice2/3 also serve several segments at once (`open`, `step`, `close`: the worker's
MultiStreamEngine protocol) through the batched decoder (cosyvoice_streams.py, batched.py),
with the same `_plan` of upstream's front end as `synthesize`.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr

from cosyvoiced import logs
from cosyvoiced.config import CosyVoiceConfig, EngineConfig
from cosyvoiced.engines import (
    FEATURES,
    AudioChunk,
    StreamOutput,
    SynthesisRequest,
    VoiceInfo,
    promptfiles,
)
from cosyvoiced.engines.exports import worker_load_dir
from cosyvoiced.engines.stageclock import StageClock
from cosyvoiced.engines.upstream import import_upstream, missing_module
from cosyvoiced.job import ErrorCode, JobFailure
from cosyvoiced.prompt import Samples, read_prompt
from cosyvoiced.speakers import STORED_RATE, Speaker, SpeakerStore
from cosyvoiced.stages import SegmentStages

try:
    import torch
except ModuleNotFoundError as error:  # `pip install cosyvoiced` without the extra
    raise missing_module(error) from error

# After torch: its absence is reported above, by name.
from cosyvoiced.engines.cosyvoice_streams import StreamSet, batched_decoder

ENGINE_NAME = "cosyvoice"
MODEL_CLASSES = {"cosyvoice.yaml": (1, "CosyVoice"), "cosyvoice2.yaml": (2, "CosyVoice2"),
                 "cosyvoice3.yaml": (3, "CosyVoice3")}
LOAD_OPTIONS = ("fp16", "load_jit", "load_trt", "load_vllm")
# Where an instruction ends: v1 and v2/v3 spell it differently. Since `622a3a1` (the file
# path API) callers add it themselves; before, upstream appended it.
END_OF_PROMPT = {1: "<endofprompt>", 2: "<|endofprompt|>", 3: "<|endofprompt|>"}
# CosyVoice3 asserts that <|endofprompt|> is in the prompt or the text; upstream's examples
# put this system prompt in front.
V3_SYSTEM = "You are a helpful assistant."
V3_SYSTEM_PROMPT = V3_SYSTEM + END_OF_PROMPT[3]
TOKENIZER_RATE = 16000
LLM_STOP_TIMEOUT_S = 30.0
log = logs.get_logger("cosyvoiced.engines.cosyvoice")


def _detect_version(model_dir: Path) -> tuple[int, str]:
    for file_name, (version, class_name) in MODEL_CLASSES.items():
        if (model_dir / file_name).is_file():
            return version, class_name
    raise RuntimeError(f"{model_dir} has none of {', '.join(MODEL_CLASSES)}")


def _load_options(model_class: type, settings: CosyVoiceConfig) -> dict[str, bool]:
    accepted = inspect.signature(model_class).parameters
    options = {name: bool(getattr(settings, name)) for name in LOAD_OPTIONS if name in accepted}
    ignored = [name for name in LOAD_OPTIONS
               if name not in accepted and getattr(settings, name)]
    if ignored:
        log.warning("cosyvoice_options_ignored", options=ignored, model=model_class.__name__,
                    message="this model class does not take these options")
    return options


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Loading reseeds every global RNG with constants; put Python's and NumPy's back and
    seed torch's from the OS, so each worker samples differently."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.seed()


class _LlmThreadGuard:
    """Wraps upstream's per-request LLM thread body (`llm_job`): a failure is kept for the
    consumer and marks the request's LLM as ended, so a streaming loop stops waiting."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._run_llm = model.llm_job
        self.failure: BaseException | None = None
        self.threads: list[threading.Thread] = []
        model.llm_job = self._guarded

    def _guarded(self, *args: Any, **kwargs: Any) -> None:
        self.threads.append(threading.current_thread())
        request = kwargs.get("uuid", args[-1] if args else None)
        try:
            self._run_llm(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer thread
            if request in self._model.llm_end_dict:  # not a request we stopped ourselves
                self.failure = error
                self._model.llm_end_dict[request] = True

    def reset(self) -> None:
        self.failure, self.threads = None, []

    def join(self, timeout_s: float) -> list[threading.Thread]:
        """Wait for this request's LLM threads; the ones still running are returned."""
        for thread in self.threads:
            thread.join(timeout_s)
        return [thread for thread in self.threads if thread.is_alive()]


class CosyVoiceEngine:
    name = ENGINE_NAME
    features = frozenset(FEATURES)

    def __init__(self, config: EngineConfig) -> None:
        settings = config.cosyvoice
        upstream = import_upstream(settings.repo)
        self.version, class_name = _detect_version(Path(settings.model_dir))
        model_class = getattr(upstream, class_name, None)
        if model_class is None:
            raise RuntimeError(f"the cosyvoice code in use ({upstream.__file__}) has no "
                               f"{class_name} class; point engine.cosyvoice.repo at a newer "
                               "CosyVoice checkout")
        # With load_trt/load_vllm, from an overlay whose exports go to the cache (exports.py).
        with _random_state_kept(), worker_load_dir(settings, self.version) as load_from:
            self._model = model_class(load_from, **_load_options(model_class, settings))
        self.model_name = Path(settings.model_dir).name
        self._path_api = "prompt_wav" in inspect.signature(
            self._model.inference_zero_shot).parameters
        self._rate = int(getattr(self._model, "sample_rate", 0)
                         or self._model.model.hift.sampling_rate)
        self._token_hop_len = getattr(self._model.model, "token_hop_len", None)
        self._guard = _LlmThreadGuard(self._model.model)
        self.clock = StageClock(self._model.model)
        decoder = batched_decoder(self._model.model, self.version, settings)
        self.max_streams = 1 if decoder is None else decoder.max_streams
        self._bf16 = decoder is not None and decoder.bf16
        # The decoder's HiFT calls go through the clock too: reset before each step, its
        # record does not grow.
        self._streams = None if decoder is None else \
            StreamSet(self._model.model, decoder, self.clock.reset)
        spk2info = getattr(self._model.frontend, "spk2info", {})
        self._builtin = list(spk2info)
        self._speakers = SpeakerStore(settings.speakers_file)
        self._registered: dict[str, Speaker] = {}
        self._refresh_speakers()
        self._default = config.voice or (self._builtin[0] if self._builtin else None)
        if self._default is not None and self._default not in self._voice_names():
            raise ValueError(f"engine.voice: {self._default!r} is not a voice of this model "
                             f"({', '.join(self._voice_names())})")
        log.info("cosyvoice_loaded", version=self.version, model_class=class_name,
                 sample_rate=self._rate, prompt_api="path" if self._path_api else "tensor",
                 builtin_voices=len(self._builtin), registered_voices=len(self._registered),
                 cuda=torch.cuda.is_available(), max_streams=self.max_streams,
                 kv_cache_bytes=0 if decoder is None else decoder.kv_bytes_reserved,
                 cpu_bf16=self._bf16)

    # -- voices -------------------------------------------------------------------------
    def _voice_names(self) -> list[str]:
        return self._builtin + sorted(self._registered)

    def voices(self) -> list[VoiceInfo]:
        self._refresh_speakers()
        return ([VoiceInfo(name, "", self._rate, self.name) for name in self._builtin]
                + [VoiceInfo(name, speaker.language, self._rate, self.name, "registered")
                   for name, speaker in sorted(self._registered.items())])

    def default_voice(self) -> str | None:
        return self._default

    def sample_rate(self, voice: str | None) -> int:
        return self._rate

    def _refresh_speakers(self) -> None:
        """Take up voices registered (or removed) since the last look at the file."""
        if not self._speakers.changed():
            return
        speakers = {speaker.name: speaker for speaker in self._speakers.load()
                    if speaker.name not in self._builtin}
        if hasattr(self._model, "add_zero_shot_spk"):
            self._register_upstream(speakers)
        self._registered = speakers

    def _register_upstream(self, speakers: dict[str, Speaker]) -> None:
        """Precompute each new or changed speaker's prompt features once (upstream
        `add_zero_shot_spk`); the ones already registered keep theirs."""
        spk2info = self._model.frontend.spk2info
        for name in set(self._registered) - set(speakers):
            spk2info.pop(name, None)
        for speaker in speakers.values():
            known = self._registered.get(speaker.name)
            if known is not None and known.prompt_text == speaker.prompt_text \
                    and np.array_equal(known.audio, speaker.audio):
                continue
            with self._prompt(speaker.audio, STORED_RATE) as prompt, torch.inference_mode():
                self._model.add_zero_shot_spk(self._prompt_text(speaker.prompt_text), prompt,
                                              speaker.name)

    # -- prompts ------------------------------------------------------------------------
    @property
    def _prompt_rate(self) -> int:
        """The rate a job's prompt is read at: the one `_prompt` hands upstream, so that it
        is resampled once (through 16 kHz, a 24 kHz model would lose the band above 8 kHz)."""
        return self._rate if self._path_api else TOKENIZER_RATE

    @contextlib.contextmanager
    def _prompt(self, samples: Samples, rate: int) -> Iterator[Any]:
        """What upstream takes as a prompt: a 16 kHz tensor, or (since `622a3a1`) a file it
        reads three times, written here at the model's rate."""
        if not self._path_api:
            yield torch.from_numpy(soxr.resample(samples, rate, TOKENIZER_RATE)).unsqueeze(0)
            return
        if rate != self._rate:
            samples = soxr.resample(samples, rate, self._rate)
        with promptfiles.prompt_file() as wav:
            soundfile.write(wav, samples, self._rate, subtype="FLOAT")
            yield wav

    def _prompt_text(self, text: str) -> str:
        if self.version == 3 and END_OF_PROMPT[3] not in text:
            return V3_SYSTEM_PROMPT + text
        return text

    def _instruction(self, instruct: str) -> str:
        marker = END_OF_PROMPT[self.version]
        if not self._path_api or marker in instruct:
            return instruct
        if self.version == 3:
            instruct = f"{V3_SYSTEM} {instruct}"
        return instruct + marker

    @property
    def upstream(self) -> Any:
        """The loaded upstream model (a CosyVoice, CosyVoice2 or CosyVoice3), for callers
        that measure upstream alone (bench/cosyvoice.py); `clock` times its calls too."""
        return self._model

    # -- synthesis ----------------------------------------------------------------------
    def segment_stages(self) -> SegmentStages | None:
        """The stage timings of the last `synthesize` (StageClock)."""
        return self.clock.read()

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        if self._bf16:
            raise RuntimeError("this CosyVoice engine's model runs in bfloat16 for its batched "
                               "decoder (engine.cosyvoice.cpu_bf16), which upstream's own "
                               "calls cannot take: use open and step")
        self._refresh_speakers()
        with contextlib.ExitStack() as scope:
            start = self._plan(request, scope)
            yield from self._consume(start, request.continues)

    def _plan(self, request: SynthesisRequest,
              scope: contextlib.ExitStack) -> Callable[[], Iterator[dict[str, Any]]]:
        """How upstream is called for this request; `JobFailure` for what it cannot do."""
        registered = self._registered.get(request.voice or "")
        text = request.text if request.language is None \
            else f"<|{request.language}|>{request.text}"
        # Upstream ignores speed when streaming: honour it, chunks come per text segment.
        options = {"stream": request.stream and request.speed == 1.0, "speed": request.speed}
        prompt: Any = None
        if request.prompt_audio is not None:
            prompt = scope.enter_context(self._prompt(
                read_prompt(request.prompt_audio, self._prompt_rate), self._prompt_rate))
        elif request.prompt_text is not None and registered is None:
            raise JobFailure(ErrorCode.INVALID_FIELD, "prompt_text: is the transcript of "
                             "prompt_audio; send prompt_audio with it", "prompt_text")
        if request.instruct is not None:
            return self._plan_instruct(request, text, prompt=prompt, registered=registered,
                                       scope=scope, options=options)
        if prompt is not None and request.prompt_text is not None:
            return lambda: self._model.inference_zero_shot(
                text, self._prompt_text(request.prompt_text or ""), prompt, **options)
        if prompt is not None:
            return self._plan_cross_lingual(text, prompt, options)
        if registered is not None:
            return self._plan_registered(text, registered, scope, options)
        voice = request.voice
        return lambda: self._model.inference_sft(self._prompt_text(text) if self.version == 3
                                                 else text, voice, **options)

    def _plan_cross_lingual(self, text: str, prompt: Any,
                            options: dict[str, Any]) -> Callable[[], Iterator[dict[str, Any]]]:
        if getattr(self._model.frontend, "instruct", False):
            raise JobFailure(ErrorCode.NOT_SUPPORTED, f"prompt_text: {self.model_name} is an "
                             "instruct model, which cannot clone a voice across languages; "
                             "send prompt_text (the prompt's transcript) too", "prompt_text")
        return lambda: self._model.inference_cross_lingual(self._prompt_text(text), prompt,
                                                           **options)

    def _plan_registered(self, text: str, speaker: Speaker, scope: contextlib.ExitStack,
                         options: dict[str, Any]) -> Callable[[], Iterator[dict[str, Any]]]:
        if hasattr(self._model, "add_zero_shot_spk"):
            return lambda: self._model.inference_zero_shot(
                text, "", "", zero_shot_spk_id=speaker.name, **options)
        prompt = scope.enter_context(self._prompt(speaker.audio, STORED_RATE))
        return lambda: self._model.inference_zero_shot(
            text, self._prompt_text(speaker.prompt_text), prompt, **options)

    def _plan_instruct(self, request: SynthesisRequest, text: str, *, prompt: Any,
                       registered: Speaker | None, scope: contextlib.ExitStack,
                       options: dict[str, Any]) -> Callable[[], Iterator[dict[str, Any]]]:
        instruct = self._instruction(request.instruct or "")
        if self.version == 1:
            if prompt is not None or registered is not None:
                raise JobFailure(ErrorCode.NOT_SUPPORTED, "instruct: CosyVoice-300M-Instruct "
                                 "follows instructions in its built-in voices only; leave "
                                 "out prompt_audio or name a built-in voice", "instruct")
            if not getattr(self._model.frontend, "instruct", True):
                raise JobFailure(ErrorCode.NOT_SUPPORTED, f"instruct: {self.model_name} takes "
                                 "no instructions; use a CosyVoice-300M-Instruct model",
                                 "instruct")
            return lambda: self._model.inference_instruct(text, request.voice, instruct,
                                                          **options)
        if prompt is None and registered is None:
            raise JobFailure(ErrorCode.MISSING_FIELD, f"prompt_audio: CosyVoice{self.version} "
                             "speaks instructions in a cloned voice: send prompt_audio or "
                             "name a registered voice", "prompt_audio")
        if prompt is None and registered is not None:
            if hasattr(self._model, "add_zero_shot_spk"):
                return lambda: self._model.inference_instruct2(
                    text, instruct, "", zero_shot_spk_id=registered.name, **options)
            prompt = scope.enter_context(self._prompt(registered.audio, STORED_RATE))
        return lambda: self._model.inference_instruct2(text, instruct, prompt, **options)

    def _consume(self, start: Callable[[], Iterator[dict[str, Any]]],
                 continues: bool = False) -> Iterator[AudioChunk]:
        """Run one upstream generator to its end (or until closed), then clean up after it."""
        model = self._model.model
        # A first segment starts with the small hop, for an early first chunk; a later one
        # plays after audio already sent, so the bigger hop (fewer, cheaper flow passes:
        # each recomputes the prefix) costs no wait. Another job's segment in between may
        # leave it either way; both are correct audio.
        if self._token_hop_len is not None and not continues:
            model.token_hop_len = self._token_hop_len
        self._guard.reset()
        self.clock.reset()
        outputs: Iterator[dict[str, Any]] | None = None
        try:
            while True:
                # Upstream of 2024 updates inference tensors in place between chunks, which
                # fails outside inference mode on CPU (fixed upstream in dc3f643).
                with torch.inference_mode():
                    if outputs is None:
                        outputs = start()
                    output = self._next(outputs)
                if output is None:
                    return
                yield output["tts_speech"].squeeze(0).float().cpu().numpy()
        finally:
            if outputs is not None and hasattr(outputs, "close"):
                outputs.close()
            self._clean_up()

    def _next(self, outputs: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        try:
            output = next(outputs, None)
        except Exception as error:
            if self._guard.failure is not None:
                failure = self._guard.failure
                raise RuntimeError(f"CosyVoice's LLM failed: {type(failure).__name__}: "
                                   f"{failure}") from error
            raise
        if self._guard.failure is not None:
            failure = self._guard.failure
            raise RuntimeError(f"CosyVoice's LLM failed: {type(failure).__name__}: {failure}")
        return output

    # -- several streams at once (MultiStreamEngine: cosyvoice_streams.py) ------------------
    def open(self, request: SynthesisRequest) -> int:
        """Start a segment on the batched decoder; `JobFailure` for a request it cannot
        serve."""
        if self._streams is None:
            raise RuntimeError("this CosyVoice engine serves one segment at a time "
                               "(max_streams 1): use synthesize")
        self._refresh_speakers()
        if request.voice is not None and request.voice not in self._voice_names():
            raise JobFailure(ErrorCode.UNKNOWN_VOICE, f"voice: {request.voice!r} is not a "
                             f"voice of {self.model_name}", "voice")
        scope = contextlib.ExitStack()
        try:
            start = self._plan(request, scope)
        except BaseException:
            scope.close()
            raise
        return self._streams.open(request, start, scope)

    @property
    def open_streams(self) -> int:
        """Streams opened and not yet ended nor closed."""
        return 0 if self._streams is None else self._streams.open_count

    def close(self, stream_id: int) -> None:
        if self._streams is not None:
            self._streams.close(stream_id)

    def step(self) -> list[StreamOutput]:
        return [] if self._streams is None else self._streams.step()

    def _clean_up(self) -> None:
        """Drop every per-request entry upstream keeps (which also stops an LLM thread still
        generating: its next append fails), wait for the thread, give back CUDA cache."""
        model = self._model.model
        with getattr(model, "lock", contextlib.nullcontext()):
            for name, value in vars(model).items():
                if name.endswith("_dict") and isinstance(value, dict):
                    value.clear()
        stuck = self._guard.join(LLM_STOP_TIMEOUT_S)
        if stuck:
            log.error("llm_thread_stuck", threads=len(stuck),
                      message="an LLM thread did not stop; recycle the worker if this repeats")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load(config: EngineConfig) -> CosyVoiceEngine:
    return CosyVoiceEngine(config)
