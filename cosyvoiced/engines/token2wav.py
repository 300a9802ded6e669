"""Speech tokens to audio for many CosyVoice2/3 streams: upstream's flow and HiFT modules,
with the flow-matching estimator of all streams that have a chunk due run as one batch.

Upstream's `CosyVoice2Model.token2wav` runs, per chunk: the flow's front (speaker
projection, token embedding, encoder or look-ahead layer), ten Euler steps of the
conditional flow matching whose estimator sees a batch of 2 (the stream and its
classifier-free-guidance twin), then HiFT with a per-stream cache. Here the front and HiFT
run per stream on upstream's own submodules; the Euler steps run for N streams at once,
the estimator seeing 2N rows (N conditional, then N unconditional), right-padded to the
longest stream and masked: the estimators' convolutions are causal and their attention
masks padded keys, so each stream's mel is the one it would get alone.

The chunk plan (`ChunkPlan`) is upstream's streaming schedule, per stream: a first hop of
`token_hop_len` tokens plus the padding that aligns the prompt to it, each later hop
`stream_scale_factor` times longer up to 4x the first, `pre_lookahead_len` tokens of look
ahead, and a final chunk with the rest once the language model has finished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# Upstream's flow.inference runs the flow matching with this many Euler steps.
EULER_STEPS = 10


@dataclass(frozen=True)
class Chunk:
    """A chunk due: tokens [0, end) go to the flow; `advance` tokens are consumed."""

    end: int
    advance: int
    finalize: bool


@dataclass
class ChunkPlan:
    """Upstream's streaming schedule for one stream (`CosyVoice2Model.tts`, stream=True)."""

    hop: int
    max_hop: int
    scale: int
    lookahead: int
    prompt_pad: int
    stream: bool
    offset: int = 0

    @classmethod
    def start(cls, first_hop: int, scale: int, lookahead: int, prompt_tokens: int,
              stream: bool, *, hop: int = 0) -> ChunkPlan:
        """`hop`: the hop to start with, if not `first_hop`: a later text segment carries on
        with the hop an earlier one reached (upstream's `token_hop_len` is not reset between
        them), and the prompt is aligned to it, as upstream does."""
        hop = hop or first_hop
        pad = math.ceil(prompt_tokens / hop) * hop - prompt_tokens
        return cls(hop=hop, max_hop=4 * first_hop, scale=scale, lookahead=lookahead,
                   prompt_pad=pad, stream=stream)

    def due(self, tokens: int, llm_done: bool) -> Chunk | None:
        """The chunk due once `tokens` speech tokens exist, if any."""
        if not self.stream:
            return Chunk(end=tokens, advance=tokens, finalize=True) if llm_done else None
        hop = self.hop + self.prompt_pad if self.offset == 0 else self.hop
        if tokens - self.offset >= hop + self.lookahead:
            return Chunk(end=self.offset + hop + self.lookahead, advance=hop, finalize=False)
        if llm_done:
            return Chunk(end=tokens, advance=tokens - self.offset, finalize=True)
        return None

    def consumed(self, chunk: Chunk) -> None:
        if not chunk.finalize:
            self.offset += chunk.advance
            self.hop = min(self.max_hop, self.hop * self.scale)


@dataclass
class FlowInput:
    """One stream's conditioning for the flow matching: what `flow.decoder` receives."""

    mu: torch.Tensor  # (1, 80, T)
    spks: torch.Tensor  # (1, 80)
    cond: torch.Tensor  # (1, 80, T)
    prompt_frames: int
    streaming: bool

    @property
    def frames(self) -> int:
        return int(self.mu.shape[2])


def flow_input(flow: Any, *, tokens: torch.Tensor, prompt_token: torch.Tensor,
               prompt_feat: torch.Tensor, embedding: torch.Tensor, finalize: bool,
               streaming: bool) -> FlowInput:
    """The flow's front for one stream: what upstream's `flow.inference` computes before
    its decoder call, on the same submodules (CosyVoice2's encoder, CosyVoice3's
    look-ahead layer)."""
    spks = flow.spk_embed_affine_layer(F.normalize(embedding, dim=1))
    all_tokens = torch.concat([prompt_token, tokens], dim=1)
    token_len = torch.tensor([all_tokens.shape[1]], dtype=torch.int32, device=tokens.device)
    embedded = flow.input_embedding(torch.clamp(all_tokens, min=0))
    lookahead = flow.pre_lookahead_len
    if hasattr(flow, "pre_lookahead_layer"):  # CosyVoice3
        if finalize:
            hidden = flow.pre_lookahead_layer(embedded)
        else:
            hidden = flow.pre_lookahead_layer(embedded[:, :-lookahead],
                                              context=embedded[:, -lookahead:])
        hidden = hidden.repeat_interleave(flow.token_mel_ratio, dim=1)
    else:  # CosyVoice2: upstream passes the untrimmed length with the look-ahead split off
        if finalize:
            hidden, _ = flow.encoder(embedded, token_len, streaming=streaming)
        else:
            hidden, _ = flow.encoder(embedded[:, :-lookahead], token_len,
                                     context=embedded[:, -lookahead:], streaming=streaming)
        hidden = flow.encoder_proj(hidden)
    frames = hidden.shape[1]
    cond = torch.zeros([1, frames, flow.output_size], device=tokens.device, dtype=hidden.dtype)
    cond[:, :prompt_feat.shape[1]] = prompt_feat
    return FlowInput(mu=hidden.transpose(1, 2).contiguous(), spks=spks,
                     cond=cond.transpose(1, 2), prompt_frames=int(prompt_feat.shape[1]),
                     streaming=streaming)


