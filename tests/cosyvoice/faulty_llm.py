"""The real cosyvoice engine with a fault injected into upstream's LLM thread, for the lane:
a test config selects it with `engine.name = "tests.cosyvoice.faulty_llm:load"`.

A text containing TRIGGER makes the upstream LLM's `inference` generator raise on its first
step, inside the thread upstream starts per request, as CosyVoice3's `<|endofprompt|>`
assertion does. Unguarded, a `stream=True` consumer then polls forever for tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cosyvoiced.config import EngineConfig
from cosyvoiced.engines import cosyvoice

TRIGGER = "kaboom"


def load(config: EngineConfig) -> cosyvoice.CosyVoiceEngine:
    engine = cosyvoice.load(config)
    upstream = engine._model  # a test double reaches in to plant its fault
    llm, tokenizer = upstream.model.llm, upstream.frontend.tokenizer
    run_llm = llm.inference

    def inference(*args: Any, **kwargs: Any) -> Iterator[Any]:
        text = kwargs["text"] if "text" in kwargs else args[0]
        if TRIGGER in tokenizer.decode(text[0].tolist()):
            raise AssertionError(f"{TRIGGER} in the text (a fault injected by the tests)")
        yield from run_llm(*args, **kwargs)

    llm.inference = inference
    return engine
