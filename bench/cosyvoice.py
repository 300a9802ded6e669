"""Daemon overhead on the cosyvoice engine: upstream's generator called directly in this
process vs the same texts streamed through the daemon over ZeroMQ, alternating, one run.

Runs in the CosyVoice lane's virtualenv (`make test-cosyvoice` builds it). On the tiny random
model (the default) its absolute speed means nothing, the ratios are the figures. With
--full-size the model has the real dimensions of CosyVoice-300M (--version 1) or
CosyVoice2-0.5B (--version 2) and every text a fixed number of speech tokens
(tests/cosyvoice/full_size.py), so on a GPU the real-time factor (`seconds_per_audio_second`)
and first-chunk latency mean something too. Each fp16 setting asked for (on CUDA: off and
on) is one daemon-vs-direct run. Prints JSON.

    .venv-cosyvoice/bin/python bench/cosyvoice.py [--count 12]
    COSYVOICE_REPO=/path/to/CosyVoice .venv-cosyvoice/bin/python bench/cosyvoice.py --version 2
    COSYVOICE_REPO=/path/to/CosyVoice python bench/cosyvoice.py --full-size --version 2 \\
        [--model-dir DIR] [--fp16 off|on|both] [--per-device 1,2,4]

--streams N[,N...] (versions 2 and 3) serves N clients at once three ways in one run: one
worker, one batched worker making N streams (`engine.cosyvoice.max_streams` N), and N
workers making one each (skipped, saying why, where N copies of the one worker's memory
would not fit in what the machine has available); it reports throughput, first chunk
p50/p95, speech tokens per second and the workers' memory of each, and each one's ratios
to the one worker. --cpu-bf16 adds the batched worker in bfloat16 (`engine.cosyvoice.cpu_bf16`).

--per-device N[,N...] measures the daemon alone instead: `worker.per_device` N workers on
the device and N clients streaming at once, each `--count` texts; it reports throughput
(audio seconds per wall second) and first-chunk latency. --model-dir keeps the built model
for the next run (a full-size CosyVoice2 takes a while to write).

The direct side (bench/cosyvoice_direct.py) runs in a process of its own prepared as a
daemon worker is: the daemon's own config file, the worker's own `place`, engine load and
`warm_up`, so the same environment, CPU threads and fp16 setting. It is given the care
the daemon takes: `token_hop_len` put back before each call (upstream grows it during a
stream and keeps it), CosyVoice3's system prompt in front. Both sides get one warm-up run,
then take turns on `--count` (at least 5) texts; the report gives each side's median per
figure, stage by stage (stages.py: the daemon's from its `job` log lines, the direct
side's from the same clock), and the ratios daemon / direct. `--max-chars` cuts each text
(at a word) to keep the full-size model's token count short on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # bench/zmq.py would shadow pyzmq

import torch  # noqa: E402

from bench.common import sentences, summary_ms  # noqa: E402
from cosyvoiced import memory, stages  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402
from cosyvoiced.config import WorkerConfig  # noqa: E402
from cosyvoiced.engines import cosyvoice as engine  # noqa: E402
from tests.cosyvoice import full_size, tiny_model  # noqa: E402
from tests.cosyvoice.conftest import MODEL_NAMES, cosyvoice_daemon  # noqa: E402
from tests.daemon import REPO, Daemon, wait_until  # noqa: E402

MODEL_CLASSES = dict(engine.MODEL_CLASSES.values())  # version -> upstream class name

VOICE = "English Female"
CUDA = torch.cuda.is_available()
# The daemon's workers run on the CPU unless `worker.devices` names a GPU; the direct calls
# use what upstream picks (the GPU, if there is one). Daemons older than the worker pool
# have no such key, and run where upstream picks too.
DEVICE = "cuda:0" if CUDA else "cpu"
PLACEMENT = "devices" in {setting.name for setting in dataclasses.fields(WorkerConfig)}
# Loading a full-size model on a busy CPU takes minutes.
LOAD_TIMEOUT_S = 900.0
JOB_TIMEOUT_S = 600

MIN_RUNS = 5
# The stage figures of a run, as stages.job_timings names them.
STAGE_KEYS = tuple(stages.job_timings([stages.SegmentStages(0.0, 1, 0.0)]))
LOG_LINE_TIMEOUT_S = 30.0

Run = tuple[float, float, int, int]  # first chunk s, total s, samples, sample rate
StagedRun = dict[str, Any]  # first_s, total_s, samples, sample_rate, stages


class DirectCaller:
    """bench/cosyvoice_direct.py in a process of its own, prepared as a worker is."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self._log_path = log_path
        with log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "bench.cosyvoice_direct", str(config_path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.ready = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the direct caller exited ({self._process.wait()}):\n"
                               f"{self._log_path.read_text(errors='replace')[-4000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, text: str) -> StagedRun:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"text": text, "voice": VOICE}) + "\n")
        self._process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def staged_daemon(client: Client, served: Daemon, text: str) -> StagedRun:
    """One streamed job, timed by the client; its stages from the job's `job` log line."""
    started = time.perf_counter()
    first, samples = 0.0, 0
    with client.stream(text, voice=VOICE) as stream:
        for pcm in stream:
            first = first or time.perf_counter() - started
            samples += len(pcm) // 2
        rate, job = int(stream.start["sample_rate"]), str(stream.start["job"])
    total = time.perf_counter() - started
    line = wait_until(lambda: [event for event in served.log_events("job")
                               if event.get("job") == job], LOG_LINE_TIMEOUT_S,
                      "the job's log line")[0]
    return {"first_s": first, "total_s": total, "samples": samples, "sample_rate": rate,
            "stages": {key: line[key] for key in STAGE_KEYS if key in line}}


def daemon(client: Client, text: str) -> Run:
    started = time.perf_counter()
    first, samples = 0.0, 0
    with client.stream(text, voice=VOICE) as stream:
        for pcm in stream:
            first = first or time.perf_counter() - started
            samples += len(pcm) // 2
        rate = int(stream.start["sample_rate"])
    return first, time.perf_counter() - started, samples, rate


def model_directory(version: int, full: bool, model_dir: Path | None, scratch: Path) -> Path:
    """`model_dir` as it is if it holds a model; else one built there (or in `scratch`)."""
    target = model_dir or scratch / MODEL_NAMES[version]
    if (target / tiny_model.VERSIONS[version][1]).is_file():
        return target
    partial = target.with_name(target.name + ".part")  # a build cut short is never reused
    shutil.rmtree(partial, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (full_size.build if full else tiny_model.build)(partial, version)
    partial.rename(target)
    return target


def configured_daemon(root: Path, model_dir: Path, fp16: bool, per_device: int | None = None,
                      max_streams: int | None = None, *, cpu_bf16: bool = False) -> Daemon:
    """A daemon for `model_dir`, its config file written, not started."""
    worker: dict[str, Any] = {"start_timeout_s": LOAD_TIMEOUT_S}
    if PLACEMENT:
        worker["devices"] = [DEVICE]
    if per_device is not None:
        worker["per_device"] = per_device
    # The package's CosyVoice loads TorchScript parts by default; these models have none.
    options: dict[str, Any] = {"fp16": fp16, "load_jit": False}
    if max_streams is not None:
        options["max_streams"] = max_streams
    if cpu_bf16:
        options["cpu_bf16"] = True
    return cosyvoice_daemon(root, model_dir, log_level="info", worker=worker, **options)


def start_daemon(root: Path, model_dir: Path, fp16: bool, per_device: int | None = None,
                 served: Daemon | None = None, *, max_streams: int | None = None,
                 cpu_bf16: bool = False) -> Daemon:
    served = served or configured_daemon(root, model_dir, fp16, per_device, max_streams,
                                         cpu_bf16=cpu_bf16)
    served.start(wait_ready=False)  # Daemon.wait_ready allows 90 s: a tiny model's load
    notify, process = served.notify, served.process
    assert notify is not None
    assert process is not None
    try:
        wait_until(lambda: notify.seen("READY=1") or process.poll() is not None,
                   LOAD_TIMEOUT_S, "READY=1")
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited with {process.returncode} before READY=1:"
                               f"\n{served.output()[-4000:]}")
    except BaseException:
        served.stop()
        raise
    return served


def overhead(model_dir: Path, texts: list[str], fp16: bool, scratch: Path) -> dict[str, Any]:
    """Daemon against direct calls, one text each in turn, for one fp16 setting."""
    root = scratch / f"daemon-fp16-{'on' if fp16 else 'off'}"
    served = configured_daemon(root, model_dir, fp16)
    # One at a time: two full-size models loading at once would share the cores.
    caller = DirectCaller(served.config_path, root.with_name(root.name + "-direct.log"))
    results: dict[str, list[StagedRun]] = {"direct": [], "daemon": []}
    try:
        start_daemon(root, model_dir, fp16, served=served)
        try:
            with Client(served.endpoint, timeout_s=JOB_TIMEOUT_S) as client:
                caller.run(texts[0])  # a warm-up run each, after the worker's own warm-up
                staged_daemon(client, served, texts[0])
                for text in texts:
                    results["direct"].append(caller.run(text))
                    results["daemon"].append(staged_daemon(client, served, text))
        finally:
            served.stop()
    finally:
        caller.close()
    return _report(results) | {"direct_load": caller.ready}


def concurrently(endpoint: str, text_lists: list[list[str]]) -> list[Run]:
    """Each list streamed by a client of its own, all at once; every run, in no order."""
    runs: list[Run] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def stream_all(texts: list[str]) -> None:
        try:
            with Client(endpoint, timeout_s=JOB_TIMEOUT_S) as client:
                for text in texts:
                    run = daemon(client, text)
                    with lock:
                        runs.append(run)
        except BaseException as error:  # noqa: BLE001 - raised in the main thread
            with lock:
                failures.append(error)

    threads = [threading.Thread(target=stream_all, args=(texts,)) for texts in text_lists]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return runs


def _ready_workers(client: Client) -> int:
    return sum(worker["state"] in ("idle", "busy") for worker in client.stats()["workers"])


def pool(model_dir: Path, texts: list[str], size: int, fp16: bool,
         scratch: Path, *, clients: int | None = None,
         max_streams: int | None = None, cpu_bf16: bool = False) -> dict[str, Any]:
    """`size` workers on the device (each making `max_streams` segments at once, in
    bfloat16 with `cpu_bf16`), `clients` (default: `size`) streaming every text at once."""
    clients = clients or size
    name = (f"pool-{size}x{max_streams or 0}-{clients}-fp16-{'on' if fp16 else 'off'}"
            f"{'-bf16' if cpu_bf16 else ''}")
    served = start_daemon(scratch / name, model_dir, fp16, per_device=size,
                          max_streams=max_streams, cpu_bf16=cpu_bf16)
    try:
        with Client(served.endpoint, timeout_s=JOB_TIMEOUT_S) as client:
            wait_until(lambda: _ready_workers(client) >= size, LOAD_TIMEOUT_S,
                       f"{size} workers ready")
            concurrently(served.endpoint, [texts[:1]] * clients)  # warm: every stream
            # Each client starts at another text, so the segments in flight differ in length.
            turns = [texts[index % len(texts):] + texts[:index % len(texts)]
                     for index in range(clients)]
            tokens_before = _tokens(served, clients)
            started = time.perf_counter()
            runs = concurrently(served.endpoint, turns)
            wall_s = time.perf_counter() - started
            tokens_after = _tokens(served, clients + len(runs))
            memory = _memory(client)
    finally:
        served.stop()
    audio_s = sum(samples / rate for _, _, samples, rate in runs)
    return {"workers": size, "max_streams": max_streams or 1, "clients": clients,
            "jobs": len(runs), "audio_s": round(audio_s, 2), "wall_s": round(wall_s, 2),
            "throughput_audio_s_per_s": round(audio_s / wall_s, 3),
            "tokens_per_s": None if tokens_after is None or tokens_before is None
            else round((tokens_after - tokens_before) / wall_s, 1),
            "first_chunk": summary_ms([first for first, _, _, _ in runs]),
            "per_job": summary_ms([total for _, total, _, _ in runs]), **memory}


def _tokens(served: Daemon, jobs: int) -> float | None:
    """Speech tokens made by the first `jobs` jobs, from their `job` log lines (each logged
    just after its reply: waited for); None if they give none."""
    lines = wait_until(lambda: len(found := served.log_events("job")) >= jobs and found,
                       JOB_TIMEOUT_S, f"{jobs} jobs' log lines")[:jobs]
    counts = [event["llm_tokens"] for event in lines if "llm_tokens" in event]
    return float(sum(counts)) if counts else None


def _memory(client: Client) -> dict[str, int]:
    """The workers' resident and GPU memory together, in MiB, as the pool last measured."""
    workers = client.stats()["workers"]
    return {"rss_mib": sum(w.get("rss_bytes") or 0 for w in workers) >> 20,
            "gpu_mib": sum(w.get("gpu_bytes") or 0 for w in workers) >> 20}


def streams(model_dir: Path, texts: list[str], count: int, fp16: bool,  # noqa: PLR0917
            scratch: Path, cpu_bf16: bool = False) -> dict[str, Any]:
    """`count` clients at once, served three ways in one run: one worker making one (the
    clients queue), one batched worker making `count` streams (and, with `cpu_bf16`, the
    same in bfloat16), and `count` workers making one each (a model copy per stream),
    unless that many copies would not fit in memory."""
    def served(size: int, max_streams: int, bf16: bool = False) -> dict[str, Any]:
        return pool(model_dir, texts, size, fp16, scratch, clients=count,
                    max_streams=max_streams, cpu_bf16=bf16)

    single = served(1, 1)
    result = {"one_worker": single}
    if count > 1:
        result["batched"] = served(1, count)
        if cpu_bf16:
            result["batched_cpu_bf16"] = served(1, count, bf16=True)
        short = _memory_short(single, count)
        result["workers"] = {"skipped": short} if short else served(count, 1)
    for figures in result.values():
        if "skipped" in figures:
            continue
        figures["throughput_vs_one_worker"] = round(
            figures["throughput_audio_s_per_s"] / single["throughput_audio_s_per_s"], 3)
        figures["first_chunk_p50_vs_one_worker"] = round(
            figures["first_chunk"]["p50_ms"] / single["first_chunk"]["p50_ms"], 3)
    return result


def _memory_short(single: dict[str, Any], copies: int) -> str | None:
    """Why `copies` workers like `single` would not fit in this machine's memory, if so."""
    needed = {"rss": copies * single["rss_mib"], "gpu": copies * single["gpu_mib"]}
    free = {"rss": _available_mib(), "gpu": _gpu_free_mib()}
    for kind, mib in needed.items():
        if free[kind] is not None and mib > free[kind]:
            return (f"{copies} workers need about {mib:,} MiB of {kind} memory "
                    f"({copies} x {mib // copies:,}); {free[kind]:,} MiB is available")
    return None


def _available_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return memory.parse_meminfo(Path("/proc/meminfo").read_text(), "MemAvailable") >> 20
    return None


def _gpu_free_mib() -> int | None:
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free) >> 20


