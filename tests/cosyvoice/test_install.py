"""The CosyVoice install: a module missing from it is named, with the file that imports it
and the extra that installs it, where an operator looks: the log and exit of a daemon whose
worker cannot load, and `cosyvoiced --check-config` before the service is started.

A test double (tests/missing_modules) hides hyperpyyaml, which upstream's
cosyvoice.cli.cosyvoice imports in every version (the package and a checkout), from every
process the test starts. The import fails before any model is read, so a model directory
with only its yaml file in it is enough.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import DaemonFactory
from tests.cosyvoice.conftest import REPO as UPSTREAM_REPO
from tests.daemon import REPO, write_config

HIDDEN = "hyperpyyaml"
INSTALL = "pip install 'cosyvoiced[cosyvoice]'"
MISSING_MODULES = Path(__file__).resolve().parent.parent / "missing_modules"
EXIT_ENGINE = 3  # what the service exits with when its engine cannot load
CHECK_TIMEOUT_S = 300.0  # importing torch and upstream from a cold disk


def hiding(module: str) -> dict[str, str]:
    """The environment additions that make `module` look uninstalled."""
    return {"PYTHONPATH": os.pathsep.join([str(MISSING_MODULES), str(REPO)]),
            "COSYVOICED_TEST_MISSING_MODULES": module}


def engine_sections(root: Path) -> dict[str, dict[str, Any]]:
    model = root / "CosyVoice-300M"
    model.mkdir(parents=True)
    (model / "cosyvoice.yaml").touch()
    return {"engine": {"name": "cosyvoice"},
            "engine.cosyvoice": {"model_dir": str(model), "repo": UPSTREAM_REPO,
                                 "speakers_file": str(root / "speakers.json")}}


def check_config(root: Path, env: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    path = root / "cosyvoiced.toml"
    write_config(path, engine_sections(root))
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--check-config", "--config",
                          str(path)], env=dict(os.environ, **env), cwd=REPO,
                         capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False)
    return path, run


def assert_names_module_and_extra(message: str) -> None:
    assert message.startswith(f"ModuleNotFoundError: No module named '{HIDDEN}' (imported by "), \
        message
    importer = message.partition("(imported by ")[2].partition(")")[0]
    assert importer.endswith("cosyvoice/cli/cosyvoice.py"), message
    assert message.endswith(f"; install the cosyvoice engine's dependencies: {INSTALL}"), message


def test_a_missing_module_is_named_with_its_extra_when_the_engine_loads(
        tmp_path: Path, make_daemon: DaemonFactory) -> None:
    sections = engine_sections(tmp_path)
    daemon = make_daemon(engine=sections["engine"], engine__cosyvoice=sections["engine.cosyvoice"],
                         worker={"max_start_failures": 2})
    daemon.start(extra_env=hiding(HIDDEN), wait_ready=False)
    assert daemon.wait_exit(timeout_s=120) == EXIT_ENGINE
    failures = daemon.log_events("engine_load_failed")
    assert len(failures) == 2
    for failure in failures:
        assert f"ModuleNotFoundError: No module named '{HIDDEN}' (imported by " \
            in failure["exception"]
        assert INSTALL in failure["exception"]
    (fatal,) = daemon.log_events("worker_start_failed")
    assert_names_module_and_extra(fatal["reason"])
    assert daemon.notify is not None
    retrying = [s for s in daemon.notify.statuses() if "last load failed: " in s]
    assert retrying, daemon.notify.statuses()
    assert_names_module_and_extra(retrying[-1].split("last load failed: ", 1)[1]
                                  .rsplit("); queue ", 1)[0])


def test_check_config_names_the_missing_module_before_the_service_starts(
        tmp_path: Path) -> None:
    path, run = check_config(tmp_path, hiding(HIDDEN))
    assert run.returncode == EXIT_ENGINE, run.stderr
    assert run.stdout == ""
    (line,) = run.stderr.strip().splitlines()
    prefix = f"cosyvoiced: {path}: the cosyvoice engine cannot load: "
    assert line.startswith(prefix), line
    assert_names_module_and_extra(line.removeprefix(prefix))


def test_check_config_imports_the_upstream_code_of_this_install(tmp_path: Path) -> None:
    """What the lane installs (the cosyvoice extra) is all the upstream code imports."""
    path, run = check_config(tmp_path, {"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"cosyvoiced: {path}: OK"


def test_upstream_imports_inflect_without_its_type_instrumentation() -> None:
    """inflect's @typechecked recompiles every method it wraps at import: 2.9 s of each
    worker start here. Upstream's import gets inflect without it, and inflect still spells
    numbers as upstream's frontend asks; typeguard itself is left as it was."""
    probe = (
        "from cosyvoiced.engines import upstream\n"
        f"upstream.import_upstream({UPSTREAM_REPO!r})\n"
        "import inflect, typeguard\n"
        "names = inflect.engine.number_to_words.__code__.co_names\n"
        "print(any(name.startswith('typeguard') for name in names))\n"
        "print(inflect.engine().number_to_words(21))\n"
        "print(typeguard.typechecked.__module__)\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=CHECK_TIMEOUT_S, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    # (upstream prints its own line first: "failed to import ttsfrd")
    assert run.stdout.splitlines()[-3:] == ["False", "twenty-one", "typeguard"], run.stdout
