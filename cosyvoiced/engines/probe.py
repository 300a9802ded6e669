"""Whether the CosyVoice engine's upstream code imports here, and what to do when it does not.

Upstream imports download helpers, modelscope and more at module level, so an install that
lacks one of them fails before any model is read. `upstream.missing_module` turns that
failure into one line naming the module, the file that imports it and the fix; the engine
raises it, so it reaches `engine_load_failed`, STATUS= and the exit. `cosyvoiced
--check-config` runs this module as a subprocess (the daemon never imports torch or an
engine) to say the same before the service is started.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys

# Importing torch and upstream from a cold disk takes tens of seconds; a hung import is a
# finding too.
PROBE_TIMEOUT_S = 300.0


def check(repo: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Import the upstream code as a worker would, in a subprocess of this interpreter; None
    if it imports, else the error the engine would fail to load with."""
    try:
        run = subprocess.run([sys.executable, "-m", __name__, "--repo", repo],
                             capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"importing the upstream code took longer than {timeout_s:g} s"
    if run.returncode == 0:
        return None
    verdict = run.stdout.strip().splitlines()
    if verdict:
        return verdict[-1]
    died = run.stderr.strip().splitlines()  # a crash in native code leaves no verdict
    return f"the import probe exited with {run.returncode}" + (f": {died[-1]}" if died else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosyvoiced.engines.probe",
                                     description="import the CosyVoice engine's upstream code")
    parser.add_argument("--repo", default="", help="a CosyVoice checkout (engine.cosyvoice.repo)")
    args = parser.parse_args(argv)
    # Upstream prints while importing; stdout carries only the verdict, its last line.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            from cosyvoiced.engines import upstream  # noqa: PLC0415 - what is being probed

            upstream.import_torch()  # the engine's own first import
            upstream.import_upstream(args.repo)
        except Exception as error:  # noqa: BLE001 - any of them stops the engine loading
            verdict = f"{type(error).__name__}: {error}".replace("\n", " ")
        else:
            verdict = ""
    print(verdict or "OK")
    return 1 if verdict else 0


if __name__ == "__main__":
    sys.exit(main())
