"""The full-size benchmark model's fixed length (tests/cosyvoice/full_size.py), checked on the
tiny model's LLM: building the real size takes gigabytes, the length rule is the same code."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from tests.cosyvoice import full_size, tiny_model
from tests.cosyvoice.fixed_length import fixed_length

TEXT_TOKENS = 7
RATIO = 2.5


def _tiny_llm(model_dir: Path, version: int) -> torch.nn.Module:
    overrides = ({"qwen_pretrain_path": str(model_dir / tiny_model.QWEN_DIR)}
                 if version >= 2 else None)
    with (model_dir / tiny_model.VERSIONS[version][1]).open(encoding="utf-8") as config, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's dependencies' deprecations, not ours
        llm: torch.nn.Module = load_hyperpyyaml(config, overrides=overrides)["llm"]
    return llm.eval()


def test_every_text_gets_its_fixed_number_of_speech_tokens(model_dir: Path,
                                                           model_version: int) -> None:
    """Whatever ratios upstream passes (the package: 3 and 30), and with every stop id
    likely, exactly int(text tokens x ratio) tokens come out, every time."""
    if model_version not in full_size.VERSIONS:
        pytest.skip(f"the full-size model is CosyVoice {sorted(full_size.VERSIONS)}")
    llm = fixed_length(_tiny_llm(model_dir, model_version), RATIO)
    stops = sorted({llm.speech_token_size, *getattr(llm, "stop_token_ids", [])})
    with torch.no_grad():  # a model that leans towards stopping, as the tiny one does
        llm.llm_decoder.bias[stops] = tiny_model.STOP_LOGIT_BIAS[model_version]
    full_size.never_stop(llm)
    empty = torch.zeros(1, 0, dtype=torch.int32)
    counts = []
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.inference_mode():
            tokens = llm.inference(
                text=torch.randint(1, 1000, (1, TEXT_TOKENS), dtype=torch.int32),
                text_len=torch.tensor([TEXT_TOKENS], dtype=torch.int32),
                prompt_text=empty, prompt_text_len=torch.tensor([0], dtype=torch.int32),
                prompt_speech_token=empty,
                prompt_speech_token_len=torch.tensor([0], dtype=torch.int32),
                embedding=torch.randn(1, tiny_model.SPEAKER_DIM),
                max_token_text_ratio=30, min_token_text_ratio=3)
            counts.append(sum(1 for _ in tokens))
    assert counts == [int(TEXT_TOKENS * RATIO)] * 3
