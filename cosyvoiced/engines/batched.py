"""Many CosyVoice2/3 segments on one loaded model: continuous batching of the language model
and batched flow matching, driven one step at a time by the worker's loop.

`BatchedDecoder(model, max_streams, kv_cache_bytes)` wraps the `model` attribute of a loaded
upstream `CosyVoice2`/`CosyVoice3` (its `CosyVoice2Model`/`CosyVoice3Model`) and calls its
submodules; upstream's code is neither copied nor changed. A stream is the `model_input`
dict upstream's front end makes for one segment (`frontend_sft`, `frontend_zero_shot`, ...).

Each `step()`:
1. drops the streams cancelled since the last step, freeing their KV blocks;
2. admits waiting streams while a row and KV blocks for their worst case are free, and
   prefills the streams admitted at this step as one right-padded batch (each stream's
   keys and values go to its own KV blocks);
3. decodes one token for every stream whose language model is still running, as one batch
   over the paged KV pool (`decodestep`; on CUDA replayed from graphs, `cudagraphs`), and
   samples all of them (with the new streams' first token) by upstream's RAS rules in one
   pass: one device-to-host copy per step;
4. runs token-to-wave for every stream with a chunk due (one estimator batch for all),
   a job's first audio first: others' later chunks give way to it for a while (`firstaudio`);
5. returns the events: audio chunks, ends, errors.

A stream's KV blocks are freed when its language model ends (it may still have audio to
make). An error in one stream's prefill or token-to-wave ends that stream only.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from cosyvoiced.engines import bf16, firstaudio, ras, token2wav
from cosyvoiced.engines.cudagraphs import GraphedStep
from cosyvoiced.engines.decodestep import DecodeStep
from cosyvoiced.engines.kvpool import KVBudgetError, KVPool, KVShape, Reservation
from cosyvoiced.engines.stageclock import Span, StageTally

# Upstream's CosyVoice3LM asserts this id (<|endofprompt|>) is in the text or prompt text.
END_OF_PROMPT_ID = 151646
# Upstream's llm_job keeps at most this many consecutive silent tokens (CosyVoice3).
MAX_SILENT_RUN = 5
DEFAULT_TOKENS_PER_STREAM = 2048


@dataclass(frozen=True)
class StreamRequest:
    """One segment: upstream's front-end output, and how to speak it."""

    model_input: Mapping[str, Any]
    stream: bool = True
    speed: float = 1.0
    seed: int = 0
    hop: int = 0  # the first chunk's hop in tokens; 0: upstream's first (ChunkPlan.start)
    # Where this stream's stage timings go (one tally for all the pieces of a segment); in
    # a batch, a stream's time in a call is the whole batched call's.
    stages: StageTally | None = None


@dataclass(frozen=True)
class StreamEvent:
    """What a step produced for one stream: an audio chunk (1, samples) on the CPU, the
    end of the stream (with the speech tokens it spoke and the hop its chunks reached), or
    its error. `mel` is the chunk's mel, for inspection."""

    stream_id: int
    audio: torch.Tensor | None = None
    mel: torch.Tensor | None = None
    done: bool = False
    speech_tokens: tuple[int, ...] = ()
    hop: int = 0
    error: BaseException | None = None
    cancelled: bool = False


@dataclass
class _Stream:
    stream_id: int
    request: StreamRequest
    plan: token2wav.ChunkPlan
    vocoder: token2wav.Vocoder
    lm_input: torch.Tensor | None = None
    min_len: int = 0
    max_len: int = 0
    reservation: Reservation | None = None
    length: int = 0  # tokens whose keys and values are in the pool
    drawn: int = 0  # tokens the language model has produced
    llm_done: bool = False
    speech_tokens: list[int] = field(default_factory=list)
    silent_run: int = 0
    llm_started: float = 0.0  # when its prefill began
    last_token_at: float | None = None  # when its last speech token was drawn
    waited: int = 0  # steps its due chunk has given way to others' first audio

    @property
    def opening(self) -> bool:
        """Before its job's first audio: a streamed job's first segment, no chunk made."""
        return self.request.stream and self.request.hop == 0 and self.plan.offset == 0

    def input(self, key: str, default: torch.Tensor) -> torch.Tensor:
        value = self.request.model_input.get(key)
        return default if value is None else value


