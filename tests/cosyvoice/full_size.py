"""Build a CosyVoice model directory at the real size, with random weights, for benchmarks.

CosyVoice-300M (v1) and CosyVoice2-0.5B (v2): the modules of upstream's published configs
(`full_v1.yaml`, `full_v2.yaml`) and, for v2, a Qwen2-0.5B backbone (`QWEN2_0_5B`), so a
GPU spends on each text what the real model would, without the real weights (which nothing
here may download). The audio is noise. Every text gets a fixed number of speech tokens:
the yamls set upstream's min and max token-to-text ratios equal (`fixed_length.py`) and the
stop ids are made impossible to draw, so real-time factor and first-chunk latency compare
from run to run. The ONNX front-end models and the speakers are tiny_model's.

    python -m tests.cosyvoice.full_size OUT_DIR [--version 1|2]

v2 needs an upstream checkout (COSYVOICE_REPO); the files take about 1.7 GB (v1) and 4.3 GB
(v2), as float32.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hyperpyyaml import load_hyperpyyaml
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.cosyvoice import tiny_model

HERE = Path(__file__).parent
VERSIONS = {1: "full_v1.yaml", 2: "full_v2.yaml"}
# Qwen2-0.5B's config.json, as CosyVoice2-0.5B's CosyVoice-BlankEN/ ships it.
QWEN2_0_5B: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "use_sliding_window": False}
# A logit no sampler draws, yet finite in float16 (autocast runs the decoder in it).
NEVER = -1e4


def _qwen2_0_5b(path: Path) -> None:
    """tiny_model's tokenizer (Qwen2's special-token ids) with a random Qwen2-0.5B."""
    tiny_model._qwen_backbone(path)  # its tokenizer recipe: Qwen2's ids
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_0_5B))
    model.save_pretrained(path)  # replaces the tiny weights and config


def never_stop(llm: torch.nn.Module) -> None:
    """No stop id can be drawn: the length is then the one `fixed_length` sets. Upstream
    masks only `speech_token_size` below the minimum; CosyVoice2 has two more stop ids."""
    stops = sorted({llm.speech_token_size, *getattr(llm, "stop_token_ids", [])})
    decoder = llm.llm_decoder
    with torch.no_grad():
        decoder.weight[stops] = 0.0
        decoder.bias[stops] = NEVER


def build(out_dir: Path, version: int = 2) -> Path:
    """Write a loadable full-size model directory for CosyVoice `version` into `out_dir`."""
    _, model_yaml, tokenizer_name, vocabulary = tiny_model.VERSIONS[version]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tiny_model.SEED)
    rng = np.random.default_rng(tiny_model.SEED)
    shutil.copyfile(HERE / VERSIONS[version], out_dir / model_yaml)
    overrides = None
    if version >= 2:
        _qwen2_0_5b(out_dir / tiny_model.QWEN_DIR)
        overrides = {"qwen_pretrain_path": str(out_dir / tiny_model.QWEN_DIR)}
    with open(out_dir / model_yaml, encoding="utf-8") as config:
        modules = load_hyperpyyaml(config, overrides=overrides)
    never_stop(modules["llm"])
    for name in ("llm", "flow", "hift"):
        torch.save(modules[name].state_dict(), out_dir / f"{name}.pt")
    speakers = {name: {"embedding": torch.randn(1, tiny_model.SPEAKER_DIM)}
                for name in tiny_model.SFT_SPEAKERS}
    torch.save(speakers, out_dir / "spk2info.pt")
    tiny_model._campplus(out_dir / "campplus.onnx", rng)
    tiny_model._speech_tokenizer(out_dir / tokenizer_name, vocabulary, rng)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--version", type=int, choices=sorted(VERSIONS), default=2)
    args = parser.parse_args()
    print(build(args.out_dir, args.version))


if __name__ == "__main__":
    main()
