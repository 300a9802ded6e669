"""One decoding step of the CosyVoice2/3 language model (its Qwen2 body) for a batch of
streams over the paged KV pool, in shapes set by (streams, span) alone, so that CUDA can
capture it as a graph and replay it (`cudagraphs`).

Each stream feeds its last speech token at its own position. Its keys and values of
positions 0..span-1 are gathered from the pool into one copy; the new token's go to its
position in that copy and to the pool; it attends to the positions up to its own. What lies
past a stream's position is masked, so a batch may be padded: to a longer span, and to more
streams with rows that read and write only the pool's scratch slot (`pad_rows`).

The layers are transformers' own Qwen2 decoder layers, called one by one with the rotary
position embeddings, the mask and a cache object of ours (`_GatheredCache`): the same
arithmetic as the model's own forward, without its mask building and cache growth, which
read shapes and values on the host.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from cosyvoiced.engines.kvpool import KVPool


class _GatheredCache:
    """What a transformers attention layer calls as its cache: it puts the new token's keys
    and values at each stream's position in the gathered copy, and keeps them for the pool."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (layers, streams, heads, span, dim)
        self.rows = torch.arange(positions.shape[0], device=positions.device)
        self.positions = positions
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`keys` (streams, heads, 1, dim): this layer's whole span, the new token placed."""
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        layer_keys[self.rows, :, self.positions] = keys[:, :, 0].to(layer_keys.dtype)
        layer_values[self.rows, :, self.positions] = values[:, :, 0].to(layer_values.dtype)
        self.new_keys.append(keys[:, :, 0])
        self.new_values.append(values[:, :, 0])
        return layer_keys, layer_values


class DecodeStep:
    """`step(tokens, positions, slots)`: the (streams, hidden) states of one decoding step.

    `tokens` (streams,) is each stream's last speech token, `positions` (streams,) its
    position (the tokens it has in the pool), `slots` (streams, span) the pool slots of its
    positions 0..span-1, span > every position."""

    def __init__(self, qwen: Any, embedding: torch.Tensor, pool: KVPool) -> None:
        config = qwen.config
        if getattr(config, "use_sliding_window", False):
            raise ValueError("the batched decoding step attends to the whole prefix; this "
                             "Qwen2 has sliding-window attention")
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in {"sdpa", "eager"}:
            raise ValueError(f"the batched decoding step runs sdpa or eager attention, not "
                             f"{attention}")
        self._additive_mask = attention == "eager"  # transformers' eager adds its mask
        self.qwen = qwen
        self.embedding = embedding
        self.pool = pool
        parameters = inspect.signature(qwen.layers[0].forward).parameters
        # transformers renamed the layers' cache argument (4.56); either is accepted
        self._cache_name = "past_key_values" if "past_key_values" in parameters \
            else "past_key_value"

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
        span = slots.shape[1]
        hidden = self.embedding[tokens][:, None, :]
        embeddings = self.qwen.rotary_emb(hidden, positions[:, None])
        keys, values = self.pool.gather(slots)
        cache = _GatheredCache(keys, values, positions)
        visible = torch.arange(span, device=slots.device)[None, :] <= positions[:, None]
        arguments = {"attention_mask": self._mask(visible[:, None, None, :]),
                     "position_ids": positions[:, None], "position_embeddings": embeddings,
                     "use_cache": True, self._cache_name: cache}
        for layer in self.qwen.layers:
            output = layer(hidden, **arguments)
            hidden = output[0] if isinstance(output, tuple) else output  # transformers < 4.54
        new_slots = slots.gather(1, positions[:, None])[:, 0]
        self.pool.write(new_slots, torch.stack(cache.new_keys), torch.stack(cache.new_values))
        states: torch.Tensor = self.qwen.norm(hidden)[:, 0]
        return states

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        """The attention mask as the layers' attention takes it: sdpa's True where a
        position is seen, or eager's 0 there and the float minimum elsewhere."""
        if not self._additive_mask:
            return visible
        additive = torch.zeros(visible.shape, device=visible.device)
        return additive.masked_fill(~visible, torch.finfo(additive.dtype).min)


def pad_rows(pool: KVPool, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             *, streams: int, span: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's inputs padded to `streams` rows and `span` positions. A padding row feeds
    token 0 at position 0 from the pool's scratch slot and writes only there; a row's
    positions past its own are masked, their slots the scratch slot too."""
    padded_tokens = tokens.new_zeros(streams)
    padded_positions = positions.new_zeros(streams)
    padded_slots = slots.new_full((streams, span), pool.scratch_slot)
    real, width = slots.shape
    padded_tokens[:real] = tokens
    padded_positions[:real] = positions
    padded_slots[:real, :width] = slots
    return padded_tokens, padded_positions, padded_slots


__all__ = ["DecodeStep", "pad_rows"]