def _medians(runs: list[StagedRun]) -> dict[str, float]:
    """Each figure's median over the runs: times, then every stage the runs report."""
    figures: dict[str, list[float]] = {
        "first_chunk_ms": [run["first_s"] * 1000 for run in runs],
        "per_job_ms": [run["total_s"] * 1000 for run in runs],
        # Per audio second: the tiny model's lengths differ from call to call.
        "seconds_per_audio_second": [run["total_s"] * run["sample_rate"] / run["samples"]
                                     for run in runs],
    }
    for key in STAGE_KEYS:
        values = [run["stages"][key] for run in runs if key in run["stages"]]
        if len(values) == len(runs):
            figures[key] = values
    return {name: round(statistics.median(values), 4) for name, values in figures.items()}


def _report(results: dict[str, list[StagedRun]]) -> dict[str, Any]:
    report: dict[str, Any] = {"runs": len(results["direct"])}
    for name, runs in results.items():
        report[name] = {"median": _medians(runs),
                        "first_chunk": summary_ms([run["first_s"] for run in runs]),
                        "audio_s": round(sum(run["samples"] / run["sample_rate"]
                                             for run in runs), 2)}
    daemon_side, direct_side = report["daemon"]["median"], report["direct"]["median"]
    report["ratios"] = {name: round(daemon_side[name] / value, 3)
                        for name, value in direct_side.items()
                        if value and name in daemon_side}
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-cosyvoice-"))
    try:
        started = time.perf_counter()
        model_dir = model_directory(args.version, args.full_size, args.model_dir, scratch)
        report: dict[str, Any] = {
            "model": MODEL_CLASSES[args.version], "full_size": args.full_size,
            "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
            "texts": args.count, "model_ready_s": round(time.perf_counter() - started, 1)}
        texts = [_shortened(text, args.max_chars) for text in sentences(args.count)]
        for mode in ("off", "on") if args.fp16 == "both" else (args.fp16,):
            if args.streams:
                report[f"fp16_{mode}"] = {}
                for count in args.streams:
                    result = streams(model_dir, texts, count, mode == "on", scratch,
                                     args.cpu_bf16)
                    report[f"fp16_{mode}"][str(count)] = result
                    print(json.dumps({"fp16": mode, "streams": count, **result}),
                          file=sys.stderr, flush=True)
            elif args.per_device:
                report[f"fp16_{mode}"] = {}
                for size in args.per_device:
                    result = pool(model_dir, texts, size, mode == "on", scratch)
                    report[f"fp16_{mode}"][str(size)] = result
                    # On stderr as each size ends: a run cut short by a time limit keeps these.
                    print(json.dumps({"fp16": mode, **result}), file=sys.stderr, flush=True)
            else:
                report[f"fp16_{mode}"] = overhead(model_dir, texts, mode == "on", scratch)
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _shortened(text: str, max_chars: int | None) -> str:
    """`text` cut at the last word that ends within `max_chars`, with a full stop."""
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars + 1].rsplit(" ", 1)[0].rstrip(".,") + "."


