"""bfloat16 on the CPU for a batched CosyVoice2/3 model (`engine.cosyvoice.cpu_bf16`).

The two stages whose products dominate a step go to bfloat16: the language model's Qwen2
body with its speech-token head, and the flow-matching estimator. HiFT, the front end and
the sampler stay float32 (sampling reads float32 log-probabilities). Measured on 2 cores
with AMX-BF16 (full-size CosyVoice2): a decoding step's products cost about the same for 1
to 16 rows (54 ms, where float32's cost 51 ms at 1 row and 95 at 4), and the estimator
runs in 0.5-0.6x its float32 time; 4 streams made 1.35x float32's tokens and 1.55x its
audio, their first chunks in 0.68x the time (README). The audio is not upstream's bit for
bit, as upstream's own `fp16` on a GPU is not.

The weights are converted in place, once, when the worker loads: the model is the
decoder's alone then (upstream's own `inference_*` calls on it would meet float32 inputs).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPE = torch.bfloat16


class Bf16Estimator(torch.nn.Module):  # type: ignore[misc]  # torch untyped where linted
    """The flow's estimator in bfloat16 behind float32 inputs and outputs, so upstream's
    solver around it is unchanged; its other attributes read through. The time `t` stays
    float32: its sinusoidal embedding multiplies it by 1000, where bfloat16's 8 bits would
    leave little of it (measured on the tiny v2 model: cosine 0.85 to float32's velocity
    with `t` in bfloat16, 0.99994 with it kept)."""

    def __init__(self, estimator: torch.nn.Module) -> None:
        super().__init__()
        self.inner = estimator.to(DTYPE)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor,  # noqa: PLR0917
                t: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                **options: Any) -> torch.Tensor:  # upstream's estimator call, positional
        with autocast():
            velocity: torch.Tensor = self.inner(x.to(DTYPE), mask.to(DTYPE), mu.to(DTYPE),
                                                t.float(), spks.to(DTYPE), cond.to(DTYPE),
                                                **options)
        return velocity.float()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def convert(model: Any) -> None:
    """Put `model`'s (an upstream CosyVoice2Model/CosyVoice3Model on the CPU) language model
    body, speech-token head and flow estimator in bfloat16."""
    for module in (model.llm.llm.model.model, model.llm.llm_decoder):
        module.to(DTYPE)
        for layer in module.modules():  # (out, in) rows: oneDNN's fast layout, whatever
            if isinstance(layer, torch.nn.Linear):  # a float32 layout chosen before
                layer.weight.data = layer.weight.data.contiguous()
    decoder = model.flow.decoder
    if isinstance(decoder.estimator, torch.nn.Module) and \
            not isinstance(decoder.estimator, Bf16Estimator):
        decoder.estimator = Bf16Estimator(decoder.estimator)


def autocast() -> contextlib.AbstractContextManager[Any]:
    """What the language model's calls run under: float32 inputs (embeddings) meet the
    bfloat16 weights."""
    cast: contextlib.AbstractContextManager[Any] = torch.autocast("cpu", dtype=DTYPE)
    return cast
