"""The batched decoding step (cosyvoiced/engines/decodestep.py) and its CUDA graphs
(cosyvoiced/engines/cudagraphs.py), on the tiny CosyVoice2/3 models of the checkout lane.

The step is checked against transformers' own Qwen2 forward over the same keys and values.
On a CPU, the graphs' bookkeeping (buckets, padding, the inputs copied into each bucket's
own tensors, the fallback) runs with a stand-in capture (`_ReplayCapture`) whose replay runs
the step again on the bucket's tensors; where the lane runs on CUDA (`make test-gpu`), real
graphs are captured and replayed.

    COSYVOICE_REPO=/path/to/CosyVoice COSYVOICE_VERSION=2 .venv-cosyvoice/bin/python -m pytest \\
        tests/cosyvoice/test_decode_step.py
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
import torch
from transformers import DynamicCache

from cosyvoiced.engines import batched
from cosyvoiced.engines.batched import BatchedDecoder
from cosyvoiced.engines.cudagraphs import MIN_SPAN, GraphedStep, bucket
from cosyvoiced.engines.decodestep import DecodeStep, pad_rows
from cosyvoiced.engines.kvpool import KVPool
from tests.cosyvoice.test_batched import JOIN_STEPS, _requests, _run_batched, assert_length_rules

LENGTHS = (5, 17, 30)  # three streams' positions: the tokens each has in the pool


class _ReplayCapture:
    """A stand-in for CUDA graph capture on a CPU: it runs the step once, and each replay
    runs it again on the same input tensors into the same output tensor, as a graph does."""

    def __init__(self) -> None:
        self.captures = 0

    def __call__(self, run: Callable[[], torch.Tensor]
                 ) -> tuple[Callable[[], object], torch.Tensor]:
        self.captures += 1
        output = run()
        return lambda: output.copy_(run()), output


def _qwen(cosyvoice: Any) -> Any:
    return cosyvoice.model.llm.llm.model.model


def _filled_pool(cosyvoice: Any) -> tuple[KVPool, list[int]]:
    """A pool of random keys and values, with a row reserved for each of `LENGTHS`."""
    device = torch.device(cosyvoice.model.device)
    qwen = _qwen(cosyvoice)
    shape = batched._kv_shape(qwen, next(qwen.parameters()).dtype)
    pool = KVPool(shape, 4 * 128 * shape.bytes_per_token, max_streams=4, device=device)
    generator = torch.Generator(device=device).manual_seed(11)
    pool.keys.copy_(torch.randn(pool.keys.shape, generator=generator, device=device))
    pool.values.copy_(torch.randn(pool.values.shape, generator=generator, device=device))
    rows = []
    for length in LENGTHS:
        reservation = pool.reserve(length + 8)
        assert reservation is not None
        rows.append(reservation.row)
    return pool, rows


def _step_input(cosyvoice: Any, pool: KVPool, rows: list[int], lengths: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = pool.device
    tokens = torch.tensor([7 * (index + 1) for index in range(len(rows))], device=device)
    positions = torch.tensor(lengths, device=device)
    slots = pool.prefix_slots(torch.tensor(rows, device=device), max(lengths) + 1)
    return tokens, positions, slots


def _transformers_forward(cosyvoice: Any, pool: KVPool, row: int, length: int,
                          token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stream's step by transformers' own forward, over its keys and values from the
    pool: the hidden state, and every layer's new key and value."""
    qwen = _qwen(cosyvoice)
    device = pool.device
    keys, values = pool.gather(pool.prefix_slots(torch.tensor([row], device=device), length))
    cache = DynamicCache()
    for layer in range(pool.shape.layers):
        cache.update(keys[layer], values[layer], layer)
    embedding = cosyvoice.model.llm.speech_embedding.weight[token].reshape(1, 1, -1)
    output = qwen(inputs_embeds=embedding, position_ids=torch.tensor([[length]], device=device),
                  past_key_values=cache, use_cache=True)
    cached = list(batched._layers(cache))
    return (output.last_hidden_state[0, -1], torch.stack([keys[0, :, -1] for keys, _ in cached]),
            torch.stack([values[0, :, -1] for _, values in cached]))


