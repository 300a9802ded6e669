"""Importing the CosyVoice engine's upstream code, and saying what to do when it does not
import. Shared by the engine (cosyvoice.py) and the import probe (probe.py), which import
this module and never each other.

Upstream imports download helpers, modelscope and more at module level, so an install that
lacks one of them fails before any model is read. `missing_module` turns that failure into
one line naming the module, the file that imports it and the fix.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

INSTALL = "pip install 'cosyvoiced[cosyvoice]'"
UPSTREAM_PACKAGES = ("cosyvoice", "matcha")


def missing_module(error: ModuleNotFoundError, repo: str = "") -> ModuleNotFoundError:
    """`error` restated: the module, the file that imports it, and how to install it."""
    name = error.name or str(error)
    importer = _importer(error)
    where = f" (imported by {importer})" if importer else ""
    package = name.partition(".")[0]
    if package == "matcha" and repo:
        fix = (f"{repo}/third_party/Matcha-TTS is empty: run `git submodule update --init` "
               "in the checkout")
    elif package in UPSTREAM_PACKAGES:
        fix = ("the upstream code is missing or incomplete: point engine.cosyvoice.repo at a "
               "FunAudioLLM/CosyVoice checkout with its third_party/Matcha-TTS")
    else:
        fix = f"install the cosyvoice engine's dependencies: {INSTALL}"
    return ModuleNotFoundError(f"No module named {name!r}{where}; {fix}", name=name)


def _importer(error: BaseException) -> str | None:
    """The file whose import statement failed: the innermost frame outside importlib."""
    files = [frame.filename for frame in traceback.extract_tb(error.__traceback__)
             if not frame.filename.startswith("<frozen importlib")
             and not frame.filename.endswith("importlib/__init__.py")]
    return files[-1] if files else None


def import_torch() -> ModuleType:
    """torch, or a ModuleNotFoundError that says which extra installs it."""
    try:
        return importlib.import_module("torch")
    except ModuleNotFoundError as error:
        raise missing_module(error) from error


def import_upstream(repo: str) -> ModuleType:
    """Upstream's `cosyvoice.cli.cosyvoice`, from `repo` if given; a module it needs that is
    not installed is named, with the fix, in the ModuleNotFoundError."""
    if repo:
        sys.path[:0] = [repo, str(Path(repo) / "third_party" / "Matcha-TTS")]
    _import_inflect_unchecked()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        # cosyvoice.utils.file_utils calls logging.basicConfig(level=DEBUG) on import.
        return importlib.import_module("cosyvoice.cli.cosyvoice")
    except ModuleNotFoundError as error:
        raise missing_module(error, repo) from error
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        root.addFilter(_UpstreamChatter())


def _import_inflect_unchecked() -> None:
    """inflect (upstream's English number spelling) wraps its methods in typeguard's
    @typechecked, which re-parses and recompiles each one as inflect is imported: 2.9 s of
    CPU at every worker start on the 2-core machine (-O would skip it, and every assert with
    it). Its checks only guard the types of inflect's own arguments, which upstream passes
    as str and int: imported first with @typechecked as the identity, inflect stays in
    sys.modules for upstream's import."""
    try:
        typeguard = importlib.import_module("typeguard")  # inflect's dependency, not ours
    except ImportError:
        return  # an inflect without typeguard: nothing to skip
    checked = getattr(typeguard, "typechecked", None)
    if checked is None:
        return
    setattr(typeguard, "typechecked", _unchecked)  # noqa: B010 - an untyped module
    try:
        importlib.import_module("inflect")
    except ImportError:
        pass  # upstream's own import then names what is missing
    finally:
        setattr(typeguard, "typechecked", checked)  # noqa: B010


def _unchecked(target: Any = None, **_options: Any) -> Any:
    """typeguard.typechecked's signature, checking nothing."""
    return target if target is not None else _unchecked


class _UpstreamChatter(logging.Filter):
    """Upstream logs two info lines per text segment with `logging.info` (the root logger):
    debug-level detail for a daemon. Our own loggers propagate past this filter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or logging.getLogger().level <= logging.DEBUG