def _ratio_defaults(llm: Any) -> tuple[float, float]:
    """The min and max speech tokens per text token `llm.inference` draws by default, from
    its signature (upstream's; or a wrapper's that fixes them, as the benchmarks' does)."""
    parameters = inspect.signature(llm.inference).parameters
    return (float(parameters["min_token_text_ratio"].default),
            float(parameters["max_token_text_ratio"].default))


def _kv_shape(qwen: Any, dtype: torch.dtype) -> KVShape:
    config = qwen.config
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    return KVShape(layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads,
                   head_dim=head_dim, dtype=dtype)


class BatchedDecoder:
    """Up to `max_streams` CosyVoice2/3 segments at once on one upstream model object."""

    def __init__(self, model: Any, max_streams: int = 4, kv_cache_bytes: int | None = None,
                 *, min_token_text_ratio: float | None = None,
                 max_token_text_ratio: float | None = None,
                 first_audio_patience: int | None = None, cpu_bf16: bool = False,
                 cuda_graphs: bool = True) -> None:
        """`first_audio_patience`: steps a later chunk may give way to another job's first
        audio (`firstaudio`); None: a first hop of tokens, 0: never. `cpu_bf16`: on a CPU,
        the language model and the flow estimator in bfloat16 (`bf16`). `cuda_graphs`: on
        CUDA, the decoding step replayed from graphs (`cudagraphs`)."""
        if not hasattr(model.llm, "stop_token_ids") or hasattr(model.llm, "vllm"):
            raise ValueError("batched decoding needs a CosyVoice2/3 language model "
                             "running in PyTorch (not v1, not vLLM)")
        self.model = model
        self.llm = model.llm
        self.device = torch.device(model.device)
        self.fp16 = bool(getattr(model, "fp16", False)) and self.device.type == "cuda"
        self.bf16 = cpu_bf16 and self.device.type == "cpu"
        self.rules = ras.SamplingRules.of(self.llm.sampling)
        defaults = _ratio_defaults(self.llm)
        self.min_ratio = defaults[0] if min_token_text_ratio is None else min_token_text_ratio
        self.max_ratio = defaults[1] if max_token_text_ratio is None else max_token_text_ratio
        self.qwen = self.llm.llm.model.model  # the Qwen2 body, without its text LM head
        if self.bf16:
            bf16.convert(model)  # bfloat16 products prefer the weights as they are
        elif self.device.type == "cpu":
            _store_transposed(self.qwen.layers)
            _store_transposed(self.llm.llm_decoder)
        dtype = torch.float16 if self.fp16 else next(self.qwen.parameters()).dtype
        shape = _kv_shape(self.qwen, dtype)
        budget = kv_cache_bytes if kv_cache_bytes is not None else \
            max_streams * DEFAULT_TOKENS_PER_STREAM * shape.bytes_per_token
        self.pool = KVPool(shape, budget, max_streams, self.device)
        step = DecodeStep(self.qwen, self.llm.speech_embedding.weight, self.pool)
        self._step: DecodeStep | GraphedStep = \
            GraphedStep(step) if cuda_graphs and self.device.type == "cuda" else step
        self.max_streams = max_streams
        self._stop_ids = frozenset(int(token) for token in self.llm.stop_token_ids)
        self._silent = frozenset(getattr(model, "silent_tokens", []))
        estimator = model.flow.decoder.estimator
        self._first_hop = estimator.static_chunk_size // model.flow.token_mel_ratio
        self._patience = self._first_hop if first_audio_patience is None \
            else first_audio_patience
        self._estimator_batch = None if isinstance(estimator, torch.nn.Module) else 1
        self._ids = itertools.count(1)
        self._waiting: list[_Stream] = []
        self._active: dict[int, _Stream] = {}
        self._cancelled: set[int] = set()
        rows = max_streams
        self._history = torch.full((rows, self.rules.win_size), -1, dtype=torch.long,
                                   device=self.device)
        self._last_token = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._seeds = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._drawn = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._min_len = torch.zeros(rows, dtype=torch.long, device=self.device)

    # -- the API a worker loop drives --------------------------------------------------

    def add(self, request: StreamRequest) -> int:
        """Queue a segment; it joins the batch at a step where the budget allows."""
        stream_id = next(self._ids)
        prompt_tokens = request.model_input.get("flow_prompt_speech_token")
        plan = token2wav.ChunkPlan.start(
            first_hop=self._first_hop, scale=int(getattr(self.model, "stream_scale_factor", 2)),
            lookahead=self.model.flow.pre_lookahead_len,
            prompt_tokens=0 if prompt_tokens is None else int(prompt_tokens.shape[1]),
            stream=request.stream, hop=request.hop)
        self._waiting.append(_Stream(stream_id, request, plan,
                                     token2wav.Vocoder(seed=request.seed)))
        return stream_id

    def cancel(self, stream_id: int) -> None:
        """Drop a stream at the next step (a no-op for one that has ended)."""
        self._cancelled.add(stream_id)

    def step(self) -> list[StreamEvent]:
        """One decoding step for every stream; the events it produced."""
        events: list[StreamEvent] = []
        self._drop_cancelled(events)
        with torch.inference_mode():
            with _autocast(fp16=self.fp16, cpu_bf16=self.bf16):
                joined = self._admit(events)
                self._decode_and_sample(joined)
            events.extend(self._vocode())
        return events

    @property
    def active_streams(self) -> int:
        return len(self._active)

    @property
    def waiting_streams(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._active and not self._waiting

    @property
    def kv_bytes_in_use(self) -> int:
        return self.pool.in_use_bytes

    @property
    def kv_bytes_reserved(self) -> int:
        return self.pool.reserved_bytes

    # -- admission and prefill ---------------------------------------------------------

    def _drop_cancelled(self, events: list[StreamEvent]) -> None:
        for stream_id in sorted(self._cancelled):
            stream = self._active.pop(stream_id, None)
            if stream is None:
                waiting = [item for item in self._waiting if item.stream_id == stream_id]
                stream = waiting[0] if waiting else None
                self._waiting = [item for item in self._waiting if item.stream_id != stream_id]
            if stream is not None:
                self._release(stream)
                events.append(StreamEvent(stream_id, cancelled=True))
        self._cancelled.clear()

    def _release(self, stream: _Stream) -> None:
        if stream.reservation is not None:
            self.pool.release(stream.reservation)
            stream.reservation = None
        stream.lm_input = None

    def _admit(self, events: list[StreamEvent]) -> list[tuple[_Stream, torch.Tensor]]:
        """Prefill waiting streams, in order, while rows and blocks allow: (stream, hidden)."""
        admitted: list[_Stream] = []
        while self._waiting and len(self._active) < self.max_streams:
            stream = self._waiting[0]
            try:
                if stream.lm_input is None:
                    self._prepare(stream)
                if stream.max_len == 0:  # upstream draws nothing for an empty text
                    self._waiting.pop(0)
                    self._active[stream.stream_id] = stream
                    self._end_llm(stream)
                    continue
                reservation = self.pool.reserve(stream.length + stream.max_len)
                if reservation is None:
                    break  # admitted when a stream leaves
                self._waiting.pop(0)
                stream.reservation = reservation
                self._active[stream.stream_id] = stream
                admitted.append(stream)
            except Exception as error:  # noqa: BLE001 - a stream's bad input fails it alone
                self._fail(stream, error, events)
        return self._prefill_joined(admitted, events)

    def _prefill_joined(self, streams: list[_Stream],
                        events: list[StreamEvent]) -> list[tuple[_Stream, torch.Tensor]]:
        """The streams admitted at this step, prefilled as one batch; if that fails, one
        by one, so that only the stream at fault fails."""
        started = time.perf_counter()
        for stream in streams:
            stream.llm_started = started
        if len(streams) > 1:
            with contextlib.suppress(Exception):
                return list(zip(streams, self._prefill(streams).split(1), strict=True))
        joined = []
        for stream in streams:
            try:
                joined.append((stream, self._prefill([stream])))
            except Exception as error:  # noqa: BLE001 - fails this stream alone
                self._fail(stream, error, events)
        return joined

    def _prepare(self, stream: _Stream) -> None:
        """Upstream's `Qwen2LM.inference` input: sos, text, task id, prompt speech."""
        llm, get = self.llm, stream.input
        empty = torch.zeros(1, 0, dtype=torch.int32)
        text, prompt_text = get("text", empty), get("prompt_text", empty)
        all_text = torch.concat([prompt_text, text], dim=1).to(self.device)
        if not hasattr(llm, "llm_embedding") and END_OF_PROMPT_ID not in all_text:
            raise ValueError("<|endofprompt|> is in neither the text nor the prompt text "
                             "(CosyVoice3 needs it)")
        table = llm.llm_embedding if hasattr(llm, "llm_embedding") else llm.speech_embedding
        sos = table.weight[llm.sos].reshape(1, 1, -1)
        task_id = table.weight[llm.task_id].reshape(1, 1, -1)
        prompt_speech = get("llm_prompt_speech_token", empty).to(self.device)
        text_emb = self.qwen.embed_tokens(all_text)
        parts = [sos, text_emb, task_id]
        if prompt_speech.shape[1]:
            parts.append(llm.speech_embedding(prompt_speech))
        stream.lm_input = torch.concat(parts, dim=1)
        stream.length = int(stream.lm_input.shape[1])
        # upstream: int((text_len - prompt_text_len) * ratio), in int32 x float32 arithmetic
        text_len = torch.tensor(text.shape[1], dtype=torch.int32)
        stream.min_len = int(text_len * self.min_ratio)
        stream.max_len = int(text_len * self.max_ratio)
        self.pool.check_fits(stream.length + stream.max_len)

    def _prefill(self, streams: list[_Stream]) -> torch.Tensor:
        """Each stream's prompt through the language model, right-padded into one batch;
        their keys and values go to the pool. (streams, hidden) states of their last
        positions."""
        prompts = []
        for stream in streams:
            assert stream.lm_input is not None
            prompts.append(stream.lm_input[0])
        lengths = torch.tensor([stream.length for stream in streams], device=self.device)
        positions = torch.arange(int(lengths.max()), device=self.device)
        cache = DynamicCache()
        output = self.qwen(inputs_embeds=pad_sequence(prompts, batch_first=True),
                           attention_mask=(positions[None, :] < lengths[:, None]).long(),
                           past_key_values=cache, use_cache=True)
        cached = list(_layers(cache))  # each (streams, heads, positions, dim)
        for index, stream in enumerate(streams):
            self._start(stream, [keys[index] for keys, _ in cached],
                        [values[index] for _, values in cached])
        for stream in streams:  # only now: a batch that fails is prefilled again, alone
            stream.lm_input = None
        hidden: torch.Tensor = output.last_hidden_state[torch.arange(len(streams)), lengths - 1]
        return hidden

    def _start(self, stream: _Stream, keys: list[torch.Tensor],
               values: list[torch.Tensor]) -> None:
        """Store a prefilled stream's keys and values (per layer: heads, positions, dim,
        maybe padded) and reset its row of the sampling state."""
        row, length = _row(stream), stream.length
        slots = self.pool.prefix_slots(torch.tensor([row], device=self.device), length)[0]
        self.pool.write(slots, torch.stack([layer[:, :length].transpose(0, 1) for layer in keys]),
                        torch.stack([layer[:, :length].transpose(0, 1) for layer in values]))
        self._history[row] = -1
        self._seeds[row] = stream.request.seed
        self._drawn[row] = 0
        self._min_len[row] = stream.min_len

    # -- one decoding step ----------------------------------------------------------------

    def _decoding(self) -> list[_Stream]:
        return [stream for stream in self._active.values()
                if not stream.llm_done and stream.drawn > 0]

    def _decode_and_sample(self, joined: list[tuple[_Stream, torch.Tensor]]) -> None:
        running = self._decoding()
        hidden = [state for _, state in joined]
        if running:
            hidden.append(self._decode(running))
        streams = [stream for stream, _ in joined] + running
        if not streams:
            return
        rows = torch.tensor([_row(stream) for stream in streams], device=self.device)
        logp = self.llm.llm_decoder(torch.concat(hidden)).float().log_softmax(dim=-1)
        drawn = self._drawn[rows]
        uniforms = ras.counter_uniforms(self._seeds[rows], drawn, ras.DRAWS_PER_TOKEN)
        tokens = ras.sample(logp, history=self._history[rows],
                            ban_stop=drawn < self._min_len[rows],
                            stop_id=self.llm.speech_token_size, rules=self.rules,
                            uniforms=uniforms)
        self._history[rows] = torch.concat([self._history[rows][:, 1:], tokens[:, None]], dim=1)
        self._last_token[rows] = tokens
        self._drawn[rows] = drawn + 1
        drawn_tokens = tokens.tolist()  # the one copy
        now = time.perf_counter()
        for stream, token in zip(streams, drawn_tokens, strict=True):
            self._take(stream, token, now)

    def _decode(self, streams: list[_Stream]) -> torch.Tensor:
        """Feed each stream its last token, all at once; (streams, hidden) states."""
        rows = torch.tensor([_row(stream) for stream in streams], device=self.device)
        lengths = torch.tensor([stream.length for stream in streams], device=self.device)
        span = max(stream.length for stream in streams) + 1
        hidden = self._step(self._last_token[rows], lengths, self.pool.prefix_slots(rows, span))
        for stream in streams:
            stream.length += 1
        return hidden

    def _take(self, stream: _Stream, token: int, now: float) -> None:
        """Upstream's stop rules and llm_job's silent-token filter for one drawn token."""
        if token in self._stop_ids:
            self._end_llm(stream)
            return
        if stream.request.stages is not None:
            stream.request.stages.token(stream.llm_started, stream.last_token_at, now)
        stream.last_token_at = now
        stream.drawn += 1
        if token in self._silent:
            stream.silent_run += 1
        else:
            stream.silent_run = 0
        if stream.silent_run <= MAX_SILENT_RUN:
            stream.speech_tokens.append(token)
        if stream.drawn >= stream.max_len:
            self._end_llm(stream)

    def _end_llm(self, stream: _Stream) -> None:
        stream.llm_done = True
        self._release(stream)

    # -- token to wave -------------------------------------------------------------------

    def _vocode(self) -> list[StreamEvent]:
        due = _due_now(list(self._active.values()), patience=self._patience)
        events: list[StreamEvent] = []
        prepared = []
        with _autocast(fp16=self.fp16):  # upstream runs the flow under autocast when fp16 is on
            for stream, chunk in due:
                try:
                    prepared.append((stream, chunk, _flow_input(self.model, self.device,
                                                                 stream, chunk)))
                except Exception as error:  # noqa: BLE001 - fails this stream alone
                    self._fail(stream, error, events)
            mels = self._solve_grouped(prepared, events)
        for (stream, chunk, _), mel in zip(prepared, mels, strict=True):
            if mel is not None:
                events.extend(self._speak(stream, chunk, mel))
        return events

    def _solve_grouped(self, prepared: list[tuple[_Stream, token2wav.Chunk,
                                                  token2wav.FlowInput]],
                       events: list[StreamEvent]) -> list[torch.Tensor | None]:
        """Mels in `prepared` order: one batch per estimator mode; a batch that fails is
        retried stream by stream, so only the stream at fault fails."""
        mels: list[torch.Tensor | None] = [None] * len(prepared)
        for streaming in (True, False):
            group = [index for index, (_, _, item) in enumerate(prepared)
                     if item.streaming is streaming]
            size = self._estimator_batch or len(group) or 1
            for start in range(0, len(group), size):
                batch = group[start:start + size]
                try:
                    solved = self._solve([prepared[index] for index in batch])
                except Exception:  # noqa: BLE001 - retried alone, to find the stream at fault
                    solved = [self._solve_alone(prepared[index], events) for index in batch]
                for index, mel in zip(batch, solved, strict=True):
                    mels[index] = mel
        return mels

    def _solve_alone(self, item: tuple[_Stream, token2wav.Chunk, token2wav.FlowInput],
                     events: list[StreamEvent]) -> torch.Tensor | None:
        try:
            return self._solve([item])[0]
        except Exception as error:  # noqa: BLE001 - fails this stream alone
            self._fail(item[0], error, events)
            return None

    def _solve(self, items: list[tuple[_Stream, token2wav.Chunk, token2wav.FlowInput]]
               ) -> list[torch.Tensor]:
        """The flow's mels for `items` as one batch, timed into each stream's stages."""
        span = Span(self.device.type == "cuda")
        span.start()
        mels = token2wav.solve(self.model.flow.decoder, [item for _, _, item in items])
        span.end()
        for stream, _, _ in items:
            if stream.request.stages is not None:
                stream.request.stages.flow.append(span)
        return mels

    def _speak(self, stream: _Stream, chunk: token2wav.Chunk,
               mel: torch.Tensor) -> Iterator[StreamEvent]:
        mel = mel[:, :, stream.plan.offset * self.model.flow.token_mel_ratio:]
        try:
            # upstream runs CosyVoice3's HiFT under autocast too, CosyVoice2's not
            with contextlib.nullcontext() if hasattr(self.model, "speech_window") else \
                    _autocast(fp16=self.fp16):
                span = Span(self.device.type == "cuda")
                span.start()
                audio = stream.vocoder.speech(self.model, mel, chunk.finalize,
                                              stream.request.speed)
                span.end()
        except Exception as error:  # noqa: BLE001 - fails this stream alone
            failed: list[StreamEvent] = []
            self._fail(stream, error, failed)
            yield from failed
            return
        stream.plan.consumed(chunk)
        if stream.request.stages is not None:
            stream.request.stages.hift.append(span)
        yield StreamEvent(stream.stream_id, audio=audio.float().cpu(), mel=mel)
        if chunk.finalize:
            self._active.pop(stream.stream_id, None)
            self._release(stream)
            yield StreamEvent(stream.stream_id, done=True,
                              speech_tokens=tuple(stream.speech_tokens), hop=stream.plan.hop)

    def _fail(self, stream: _Stream, error: BaseException, events: list[StreamEvent]) -> None:
        self._active.pop(stream.stream_id, None)
        self._waiting = [item for item in self._waiting if item is not stream]
        self._release(stream)
        stream.llm_done = True
        events.append(StreamEvent(stream.stream_id, error=error))


def _due_now(streams: list[_Stream], patience: int) -> list[tuple[_Stream, token2wav.Chunk]]:
    """The chunks due that are made at this step: a job's first audio before the later
    chunks of others (`firstaudio`), which give way for at most `patience` steps."""
    someone_opening = any(stream.opening for stream in streams)
    due = []
    for stream in streams:
        chunk = stream.plan.due(len(stream.speech_tokens), stream.llm_done)
        if chunk is None:
            continue
        waiting = firstaudio.DueChunk(opening=stream.opening, streamed=stream.request.stream,
                                      waited=stream.waited)
        if firstaudio.makes_now(waiting, someone_opening, patience):
            stream.waited = 0
            due.append((stream, chunk))
        else:
            stream.waited += 1
    return due


def _flow_input(model: Any, device: torch.device, stream: _Stream,
                chunk: token2wav.Chunk) -> token2wav.FlowInput:
    """The flow's input for a stream's chunk: its speech tokens so far, and its prompt."""
    get = stream.input
    tokens = torch.tensor([stream.speech_tokens[:chunk.end]], dtype=torch.int32,
                          device=device)
    return token2wav.flow_input(
        model.flow, tokens=tokens,
        prompt_token=get("flow_prompt_speech_token",
                         torch.zeros(1, 0, dtype=torch.int32)).to(device),
        prompt_feat=get("prompt_speech_feat", torch.zeros(1, 0, 80)).to(device),
        embedding=get("flow_embedding", torch.zeros(0, 192)).to(device),
        finalize=chunk.finalize, streaming=not chunk.finalize)


def _autocast(*, fp16: bool, cpu_bf16: bool = False) -> contextlib.AbstractContextManager[Any]:
    """What a stage runs under: CUDA's float16 autocast as upstream's `fp16` has it, or the
    CPU's bfloat16 one for the language model (`bf16`)."""
    if cpu_bf16:
        return bf16.autocast()
    if fp16:
        autocast: contextlib.AbstractContextManager[Any] = torch.autocast(
            "cuda", dtype=torch.float16)
        return autocast
    return contextlib.nullcontext()


def _store_transposed(module: torch.nn.Module) -> None:
    """Store every Linear weight of `module` as the transpose of a contiguous (in, out)
    matrix: the same values, and the same results to float rounding, but a decoding step's
    few-row products then run about 10% faster on the CPU (measured with MKL on Qwen2-0.5B's
    shapes at 4 rows; no change at 1). It changes the layout of the shared model's
    parameters, for upstream's own calls too, never their values."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and layer.weight.is_contiguous():
            layer.weight.data = layer.weight.data.t().contiguous().t()


def _row(stream: _Stream) -> int:
    assert stream.reservation is not None
    return stream.reservation.row


def _layers(cache: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a transformers DynamicCache, old API or new."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            yield layer.keys, layer.values
    else:
        yield from zip(cache.key_cache, cache.value_cache, strict=True)


__all__ = ["BatchedDecoder", "KVBudgetError", "StreamEvent", "StreamRequest"]
