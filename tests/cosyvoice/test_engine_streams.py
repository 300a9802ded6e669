"""The CosyVoice engine serving several segments at once (`open`, `step`, `close`), on the
tiny random models of the checkout lane (COSYVOICE_VERSION=2 or 3; v1 serves one).

The engine is loaded in this process, as a worker loads it: what is checked is what the
engine hands the worker loop, against the same engine's single-stream `synthesize`.

Lengths are compared exactly. The tiny model's stop logit dominates every other one, so
with greedy sampling (upstream's RAS with top_k 1 and a repetition threshold it never
reaches, set in the model's yaml, which both paths read) every piece ends at upstream's
minimum length on both paths. The tokens themselves differ: upstream's own decoding steps
attend to the first position only on the transformers this lane installs (see
test_batched.py), so the audio's samples are not compared here; test_batched.py compares
them against a repaired upstream.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cosyvoiced.config import CosyVoiceConfig, EngineConfig
from cosyvoiced.engines import MultiStreamEngine, StreamOutput, SynthesisRequest
from cosyvoiced.engines.cosyvoice import CosyVoiceEngine, load
from cosyvoiced.engines.cosyvoice_streams import DEFAULT_STREAMS, stream_count
from cosyvoiced.job import ErrorCode, JobFailure
from tests.cosyvoice.conftest import REPO
from tests.cosyvoice.test_cosyvoice import LONG, SHORT, prompt_audio

SPEAKER = "English Female"
PROMPT_TEXT = "Some prompt words."
JOIN_STEPS = (0, 2, 5, 9)
MAX_STEPS = 3000
GREEDY = {"top_k: 25": "top_k: 1", "tau_r: 0.1": "tau_r: 1.1"}


@pytest.fixture(scope="module")
def greedy_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lane's tiny model with greedy sampling in its yaml (its weights linked)."""
    greedy = tmp_path_factory.mktemp("greedy") / model_dir.name
    greedy.mkdir()
    for item in model_dir.iterdir():
        if item.suffix == ".yaml":
            text = item.read_text(encoding="utf-8")
            for default, replacement in GREEDY.items():
                assert default in text
                text = text.replace(default, replacement)
            (greedy / item.name).write_text(text, encoding="utf-8")
        elif item.is_dir():
            (greedy / item.name).symlink_to(item)
        else:
            os.link(item, greedy / item.name)
    return greedy