def _time_span(decoder: Any, like: torch.Tensor) -> torch.Tensor:
    span = torch.linspace(0, 1, EULER_STEPS + 1, device=like.device, dtype=like.dtype)
    if decoder.t_scheduler == "cosine":
        span = 1 - torch.cos(span * 0.5 * torch.pi)
    return span


def solve(decoder: Any, inputs: Sequence[FlowInput]) -> list[torch.Tensor]:
    """Each input's mel (1, 80, frames - prompt_frames), by upstream's fixed-noise Euler
    solver with classifier-free guidance, all inputs in one estimator batch. All inputs
    must share `streaming`."""
    count, longest = len(inputs), max(item.frames for item in inputs)
    first = inputs[0]
    dtype, device = first.spks.dtype, first.mu.device
    x = torch.zeros([count, 80, longest], device=device, dtype=first.mu.dtype)
    mask = torch.zeros([2 * count, 1, longest], device=device, dtype=dtype)
    mu = torch.zeros([2 * count, 80, longest], device=device, dtype=dtype)
    spks = torch.zeros([2 * count, 80], device=device, dtype=dtype)
    cond = torch.zeros([2 * count, 80, longest], device=device, dtype=dtype)
    for row, item in enumerate(inputs):
        frames = item.frames
        x[row, :, :frames] = decoder.rand_noise[0, :, :frames].to(device).to(x.dtype)
        mask[[row, count + row], :, :frames] = 1
        mu[row, :, :frames] = item.mu[0]
        spks[row] = item.spks[0]
        cond[row, :, :frames] = item.cond[0]
    span = _time_span(decoder, first.mu)
    time, step_size = span[0].unsqueeze(dim=0), span[1] - span[0]
    rate = decoder.inference_cfg_rate
    for step in range(1, len(span)):
        x_in = torch.concat([x, x]).to(dtype)
        t_in = time.expand(2 * count).to(dtype)
        velocity = decoder.forward_estimator(x_in, mask, mu, t_in, spks, cond, first.streaming)
        guided, unguided = velocity[:count], velocity[count:]
        x = x + step_size * ((1.0 + rate) * guided - rate * unguided)
        time = time + step_size
        if step < len(span) - 1:
            step_size = span[step + 1] - time
    return [x[row:row + 1, :, item.prompt_frames:item.frames].float()
            for row, item in enumerate(inputs)]


@dataclass
class Vocoder:
    """One stream's HiFT state: upstream's `hift_cache_dict` entry, and its own RNG.

    HiFT draws noise for its source signal. Each stream draws from its own generator
    state, seeded per stream, so its audio does not depend on which streams ran beside it."""

    seed: int
    cache: dict[str, Any] | None = None
    rng_states: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def run_seeded(self, hift_call: Any, device: torch.device) -> Any:
        """`hift_call()` drawing from this stream's random state (then kept for its next chunk)."""
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            if self.rng_states:
                torch.set_rng_state(self.rng_states[0])
                if cuda:
                    torch.cuda.set_rng_state(self.rng_states[1], cuda[0])
            else:
                torch.manual_seed(self.seed)
            result = hift_call()
            cpu_state = torch.get_rng_state()
            self.rng_states = (cpu_state, torch.cuda.get_rng_state(cuda[0])) if cuda \
                else (cpu_state,)
        return result

    def speech(self, model: Any, mel: torch.Tensor, finalize: bool, speed: float) -> torch.Tensor:
        """The audio of this chunk's mel (already cut at the token offset)."""
        if hasattr(model, "speech_window"):
            return self._speech_v2(model, mel, finalize, speed)
        return self._speech_v3(model, mel, finalize, speed)

    def _speech_v2(self, model: Any, mel: torch.Tensor, finalize: bool,
                   speed: float) -> torch.Tensor:
        """CosyVoice2: HiFT with a mel, source and speech cache, cross-faded."""
        # upstream is importable only once the engine has put it on the path
        from cosyvoice.utils.common import fade_in_out  # noqa: PLC0415

        cache = self.cache
        if cache is not None:
            mel = torch.concat([cache["mel"], mel], dim=2)
            source = cache["source"]
        else:
            source = torch.zeros(1, 1, 0)
        if finalize and speed != 1.0:
            if cache is not None:
                raise ValueError("speed applies only to a segment that is not streamed")
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        speech, new_source = self.run_seeded(
            lambda: model.hift.inference(speech_feat=mel, cache_source=source), mel.device)
        if cache is not None:
            # as a tensor: numpy's window would warn of NumPy 2's __array_wrap__ on each chunk
            window = torch.from_numpy(model.speech_window)
            speech = fade_in_out(speech, cache["speech"], window)
        if finalize:
            return speech
        keep = model.source_cache_len
        self.cache = {"mel": mel[:, :, -model.mel_cache_len:],
                      "source": new_source[:, :, -keep:], "speech": speech[:, -keep:]}
        kept: torch.Tensor = speech[:, :-keep]
        return kept

    def _speech_v3(self, model: Any, mel: torch.Tensor, finalize: bool,
                   speed: float) -> torch.Tensor:
        """CosyVoice3: causal HiFT over all the mel so far, new samples only."""
        if self.cache is not None:
            mel = torch.concat([self.cache["mel"], mel], dim=2)
            self.cache["mel"] = mel
        else:
            self.cache = {"mel": mel, "speech_offset": 0}
        if speed != 1.0:
            if not finalize or self.cache["speech_offset"]:
                raise ValueError("speed applies only to a segment that is not streamed")
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        speech, _ = self.run_seeded(
            lambda: model.hift.inference(speech_feat=mel, finalize=finalize), mel.device)
        new: torch.Tensor = speech[:, self.cache["speech_offset"]:]
        self.cache["speech_offset"] += new.shape[1]
        return new
