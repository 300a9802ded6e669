"""Build a tiny, randomly initialised CosyVoice model directory for tests and benchmarks.

The modules are the real upstream classes built from a shrunk yaml (`tiny_v1.yaml`, or the
`tiny_v2.yaml` for CosyVoice2 against an upstream checkout); their random `state_dict`s are
saved, so strict loading matches by construction. The two ONNX front-end models (speaker
embedding, speech tokenizer) are small random graphs with the upstream input/output shapes.
The audio such a model makes is noise: tests check shapes, rates, chunking and lengths.

    python -m tests.cosyvoice.tiny_model OUT_DIR [--version 1|2]
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from hyperpyyaml import load_hyperpyyaml
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

HERE = Path(__file__).parent
SEED = 1234
SPEAKER_DIM = 192
SFT_SPEAKERS = ("English Female", "English Male")
# Upstream's stop token can be drawn only after `min_token_text_ratio` x text tokens; a random
# LLM then almost never stops before `max_token_text_ratio`. A stop logit near log(vocabulary)
# makes it stop a few tokens after the minimum. Before the minimum, the PyPI package's v1
# code draws again while it draws the stop token (current upstream masks it instead): with
# 8.5, v1's nucleus (top-p 0.8 of the top 25) held the stop token 97% of the time, so it
# drew 40 times a token (4.1 s for 105 tokens, most of the lane's synthesis); with 5.0 it
# draws 2.2 times (0.8 s) and still stops 0 or 1 tokens after the minimum. CosyVoice2/3,
# only on current upstream, keep the 8.5 their checkout lanes were measured with.
STOP_LOGIT_BIAS = {1: 5.0, 2: 8.5, 3: 8.5}
VERSIONS = {1: ("tiny_v1.yaml", "cosyvoice.yaml", "speech_tokenizer_v1.onnx", 4096),
            2: ("tiny_v2.yaml", "cosyvoice2.yaml", "speech_tokenizer_v2.onnx", 6561),
            3: ("tiny_v3.yaml", "cosyvoice3.yaml", "speech_tokenizer_v3.onnx", 6561)}
# CosyVoice2/3 read their text tokenizer and LLM backbone from this Qwen2 directory.
QWEN_DIR = "CosyVoice-BlankEN"
# Upstream CosyVoice3 looks for <|endofprompt|> by id (151646): the id it gets when added after
# Qwen2's 151643 ordinary tokens and its three specials. The tiny vocabulary keeps those ids:
# the 256 byte-level symbols, then unreachable fillers, then the specials.
QWEN_ORDINARY_TOKENS = 151643
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_EMBEDDINGS = 152064  # room for the specials upstream's tokenizers add on load


def _save_onnx(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime of the last years reads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _campplus(path: Path, rng: np.random.Generator) -> None:
    """(1, T, 80) fbank -> (1, 192) speaker embedding: mean over time, then a projection."""
    weight = numpy_helper.from_array(rng.standard_normal((80, SPEAKER_DIM)).astype(np.float32),
                                     "weight")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["pooled", "weight"], ["embedding"])],
        "campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, SPEAKER_DIM])],
        [weight])
    _save_onnx(graph, path)


def _speech_tokenizer(path: Path, vocabulary: int, rng: np.random.Generator) -> None:
    """(1, 128, T) log-mel at 100 frames/s + (1,) length -> (1, T/2) tokens at 50/s."""
    weight = numpy_helper.from_array(
        rng.standard_normal((128, vocabulary)).astype(np.float32), "weight")
    starts, ends, axes, steps = (numpy_helper.from_array(np.array([value], dtype=np.int64), name)
                                 for value, name in ((0, "starts"), (2**62, "ends"),
                                                     (2, "axes"), (2, "steps")))
    graph = helper.make_graph(
        [helper.make_node("Slice", ["feats", "starts", "ends", "axes", "steps"], ["halved"]),
         helper.make_node("Transpose", ["halved"], ["frames"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["frames", "weight"], ["scores"]),
         helper.make_node("ArgMax", ["scores"], ["tokens"], axis=2, keepdims=0),
         helper.make_node("Identity", ["feats_length"], ["unused_length"])],
        "speech_tokenizer",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "N"]),
         helper.make_tensor_value_info("unused_length", TensorProto.INT32, [1])],
        [weight, starts, ends, axes, steps])
    _save_onnx(graph, path)


def _qwen_backbone(path: Path) -> None:
    """A byte-level BPE tokenizer and a 2-layer Qwen2, saved as transformers would."""
    vocabulary = {symbol: index
                  for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocabulary.update({f"<|filler_{index}|>": index
                       for index in range(len(vocabulary), QWEN_ORDINARY_TOKENS)})
    bpe = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tokenizer.add_special_tokens({"eos_token": QWEN_SPECIALS[0], "pad_token": QWEN_SPECIALS[0],
                                  "additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tokenizer.save_pretrained(path)
    config = Qwen2Config(vocab_size=QWEN_EMBEDDINGS, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(path)


def _shape_stop_logits(llm: torch.nn.Module, bias: float) -> None:
    """Make the random LLM stop a few tokens after upstream's minimum length, every time.

    The stop id is `speech_token_size`, the one id upstream masks until the minimum length
    in every version; CosyVoice2/3 have more stop ids, which would end a segment at random
    and are suppressed.
    """
    stop = llm.speech_token_size
    suppressed = [index for index in getattr(llm, "stop_token_ids", []) if index != stop]
    decoder = llm.llm_decoder
    with torch.no_grad():
        decoder.weight[[stop, *suppressed]] = 0.0
        if decoder.bias is not None:
            decoder.bias[stop] = bias
            decoder.bias[suppressed] = -bias
        else:  # CosyVoice3's decoder has no bias: make one hidden feature a constant instead
            feature = _constant_feature(llm)
            decoder.weight[stop, 0] = bias / feature
            decoder.weight[suppressed, 0] = -bias / feature


def _constant_feature(llm: torch.nn.Module) -> float:
    """Pin hidden feature 0 of a Qwen2 backbone: every input embedding carries a large value
    there and no layer writes to it, so after the final RMS norm it is about sqrt(width)."""
    qwen = llm.llm.model.model
    for embedding in (qwen.embed_tokens, llm.speech_embedding):
        embedding.weight[:, 0] = 30.0
    for layer in qwen.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.down_proj.weight[0] = 0.0
    return math.sqrt(qwen.config.hidden_size)


def build(out_dir: Path, version: int = 1, **yaml_overrides: Any) -> Path:
    """Write a loadable model directory for CosyVoice `version` into `out_dir`."""
    yaml_name, model_yaml, tokenizer_name, vocabulary = VERSIONS[version]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    shutil.copyfile(HERE / yaml_name, out_dir / model_yaml)
    if version >= 2:
        _qwen_backbone(out_dir / QWEN_DIR)
        yaml_overrides = {"qwen_pretrain_path": str(out_dir / QWEN_DIR), **yaml_overrides}
    with open(out_dir / model_yaml, encoding="utf-8") as config:
        modules = load_hyperpyyaml(config, overrides=yaml_overrides or None)
    _shape_stop_logits(modules["llm"], STOP_LOGIT_BIAS[version])
    for name in ("llm", "flow", "hift"):
        torch.save(modules[name].state_dict(), out_dir / f"{name}.pt")
    speakers = {name: {"embedding": torch.randn(1, SPEAKER_DIM)} for name in SFT_SPEAKERS}
    torch.save(speakers, out_dir / "spk2info.pt")
    _campplus(out_dir / "campplus.onnx", rng)
    _speech_tokenizer(out_dir / tokenizer_name, vocabulary, rng)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--version", type=int, choices=sorted(VERSIONS), default=1)
    args = parser.parse_args()
    print(build(args.out_dir, args.version))


if __name__ == "__main__":
    main()
