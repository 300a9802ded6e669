"""The config schema: defaults, and one clear line naming the key for every mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosyvoiced import config
from cosyvoiced.config import ConfigError, parse_size

REPO = Path(__file__).resolve().parent.parent


def _load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(path)


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    settings = _load(tmp_path, "")
    assert settings.spool.dir == "/var/lib/cosyvoiced/spool"
    assert settings.engine.name == "piper"
    assert settings.log.level == "info"
    assert settings.log.max_bytes == 10 << 20


def test_shipped_configs_are_valid_and_the_production_one_lists_the_defaults() -> None:
    production = config.load(REPO / "etc" / "cosyvoiced.toml")
    assert production == config.Config()
    development = config.load(REPO / "etc" / "cosyvoiced.dev.toml")
    assert development.spool.dir == str(REPO / "var" / "spool")


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[spool]\ndir = "spool"\n[log]\nfile = ""\n')
    assert settings.spool.dir == str(tmp_path / "spool")
    assert settings.log.file == ""


@pytest.mark.parametrize(("text", "message"), [
    ('[spool]\ndirectory = "/x"\n', "spool.directory: unknown key"),
    ('[spoool]\n', "spoool: unknown key"),
    ("[spool]\nmax_text_chars = \"many\"\n", "spool.max_text_chars: expected int; got str"),
    ("[spool]\nmax_text_chars = 0\n", "spool.max_text_chars: must be at least 1"),
    ("[spool]\nmax_text_chars = true\n", "spool.max_text_chars: expected int; got bool"),
    ('[log]\nlevel = "loud"\n', "log.level: expected one of debug, info, warning, error"),
    ('[log]\nmax_bytes = "lots"\n', "log.max_bytes: expected a size"),
    ('[engine]\nname = "espeak"\n',
     "engine.name: unknown engine 'espeak'; available: cosyvoice, piper"),
    ('[engine]\nname = "cosyvoice"\n', "engine.cosyvoice.model_dir: the cosyvoice engine needs"),
    ('[engine]\nname = "cosyvoice"\n[engine.cosyvoice]\nmodel_dir = "/"\n',
     "engine.cosyvoice.model_dir: '/' has none of cosyvoice.yaml"),
    ("[engine.cosyvoice]\nmax_streams = -1\n",
     "engine.cosyvoice.max_streams: must be at least 0; got -1"),
    ('[engine.cosyvoice]\nmax_streams = "many"\n', "engine.cosyvoice.max_streams: expected int"),
    ("[engine.cosyvoice]\nkv_cache_bytes = -1\n",
     "engine.cosyvoice.kv_cache_bytes: must be at least 0; got -1"),
    ('[engine.cosyvoice]\nkv_cache_bytes = "lots"\n',
     "engine.cosyvoice.kv_cache_bytes: expected a size"),
    ('[engine.cosyvoice]\ncuda_graphs = "yes"\n', "engine.cosyvoice.cuda_graphs: expected bool"),
    ('[engine.cosyvoice]\ncpu_bf16 = "auto"\n', "engine.cosyvoice.cpu_bf16: expected bool"),
    ('[engine.piper]\nvoices = ["/nowhere/v.onnx"]\n', "engine.piper.voices: '/nowhere/v.onnx"),
    ('[engine.piper]\nvoices = "v.onnx"\n', "engine.piper.voices: expected a list"),
    ('[cluster]\nredis = "http://h:6379"\n', "cluster.redis: expected redis://HOST:PORT/DB"),
    ('[cluster]\nredis = "redis://h"\nname = "a b"\n', "cluster.name: expected letters"),
    ('[cluster]\nredis = "redis://h"\npassword_file = "/nowhere/pw"\n',
     "cluster.password_file: cannot read '/nowhere/pw'"),
    ("[cluster]\nclaim_idle_s = 0.5\n", "cluster.claim_idle_s: must be at least 2.0"),
    ("spool = 3\n", "spool: expected a table"),
    ("[spool\n", "not valid TOML"),
])
def test_mistakes_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message in str(caught.value)


def test_batched_cosyvoice_keys_default_to_the_device_and_take_sizes(tmp_path: Path) -> None:
    default = config.CosyVoiceConfig()
    assert (default.max_streams, default.kv_cache_bytes, default.cuda_graphs,
            default.cpu_bf16) == (0, 0, True, False)
    settings = _load(tmp_path, '[engine.cosyvoice]\nmax_streams = 8\nkv_cache_bytes = "512MiB"\n'
                               "cuda_graphs = false\ncpu_bf16 = true\n")
    assert (settings.engine.cosyvoice.max_streams, settings.engine.cosyvoice.kv_cache_bytes,
            settings.engine.cosyvoice.cuda_graphs,
            settings.engine.cosyvoice.cpu_bf16) == (8, 512 << 20, False, True)


@pytest.mark.parametrize(("value", "size"), [
    (4096, 4096), ("4096", 4096), ("64KiB", 65536), ("10GiB", 10 << 30), ("1.5MB", 1_500_000),
])
def test_sizes(value: int | str, size: int) -> None:
    assert parse_size(value) == size


def test_daemon_refuses_a_bad_config_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[log]\nlevel = "loud"\n')
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("cosyvoiced: config error: log.level: expected one of")


def test_check_config(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--check-config", "--config",
                          str(REPO / "etc" / "cosyvoiced.toml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(": OK")


def test_check_config_names_a_missing_engine_module_and_its_extra(tmp_path: Path) -> None:
    """`pip install cosyvoiced` without the cosyvoice extra: torch is missing (a test double
    hides it, installed or not), and --check-config says so before the service is started."""
    model = tmp_path / "CosyVoice-300M"
    model.mkdir()
    (model / "cosyvoice.yaml").touch()
    path = tmp_path / "c.toml"
    path.write_text(f'[engine]\nname = "cosyvoice"\n[engine.cosyvoice]\nmodel_dir = "{model}"\n')
    env = dict(os.environ, COSYVOICED_TEST_MISSING_MODULES="torch",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "missing_modules"), str(REPO)]))
    run = subprocess.run([sys.executable, "-m", "cosyvoiced", "--check-config", "--config",
                          str(path)], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 3, run.stderr
    assert run.stdout == ""
    engine = REPO / "cosyvoiced" / "engines" / "upstream.py"
    assert run.stderr.strip() == (
        f"cosyvoiced: {path}: the cosyvoice engine cannot load: ModuleNotFoundError: No module "
        f"named 'torch' (imported by {engine}); install the cosyvoice engine's dependencies: "
        "pip install 'cosyvoiced[cosyvoice]'")