def _sizes(value: str) -> list[int]:
    sizes = [int(size) for size in value.split(",")]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected worker counts such as 1,2,4; got {value!r}")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12, help="texts (per client)")
    parser.add_argument("--max-chars", type=int, metavar="N",
                        help="cut each text to at most N characters (at a word): the "
                             "full-size model draws 5/3 speech tokens per character")
    parser.add_argument("--version", type=int, choices=sorted(MODEL_CLASSES), default=1,
                        help="2 and 3 need COSYVOICE_REPO (an upstream checkout)")
    parser.add_argument("--full-size", action="store_true",
                        help="CosyVoice-300M / CosyVoice2-0.5B dimensions, random weights")
    parser.add_argument("--model-dir", type=Path,
                        help="the model to use; built there first if it holds none")
    parser.add_argument("--fp16", choices=("off", "on", "both"), default="both" if CUDA else "off",
                        help="engine.cosyvoice.fp16 (upstream uses it on CUDA only); default: "
                             "both on CUDA, off on the CPU")
    parser.add_argument("--per-device", type=_sizes, metavar="N[,N...]",
                        help="the daemon alone, with N workers and N clients at once")
    parser.add_argument("--streams", type=_sizes, metavar="N[,N...]",
                        help="N clients at once: one batched worker making N streams, N "
                             "workers, and one worker, side by side (versions 2 and 3)")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="with --streams: the batched worker also with "
                             "engine.cosyvoice.cpu_bf16 (a CPU with AMX-BF16 or AVX512-BF16)")
    args = parser.parse_args()
    if args.full_size and args.version not in full_size.VERSIONS:
        parser.error(f"--full-size builds versions {sorted(full_size.VERSIONS)}")
    if not (args.per_device or args.streams) and args.count < MIN_RUNS:
        parser.error(f"--count: a median needs at least {MIN_RUNS} runs")
    if args.per_device and not PLACEMENT:
        parser.error("--per-device needs a daemon with worker.per_device (the worker pool)")
    with contextlib.redirect_stdout(sys.stderr):  # upstream prints each text it speaks
        report = run(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