def _eager_then_graphed(step: DecodeStep, graphed: GraphedStep,
                        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager step's states, then the graphed step's from the same pool (the eager one's
    writes undone first)."""
    pool = step.pool
    snapshot = pool.keys.clone(), pool.values.clone()
    eager = step(*inputs)
    pool.keys.copy_(snapshot[0])
    pool.values.copy_(snapshot[1])
    return eager, graphed(*inputs)


def test_bucket_is_the_next_power_of_two() -> None:
    assert [bucket(count) for count in (0, 1, 2, 3, 4, 5, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 32]
    assert [bucket(count, MIN_SPAN) for count in (1, 128, 129, 300)] == [128, 128, 256, 512]


@pytest.fixture(params=["sdpa", "eager"])
def attention(request: pytest.FixtureRequest, cosyvoice: Any) -> Iterator[str]:
    """The Qwen2 body's attention implementation, as transformers' config sets it."""
    config = _qwen(cosyvoice).config
    configured = config._attn_implementation
    config._attn_implementation = request.param
    yield request.param
    config._attn_implementation = configured


def test_the_step_equals_transformers_own_forward(cosyvoice: Any, attention: str) -> None:
    """Each stream's hidden state, and the keys and values written to its next slot, are
    what transformers' Qwen2 forward gives for that stream alone, with either attention."""
    assert _qwen(cosyvoice).config._attn_implementation == attention
    pool, rows = _filled_pool(cosyvoice)
    tokens, positions, slots = _step_input(cosyvoice, pool, rows, LENGTHS)
    with torch.inference_mode():
        expected = [_transformers_forward(cosyvoice, pool, row, length, int(token))
                    for row, length, token in zip(rows, LENGTHS, tokens, strict=True)]
        hidden = DecodeStep(_qwen(cosyvoice), cosyvoice.model.llm.speech_embedding.weight,
                            pool)(tokens, positions, slots)
    for index, (state, new_keys, new_values) in enumerate(expected):
        assert torch.allclose(hidden[index], state, atol=1e-5)
        slot = int(slots[index, LENGTHS[index]])
        assert torch.allclose(pool.keys[:, slot], new_keys, atol=1e-5)
        assert torch.allclose(pool.values[:, slot], new_values, atol=1e-5)


def test_a_padded_step_equals_the_exact_one_and_writes_only_the_scratch_slot_more(
        cosyvoice: Any) -> None:
    pool, rows = _filled_pool(cosyvoice)
    step = DecodeStep(_qwen(cosyvoice), cosyvoice.model.llm.speech_embedding.weight, pool)
    inputs = _step_input(cosyvoice, pool, rows, LENGTHS)
    before = pool.keys.clone(), pool.values.clone()
    with torch.inference_mode():
        exact = step(*inputs)
        written = pool.keys.clone(), pool.values.clone()
        pool.keys.copy_(before[0])
        pool.values.copy_(before[1])
        padded = step(*pad_rows(pool, *inputs, streams=8, span=MIN_SPAN))
    assert padded.shape[0] == 8
    assert torch.allclose(padded[:3], exact, atol=1e-5)
    scratch = pool.scratch_slot
    for got, want, old in zip((pool.keys, pool.values), written, before, strict=True):
        assert torch.allclose(got[:, :scratch], want[:, :scratch], atol=1e-5)
        assert torch.equal(want[:, scratch:], old[:, scratch:])  # the exact step left it
    assert not torch.equal(pool.keys[:, scratch], before[0][:, scratch])  # padding wrote here


def test_graphed_steps_replay_each_bucket_from_its_own_tensors(cosyvoice: Any) -> None:
    pool, rows = _filled_pool(cosyvoice)
    step = DecodeStep(_qwen(cosyvoice), cosyvoice.model.llm.speech_embedding.weight, pool)
    capture = _ReplayCapture()
    graphed = GraphedStep(step, capture)
    calls = [(rows, LENGTHS), (rows[:1], LENGTHS[:1]), (rows, (9, 3, 40)), (rows[:2], (6, 2))]
    with torch.inference_mode():
        for call_rows, lengths in calls:
            want, got = _eager_then_graphed(
                step, graphed, _step_input(cosyvoice, pool, call_rows, lengths))
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-5)
    assert graphed.buckets == [(1, MIN_SPAN), (2, MIN_SPAN), (4, MIN_SPAN)]
    assert capture.captures == 3  # the third call replayed the first call's graph
    assert graphed.failure is None


