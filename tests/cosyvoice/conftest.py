"""The CosyVoice lane (`make test-cosyvoice`): the real upstream inference code, on a tiny
random model generated here, behind the real daemon.

By default the code is the `cosyvoice-package` installed in the lane's virtualenv (upstream
v1 at f65eca6) and the model is a CosyVoice-300M. With COSYVOICE_REPO set to a checkout of
FunAudioLLM/CosyVoice, the same tests run on that code; COSYVOICE_VERSION=2 picks a tiny
CosyVoice2 model (skipped until its builder has a `tiny_v2.yaml`).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cosyvoice import tiny_model
from tests.daemon import Daemon

REPO = os.environ.get("COSYVOICE_REPO", "")


@pytest.fixture(scope="session")
def model_version() -> int:
    version = int(os.environ.get("COSYVOICE_VERSION", "1"))
    if not (Path(tiny_model.__file__).parent / tiny_model.VERSIONS[version][0]).exists():
        pytest.skip(f"no tiny CosyVoice{version} model definition yet")
    return version


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, model_version: int) -> Path:
    name = "CosyVoice-300M" if model_version == 1 else "CosyVoice2-0.5B"
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


def cosyvoice_daemon(root: Path, model: Path) -> Daemon:
    return Daemon(root, engine={"name": "cosyvoice"},
                  engine__cosyvoice={"model_dir": str(model), "repo": REPO,
                                     "speakers_file": str(root / "state" / "speakers.json")},
                  worker={"start_timeout_s": 120.0})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Daemon]:
    running = cosyvoice_daemon(tmp_path_factory.mktemp("cosyvoice"), model_dir)
    running.start()
    yield running
    running.stop()
    shutil.rmtree(running.root / "state", ignore_errors=True)
