"""A fixed number of speech tokens per text, for the full-size benchmark model.

A random LLM has no idea when speech should end. Upstream's `inference` draws at least
`min_token_text_ratio` and at most `max_token_text_ratio` speech tokens per text token; set
equal, every text gets exactly that many, so audio length, real-time factor and first-chunk
latency are the same from run to run. The model yamls (`full_v*.yaml`) apply this to the LLM
they build; the builder also makes the stop ids impossible to draw. Kept apart from
`full_size.py` so that the daemon's worker, which loads the yaml, imports nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def fixed_length(llm: Any, speech_tokens_per_text_token: float) -> Any:
    """`llm`, whose `inference` now draws int(text tokens x ratio) speech tokens per call.

    The ratios a caller passes are replaced: upstream of 2024 (the PyPI package) passes its
    own, 3 and 30."""
    inference = llm.inference
    ratio = speech_tokens_per_text_token

    # The defaults are the fixed ratio too: the batched decoder reads them from this
    # signature, as it reads upstream's.
    def fixed(*args: Any, min_token_text_ratio: float = ratio,
              max_token_text_ratio: float = ratio, **kwargs: Any) -> Iterator[Any]:
        kwargs.update(min_token_text_ratio=ratio, max_token_text_ratio=ratio)
        return inference(*args, **kwargs)  # type: ignore[no-any-return]

    llm.inference = fixed
    return llm
