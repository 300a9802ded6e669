"""Upstream's repetition-aware sampling (RAS), for a batch of streams in one pass on the device.

Upstream CosyVoice2/3 draw each speech token with `ras_sampling(weighted_scores,
decoded_tokens, sampling, top_p, top_k, win_size, tau_r)`: a nucleus draw among at most
`top_k` tokens whose cumulative probability before them is under `top_p`; if the drawn token
occurs `win_size * tau_r` times or more among the last `win_size` decoded tokens, it is
banned and the token is drawn again from the whole distribution. Below the minimum length
the stop id `speech_token_size` is banned first. This module applies the same rules to
(streams, vocabulary) rows at once, with no host round trip.

Randomness is per stream, not global: each draw's uniform number is a hash of the stream's
seed and the token's index (`counter_uniforms`), so a stream draws the same tokens whoever
shares its batch, and cancelling one stream changes nothing for the others.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

# SplitMix64's constants, as the signed 64-bit integers torch computes with.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
DRAWS_PER_TOKEN = 2  # the nucleus draw and the repetition fallback


@dataclass(frozen=True)
class SamplingRules:
    """Upstream's RAS parameters (its `ras_sampling` defaults unless the model sets them)."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1

    @classmethod
    def of(cls, sampling: Any) -> SamplingRules:
        """The rules of an upstream LLM's `sampling` attribute: the yaml makes it a
        `functools.partial` of `ras_sampling` whose keywords are the model's settings."""
        if not isinstance(sampling, functools.partial):
            name = getattr(sampling, "__name__", type(sampling).__name__)
            if name != "ras_sampling":
                raise ValueError(f"batched decoding implements ras_sampling only, not {name}")
            return cls()
        if getattr(sampling.func, "__name__", "") != "ras_sampling":
            raise ValueError(f"batched decoding implements ras_sampling only, not "
                             f"{getattr(sampling.func, '__name__', sampling.func)}")
        known = {key: value for key, value in sampling.keywords.items()
                 if key in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def repeat_threshold(self) -> float:
        return self.win_size * self.tau_r


def _logical_shift(value: torch.Tensor, bits: int) -> torch.Tensor:
    """`value >>> bits` for int64 (torch shifts signed integers arithmetically)."""
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor, draws: int) -> torch.Tensor:
    """(streams, draws) uniform numbers in [0, 1): SplitMix64 of (seed, counter, draw).

    A pure function of its arguments, so a stream's draws do not depend on its batch."""
    index = torch.arange(draws, device=seeds.device, dtype=torch.int64)
    state = seeds[:, None] * _GOLDEN + counters[:, None] * draws + index[None, :]
    state = state + _GOLDEN
    state = (state ^ _logical_shift(state, 30)) * _MIX1
    state = (state ^ _logical_shift(state, 27)) * _MIX2
    state = state ^ _logical_shift(state, 31)
    return _logical_shift(state, 11).to(torch.float64).mul(2.0 ** -53).to(torch.float32)


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse-CDF draw from non-negative, unnormalised `weights`."""
    cumulative = weights.float().cumsum(dim=-1)
    targets = uniforms * cumulative[:, -1]
    chosen = torch.searchsorted(cumulative, targets[:, None], right=True)[:, 0]
    # a target rounded up to the total would land past the last token that has weight
    last_weighted = (weights > 0).long().cumsum(dim=-1).argmax(dim=-1)
    return torch.minimum(chosen, last_weighted)


def sample(logp: torch.Tensor, *, history: torch.Tensor, ban_stop: torch.Tensor,
           stop_id: int, rules: SamplingRules, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `logp` (streams, vocabulary), by upstream's RAS rules.

    `history` (streams, win_size) holds each stream's last decoded tokens, -1 where it has
    fewer; `ban_stop` (streams,) bans `stop_id` (below the minimum length); `uniforms`
    (streams, 2) come from `counter_uniforms`."""
    scores = logp.float().clone()
    scores[:, stop_id] = torch.where(ban_stop, float("-inf"), scores[:, stop_id])
    probs = scores.softmax(dim=-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    top_probs = sorted_probs[:, :rules.top_k]
    mass_before = top_probs.cumsum(dim=-1) - top_probs
    nucleus = torch.where(mass_before < rules.top_p, top_probs, torch.zeros_like(top_probs))
    nucleus[:, 0] = top_probs[:, 0]  # upstream always keeps the most likely token
    picked = sorted_ids.gather(1, _draw(nucleus, uniforms[:, 0])[:, None])[:, 0]
    repeats = (history == picked[:, None]).sum(dim=-1)
    scores.scatter_(1, picked[:, None], float("-inf"))
    fallback = _draw(scores.softmax(dim=-1), uniforms[:, 1])
    return torch.where(repeats >= rules.repeat_threshold, fallback, picked)