def test_a_failed_capture_runs_eagerly_and_says_why(cosyvoice: Any) -> None:
    pool, rows = _filled_pool(cosyvoice)
    step = DecodeStep(_qwen(cosyvoice), cosyvoice.model.llm.speech_embedding.weight, pool)
    attempts = []

    def refusing(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        attempts.append(run)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed = GraphedStep(step, refusing)
    inputs = _step_input(cosyvoice, pool, rows, LENGTHS)
    snapshot = pool.keys.clone(), pool.values.clone()
    with torch.inference_mode(), structlog.testing.capture_logs() as logged:
        want = step(*inputs)
        pool.keys.copy_(snapshot[0])
        pool.values.copy_(snapshot[1])
        first = graphed(*inputs)
        graphed(*inputs)
    assert torch.allclose(first, want, atol=1e-5)
    assert len(attempts) == 1  # not tried again at every step
    assert graphed.failure == "RuntimeError: operation not permitted when stream is capturing"
    warnings = [entry for entry in logged if entry["event"] == "cuda_graphs_unavailable"]
    assert len(warnings) == 1
    assert warnings[0]["reason"] == graphed.failure
    assert graphed.buckets == []


@pytest.mark.usefixtures("greedy")
def test_streams_through_graphed_steps_speak_the_eager_tokens(cosyvoice: Any,
                                                              model_version: int) -> None:
    """Four streams joining at different steps, their decoding steps replayed from buckets
    as streams join and leave: the tokens of eager steps."""
    requests = _requests(cosyvoice, model_version)
    eager = _run_batched(BatchedDecoder(cosyvoice.model, max_streams=4, cuda_graphs=False),
                         requests)
    decoder = BatchedDecoder(cosyvoice.model, max_streams=4, cuda_graphs=False)
    capture = _ReplayCapture()
    graphed = GraphedStep(decoder._step, capture)  # type: ignore[arg-type]
    decoder._step = graphed  # a test double: the stand-in capture, on a CPU
    outcomes = _run_batched(decoder, requests, JOIN_STEPS)
    for got, want in zip(outcomes, eager, strict=True):
        assert got.done
        assert got.tokens == want.tokens
    assert {streams for streams, _ in graphed.buckets} >= {1, 2, 4}
    assert capture.captures == len(graphed.buckets)


def _on_cuda(cosyvoice: Any) -> None:
    if torch.device(cosyvoice.model.device).type != "cuda":
        pytest.skip("CUDA graphs are captured on a CUDA device only (make test-gpu)")


def test_cuda_graphs_replay_the_eager_step(cosyvoice: Any) -> None:
    _on_cuda(cosyvoice)
    pool, rows = _filled_pool(cosyvoice)
    step = DecodeStep(_qwen(cosyvoice), cosyvoice.model.llm.speech_embedding.weight, pool)
    graphed = GraphedStep(step)
    with torch.inference_mode():
        for call_rows, lengths in [(rows, LENGTHS), (rows[:1], LENGTHS[:1]), (rows, (9, 3, 40))]:
            want, got = _eager_then_graphed(
                step, graphed, _step_input(cosyvoice, pool, call_rows, lengths))
            assert torch.allclose(got.float(), want.float(), atol=2e-3, rtol=1e-3)
    assert graphed.failure is None
    assert graphed.buckets == [(1, MIN_SPAN), (4, MIN_SPAN)]


def test_a_cuda_decoder_captures_graphs_by_default(cosyvoice: Any, model_version: int) -> None:
    _on_cuda(cosyvoice)
    requests = _requests(cosyvoice, model_version)
    decoder = BatchedDecoder(cosyvoice.model, max_streams=4)
    assert isinstance(decoder._step, GraphedStep)
    assert_length_rules(decoder, requests, _run_batched(decoder, requests))
    assert decoder._step.failure is None
    assert decoder._step.buckets