@pytest.fixture(scope="module")
def engine(greedy_model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> CosyVoiceEngine:
    state = tmp_path_factory.mktemp("state")
    settings = CosyVoiceConfig(model_dir=str(greedy_model_dir), repo=REPO,
                               speakers_file=str(state / "speakers.json"), max_streams=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's dependencies' deprecations
        loaded = load(EngineConfig(name="cosyvoice", cosyvoice=settings))
    return loaded


@pytest.fixture(scope="module")
def batched(engine: CosyVoiceEngine, model_version: int) -> CosyVoiceEngine:
    if model_version == 1:
        pytest.skip("CosyVoice-300M serves one segment at a time")
    return engine


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompt.wav"
    path.write_bytes(prompt_audio())
    return str(path)


@pytest.fixture(scope="module")
def requests(prompt_file: str) -> list[SynthesisRequest]:
    """A built-in voice; a cloned one; a cloned one with a text upstream cuts in two; one
    not streamed, at another speed (so not streamed by upstream either)."""
    return [SynthesisRequest(SHORT, SPEAKER, stream=True),
            SynthesisRequest(SHORT, None, stream=True, prompt_audio=prompt_file,
                             prompt_text=PROMPT_TEXT),
            SynthesisRequest(LONG, None, stream=True, prompt_audio=prompt_file,
                             prompt_text=PROMPT_TEXT),
            SynthesisRequest("Not streamed, and faster.", SPEAKER, speed=1.5)]


@pytest.fixture(scope="module")
def alone(batched: CosyVoiceEngine, requests: list[SynthesisRequest]) -> list[int]:
    """Each request's length in samples, served alone by `synthesize`."""
    return [sum(len(chunk) for chunk in _synthesize(batched, request)) for request in requests]


def _synthesize(engine: CosyVoiceEngine,
                request: SynthesisRequest) -> list[np.ndarray[Any, np.dtype[np.float32]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's torch.cuda.amp deprecation
        return list(engine.synthesize(request))


@dataclass
class Outcome:
    chunks: list[np.ndarray[Any, np.dtype[np.float32]]] = field(default_factory=list)
    ends: int = 0  # `done` outputs
    errors: list[Exception] = field(default_factory=list)
    after_close: list[StreamOutput] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


def _serve(engine: CosyVoiceEngine, requests: Sequence[SynthesisRequest],
           join_steps: Sequence[int], close_after_chunks: dict[int, int] | None = None
           ) -> list[Outcome]:
    """Open each request at its join step and step until every stream has ended; a request
    in `close_after_chunks` is closed once it has had that many chunks."""
    index_of: dict[int, int] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # upstream's torchaudio.load and autocast
            return _steps(engine, requests, join_steps, close_after_chunks or {}, index_of)
    finally:
        for stream_id in index_of:  # a failed test leaves the shared engine idle
            engine.close(stream_id)


def _steps(engine: CosyVoiceEngine, requests: Sequence[SynthesisRequest],
           join_steps: Sequence[int], close_after_chunks: dict[int, int],
           index_of: dict[int, int]) -> list[Outcome]:
    outcomes = [Outcome() for _ in requests]
    closed: set[int] = set()
    for step in range(MAX_STEPS):
        for index, join in enumerate(join_steps):
            if join == step:
                index_of[engine.open(requests[index])] = index
        for output in engine.step():
            outcome = outcomes[index_of[output.stream_id]]
            if index_of[output.stream_id] in closed:
                outcome.after_close.append(output)
                continue
            _record(outcome, output)
        for stream_id, index in index_of.items():
            wanted = close_after_chunks.get(index)
            if wanted is not None and index not in closed and len(outcomes[index].chunks) >= wanted:
                engine.close(stream_id)
                closed.add(index)
        if step >= max(join_steps) and engine.open_streams == 0:
            return outcomes
    raise AssertionError(f"streams still open after {MAX_STEPS} steps")


def _record(outcome: Outcome, output: StreamOutput) -> None:
    if output.audio is not None:
        assert output.audio.dtype == np.float32
        assert output.audio.ndim == 1
        outcome.chunks.append(output.audio)
    outcome.ends += output.done
    if output.error is not None:
        outcome.errors.append(output.error)


def _audible(outcome: Outcome) -> bool:
    audio = np.concatenate(outcome.chunks).astype(np.float64)
    return float(np.sqrt(np.mean(audio ** 2))) > 1e-4 and float(np.max(np.abs(audio))) <= 1.0


def test_streams_opened_at_different_steps_match_synthesize(
        batched: CosyVoiceEngine, requests: list[SynthesisRequest], alone: list[int]) -> None:
    assert isinstance(batched, MultiStreamEngine)
    assert batched.max_streams == 4
    pieces = batched.upstream.frontend.text_normalize(LONG, split=True)
    assert len(pieces) >= 2  # upstream's own cut: one stream speaks both pieces
    outcomes = _serve(batched, requests, JOIN_STEPS)
    for outcome, samples in zip(outcomes, alone, strict=True):
        assert outcome.errors == []
        assert outcome.ends == 1
        assert outcome.samples == samples
        assert _audible(outcome)
    assert len(outcomes[0].chunks) >= 2  # streamed in chunks
    assert len(outcomes[3].chunks) == 1  # not streamed: one chunk


def test_a_closed_stream_says_nothing_more_and_the_others_go_on(
        batched: CosyVoiceEngine, requests: list[SynthesisRequest], alone: list[int]) -> None:
    outcomes = _serve(batched, requests[:3], JOIN_STEPS[:3], close_after_chunks={2: 1})
    assert outcomes[2].ends == 0
    assert outcomes[2].after_close == []
    assert 0 < outcomes[2].samples < alone[2]  # closed mid-way
    for index in (0, 1):
        assert outcomes[index].errors == []
        assert outcomes[index].ends == 1
        assert outcomes[index].samples == alone[index]


def test_a_later_segment_of_a_job_carries_on_with_the_grown_hop(
        batched: CosyVoiceEngine, requests: list[SynthesisRequest]) -> None:
    """As `synthesize` does: a job's first segment starts with upstream's small first hop
    (an early first chunk); a later one (`continues`) with the hop the last one reached."""
    (grown,) = _serve(batched, [requests[2]], [0])
    assert len(grown.chunks) >= 4  # hops of 25, 50 and 100 tokens
    text = LONG.split(". ")[0]
    later, first = _serve(batched, [SynthesisRequest(text, SPEAKER, stream=True,
                                                     continues=True),
                                    SynthesisRequest(text, SPEAKER, stream=True)], [0, 0])
    assert len(later.chunks[0]) > 2 * len(first.chunks[0])
    assert later.samples == first.samples


@pytest.mark.parametrize(("request_fields", "code"), [
    ({"voice": "Nobody"}, ErrorCode.UNKNOWN_VOICE),
    ({"prompt_text": PROMPT_TEXT}, ErrorCode.INVALID_FIELD),
    ({"voice": None, "prompt_audio": "not-audio.wav"}, ErrorCode.PROMPT_AUDIO_UNREADABLE),
    ({"instruct": "Speak slowly."}, ErrorCode.MISSING_FIELD),
])
def test_a_request_it_cannot_serve_fails_at_open(batched: CosyVoiceEngine, tmp_path: Path,
                                                 request_fields: dict[str, Any],
                                                 code: ErrorCode) -> None:
    if request_fields.get("prompt_audio"):
        not_audio = tmp_path / request_fields["prompt_audio"]
        not_audio.write_bytes(b"RIFF, but not a sound file")
        request_fields = {**request_fields, "prompt_audio": str(not_audio)}
    request = SynthesisRequest(**{"text": SHORT, "voice": SPEAKER, **request_fields})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's torchaudio.load
        with pytest.raises(JobFailure) as caught:
            batched.open(request)
    assert caught.value.error.code == code
    assert batched.open_streams == 0
    assert batched.step() == []


def test_a_text_upstream_leaves_nothing_of_ends_at_once(batched: CosyVoiceEngine,
                                                        prompt_file: str) -> None:
    """Upstream's front end drops a piece of punctuation only (a cloned voice: CosyVoice3's
    built-in voices get a system prompt, which turns the front end off)."""
    request = SynthesisRequest("...", None, stream=True, prompt_audio=prompt_file,
                               prompt_text=PROMPT_TEXT)
    assert _synthesize(batched, request) == []
    (outcome,) = _serve(batched, [request], [0])
    assert (outcome.ends, outcome.chunks, outcome.errors) == (1, [], [])


def test_a_segment_the_kv_budget_cannot_hold_fails_alone(
        greedy_model_dir: Path, tmp_path: Path, model_version: int) -> None:
    """A KV cache too small for a segment's worst case even when empty: that stream ends
    with `text_too_long` (a request the worker's settings cannot serve), at its admission."""
    if model_version == 1:
        pytest.skip("CosyVoice-300M serves one segment at a time")
    settings = CosyVoiceConfig(model_dir=str(greedy_model_dir), repo=REPO,
                               speakers_file=str(tmp_path / "speakers.json"), max_streams=2,
                               kv_cache_bytes=64 * 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's dependencies' deprecations
        small = load(EngineConfig(name="cosyvoice", cosyvoice=settings))
    (outcome,) = _serve(small, [SynthesisRequest(LONG, SPEAKER, stream=True)], [0])
    (error,) = outcome.errors
    assert isinstance(error, JobFailure)
    assert error.error.code == ErrorCode.TEXT_TOO_LONG
    assert (outcome.ends, outcome.chunks) == (0, [])


def test_v1_stays_one_stream_per_worker(engine: CosyVoiceEngine, model_version: int) -> None:
    if model_version != 1:
        pytest.skip("a CosyVoice-300M model only")
    assert engine.max_streams == 1
    with pytest.raises(RuntimeError, match="one segment at a time"):
        engine.open(SynthesisRequest(SHORT, SPEAKER))


def test_stream_count_defaults_per_device() -> None:
    assert stream_count(2, 0, "cuda", vllm=False) == DEFAULT_STREAMS["cuda"] == 16
    assert stream_count(3, 0, "cpu", vllm=False) == DEFAULT_STREAMS["cpu"] == 4
    assert stream_count(2, 0, "mps", vllm=False) == DEFAULT_STREAMS["cpu"]
    assert stream_count(2, 7, "cpu", vllm=False) == 7
    assert stream_count(1, 8, "cuda", vllm=False) == 1
    assert stream_count(2, 8, "cuda", vllm=True) == 1

