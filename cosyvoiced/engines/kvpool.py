"""A paged key/value cache for the Qwen2 language model of CosyVoice2/3, shared by streams.

The pool is allocated once, with a budget in bytes: one tensor of
(layers, tokens, kv_heads, head_dim) keys and one of values, cut into blocks of
`BLOCK_TOKENS` tokens.
A stream is admitted only when blocks for its worst case (prompt plus maximum speech
tokens) are free, so it can never run out mid-way; its blocks go back to the pool when it
leaves. Each stream also holds one row of the small per-stream tables (block table,
sampling state), so the pool admits at most `max_streams` streams.

The pool's memory is reserved for the worker's lifetime: the idle level of a worker that
has served streams is the level it had after loading, plus this pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16


@dataclass(frozen=True)
class KVShape:
    """What one token's keys and values take in every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        item: int = torch.empty((), dtype=self.dtype).element_size()
        return self.layers * 2 * self.kv_heads * self.head_dim * item


@dataclass(frozen=True)
class Reservation:
    """A stream's row in the tables and the pool blocks it holds."""

    row: int
    blocks: tuple[int, ...]


class KVBudgetError(ValueError):
    """A stream that could not fit even into an empty pool."""


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


class KVPool:
    """Blocks of keys and values, handed out to streams within a byte budget."""

    def __init__(self, shape: KVShape, budget_bytes: int, max_streams: int,
                 device: torch.device) -> None:
        blocks = budget_bytes // (BLOCK_TOKENS * shape.bytes_per_token)
        if blocks < 1:
            raise KVBudgetError(f"a KV budget of {budget_bytes} bytes holds no block of "
                                f"{BLOCK_TOKENS} tokens ({shape.bytes_per_token} bytes each)")
        self.shape = shape
        self.device = device
        self.total_blocks = blocks
        # one tensor for all layers, so that a decoding step gathers and writes every
        # layer's keys (and values) with one indexing operation, not one per layer; and one
        # block more, never handed out, whose first slot a padded step's rows read and write
        size = (shape.layers, (blocks + 1) * BLOCK_TOKENS, shape.kv_heads, shape.head_dim)
        self.scratch_slot = blocks * BLOCK_TOKENS
        self.keys = torch.zeros(size, dtype=shape.dtype, device=device)
        self.values = torch.zeros(size, dtype=shape.dtype, device=device)
        self.block_table = torch.zeros((max_streams, blocks), dtype=torch.long, device=device)
        self._free_blocks = list(range(blocks))
        self._free_rows = list(range(max_streams))

    @property
    def reserved_bytes(self) -> int:
        return self.total_blocks * BLOCK_TOKENS * self.shape.bytes_per_token

    @property
    def in_use_bytes(self) -> int:
        used = self.total_blocks - len(self._free_blocks)
        return used * BLOCK_TOKENS * self.shape.bytes_per_token

    def check_fits(self, tokens: int) -> None:
        """Raise `KVBudgetError` if `tokens` would not fit even into the empty pool."""
        if blocks_for(tokens) > self.total_blocks:
            raise KVBudgetError(f"a stream of up to {tokens} tokens needs "
                                f"{blocks_for(tokens) * BLOCK_TOKENS * self.shape.bytes_per_token}"
                                f" bytes of KV cache; the budget is {self.reserved_bytes}")

    def reserve(self, tokens: int) -> Reservation | None:
        """Blocks for `tokens` and a row, or None while the pool is too full."""
        needed = blocks_for(tokens)
        if needed > len(self._free_blocks) or not self._free_rows:
            return None
        blocks = tuple(self._free_blocks[:needed])
        del self._free_blocks[:needed]
        row = self._free_rows.pop(0)
        self.block_table[row, :needed] = torch.tensor(blocks, dtype=torch.long)
        return Reservation(row, blocks)

    def release(self, reservation: Reservation) -> None:
        self._free_blocks.extend(reservation.blocks)
        self._free_rows.append(reservation.row)
        self._free_rows.sort()

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool indices of `positions` (rows, n) in each row's blocks."""
        blocks = self.block_table[rows].gather(1, positions // BLOCK_TOKENS)
        return blocks * BLOCK_TOKENS + positions % BLOCK_TOKENS

    def prefix_slots(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """(rows, length) flat indices of positions 0..length-1 of each row."""
        positions = torch.arange(length, device=self.device).expand(rows.shape[0], length)
        return self.slots(rows, positions)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's keys and values at `slots` (streams, length), as
        (layers, streams, heads, length, dim) views of one copy each."""
        layers, streams, length = self.shape.layers, slots.shape[0], slots.shape[1]
        flat = slots.reshape(-1)
        keys = self.keys.index_select(1, flat).view(layers, streams, length,
                                                    self.shape.kv_heads, self.shape.head_dim)
        values = self.values.index_select(1, flat).view(keys.shape)
        return keys.transpose(2, 3), values.transpose(2, 3)

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store every layer's (layers, n, heads, dim) keys and values at flat `slots` (n,)."""
        self.keys[:, slots] = keys.to(self.shape.dtype)
        self.values[:, slots] = values.to(self.shape.dtype)
