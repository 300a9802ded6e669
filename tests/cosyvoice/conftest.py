"""The CosyVoice lane (`make test-cosyvoice`): the real upstream inference code, on a tiny
random model generated here, behind the real daemon.

By default the code is the `cosyvoice-package` installed in the lane's virtualenv (upstream
v1 at f65eca6) and the model is a CosyVoice-300M. With COSYVOICE_REPO set to a checkout of
FunAudioLLM/CosyVoice, the same tests run on that code (it is also the code the tiny model
is built with); COSYVOICE_VERSION=2 or 3 picks a tiny CosyVoice2 or CosyVoice3 model, which only
a checkout can load.

On a GPU host (`make test-gpu`), COSYVOICE_DEVICE=cuda:0 puts every lane daemon's workers on that
GPU (workers run on the CPU unless `worker.devices` says otherwise) and COSYVOICE_FP16=1 turns
`engine.cosyvoice.fp16` on.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cosyvoice import tiny_model
from tests.daemon import Daemon

REPO = os.environ.get("COSYVOICE_REPO", "")
MODEL_NAMES = {1: "CosyVoice-300M", 2: "CosyVoice2-0.5B", 3: "Fun-CosyVoice3-0.5B"}
DEVICE = os.environ.get("COSYVOICE_DEVICE", "")
FP16 = os.environ.get("COSYVOICE_FP16", "") == "1"
if REPO:
    sys.path[:0] = [REPO, str(Path(REPO) / "third_party" / "Matcha-TTS")]


@pytest.fixture(scope="session")
def model_version() -> int:
    version = int(os.environ.get("COSYVOICE_VERSION", "1"))
    if version > 1 and not REPO:
        pytest.skip(f"CosyVoice{version} code is only in an upstream checkout: set COSYVOICE_REPO")
    return version


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, model_version: int) -> Path:
    name = MODEL_NAMES[model_version]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's dependencies' deprecations, not ours
        return tiny_model.build(tmp_path_factory.mktemp("models") / name, model_version)


@pytest.fixture(scope="session")
def instruct_model_dir(model_dir: Path, model_version: int) -> Path:
    """v1 takes instructions only from a model whose directory says `-Instruct` (upstream
    of 2024 decides by the name); the same tiny weights, linked under that name."""
    if model_version != 1:
        return model_dir
    instruct = model_dir.with_name(model_dir.name + "-Instruct")
    if not instruct.exists():
        instruct.mkdir()
        for item in model_dir.iterdir():
            os.link(item, instruct / item.name)
    return instruct


def cosyvoice_daemon(root: Path, model: Path, engine: str = "cosyvoice",
                     log_level: str = "debug", worker: dict[str, Any] | None = None,
                     *, sections: dict[str, dict[str, Any]] | None = None,
                     **load_options: bool | int) -> Daemon:
    """A daemon serving `model` (not started); `sections` adds config sections."""
    # Only set keys are written: the CPU lane's configs stay as they were.
    devices = {"devices": [DEVICE]} if DEVICE else {}
    fp16 = {"fp16": True} if FP16 else {}
    return Daemon(root, engine={"name": engine},
                  engine__cosyvoice={"model_dir": str(model), "repo": REPO,
                                     "speakers_file": str(root / "state" / "speakers.json"),
                                     **fp16, **load_options},
                  worker={"start_timeout_s": 120.0, **devices, **(worker or {})},
                  log={"level": log_level}, **(sections or {}))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Daemon]:
    running = cosyvoice_daemon(tmp_path_factory.mktemp("cosyvoice"), model_dir)
    running.start()
    yield running
    running.stop()
    shutil.rmtree(running.root / "state", ignore_errors=True)


# Greedy sampling for exact comparisons: upstream's RAS with top_k 1 and a repetition
# threshold it never reaches (tests/cosyvoice/test_batched.py says why).
GREEDY = {"top_p": 0.8, "top_k": 1, "win_size": 10, "tau_r": 1.1}


@pytest.fixture(scope="module")
def cosyvoice(model_version: int, model_dir: Path) -> Any:
    """The tiny CosyVoice2/3 loaded by upstream's own class, one per test module, with
    greedy sampling at hand (`greedy`)."""
    if model_version == 1:
        pytest.skip("batched decoding serves the Qwen2 language model of CosyVoice2/3 only")
    # upstream is importable once conftest has put the checkout on the path
    from cosyvoice.cli.cosyvoice import CosyVoice2, CosyVoice3  # noqa: PLC0415
    from cosyvoice.utils.common import ras_sampling  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's dependencies' deprecations
        loaded = (CosyVoice2 if model_version == 2 else CosyVoice3)(str(model_dir))
    loaded.default_sampling = loaded.model.llm.sampling
    loaded.greedy_sampling = functools.partial(ras_sampling, **GREEDY)
    return loaded


@pytest.fixture
def greedy(cosyvoice: Any) -> Iterator[None]:
    cosyvoice.model.llm.sampling = cosyvoice.greedy_sampling
    yield
    cosyvoice.model.llm.sampling = cosyvoice.default_sampling
