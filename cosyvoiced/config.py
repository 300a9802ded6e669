"""The configuration schema: frozen dataclasses, loaded from TOML and validated once.

Every key has a default. An unknown key, a wrong type or a bad value raises `ConfigError`
whose message names the key, e.g. ``log.level: expected one of ...; got 'loud'``.
Relative paths are resolved against the directory of the config file, so a config works
the same whatever the current directory is.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from cosyvoiced import memory, placement
from cosyvoiced.placement import DEVICE, PER_DEVICE_AUTO

LOG_LEVELS = ("debug", "info", "warning", "error")
ENGINE_ENTRY_POINTS = "cosyvoiced.engines"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key."""


Check = Callable[[Any], str | None]


def _one_of(*allowed: str) -> Check:
    def check(value: Any) -> str | None:
        if value in allowed:
            return None
        return f"expected one of {', '.join(allowed)}; got {value!r}"

    return check


def _devices(value: Any) -> str | None:
    if not value:
        return "needs at least one device, such as \"cpu\" or \"cuda:0\""
    wrong = [device for device in value if not DEVICE.match(device)]
    if wrong:
        return f"expected \"cpu\" or \"cuda:N\" (N a GPU index); got {wrong[0]!r}"
    if len(set(value)) != len(value):
        return "a device is listed twice; use worker.per_device for more workers on one"
    return None


def _at_least(minimum: float) -> Check:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}; got {value!r}"

    return check


def _setting(default: Any, check: Check | None = None, *, size: bool = False,
             path: bool = False, auto: Any = None) -> Any:
    """`auto`: what the string "auto" stands for, for a key that may be resolved later."""
    metadata = {"check": check, "size": size, "path": path, "auto": auto}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"10GB"`` or ``"4096"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError(f"expected a size such as 4096, \"64MiB\" or \"10GiB\"; got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def available_engines() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENGINE_ENTRY_POINTS))


@dataclass(frozen=True)
class SpoolConfig:
    dir: str = _setting("/var/lib/cosyvoiced/spool", path=True)
    max_text_chars: int = _setting(20_000, _at_least(1))
    max_file_bytes: int = _setting(1 << 20, _at_least(1), size=True)
    default_format: str = _setting("wav", _one_of("wav", "flac", "ogg"))
    rescan_interval_s: float = _setting(60.0, _at_least(1))
    # .txt files cleaned up before synthesis (markdown, emoji, URLs: cleanup.py); a JSON
    # job, like every other request, says so itself ("normalize": false).
    normalize: bool = True


@dataclass(frozen=True)
class PiperConfig:
    voices: list[str] = _setting([], path=True)  # noqa: RUF009 - returns a field()
    use_cuda: bool = False
    # onnxruntime's CPU memory arena, shrunk after every run (engines/piper.py) so RSS stays
    # flat; off, every tensor comes from malloc: flatter still, about 15-20% slower.
    memory_arena: bool = True
    # Unset: each voice's own. 0 and 0 make synthesis deterministic (same text, same audio).
    noise_scale: float | None = _setting(None, _at_least(0))
    noise_w_scale: float | None = _setting(None, _at_least(0))
    # onnxruntime's intra-op threads per worker; 0: the cores shared among the CPU workers.
    threads: int = _setting(0, _at_least(0))


COSYVOICE_MODEL_FILES = ("cosyvoice.yaml", "cosyvoice2.yaml", "cosyvoice3.yaml")


@dataclass(frozen=True)
class CosyVoiceConfig:
    model_dir: str = _setting("", path=True)
    # A CosyVoice checkout to import from (with its third_party/Matcha-TTS); "" = the
    # installed `cosyvoice` package.
    repo: str = _setting("", path=True)
    # Registered voices: in the state directory, never in the (read-only) model directory.
    speakers_file: str = _setting("/var/lib/cosyvoiced/speakers.json", path=True)
    # Every worker holds every registered voice's prompt features: so there are at most
    # max_voices, and one client (key) may own at most max_voices_per_client (admins: any).
    max_voices: int = _setting(32, _at_least(0))
    max_voices_per_client: int = _setting(8, _at_least(0))
    fp16: bool = False
    load_jit: bool = False
    load_trt: bool = False
    load_vllm: bool = False
    # Where load_trt's plans and load_vllm's LLM export are written (engines/exports.py),
    # never the read-only model directory: the unit's CacheDirectory=.
    export_dir: str = _setting("/var/cache/cosyvoiced/exports", path=True)
    # Segments one CosyVoice2/3 worker makes at once on its one model (batched decoding).
    # 0: the default for the worker's device (engines/cosyvoice.py `stream_count`: 16 on
    # CUDA, 4 on a CPU); CosyVoice-300M and vLLM always serve one.
    max_streams: int = _setting(0, _at_least(0))
    # The batched decoder's KV cache, reserved at load; 0: 2048 tokens per stream.
    kv_cache_bytes: int = _setting(0, _at_least(0), size=True)
    # Capture the decoding step in CUDA graphs (CUDA only; see the README for its state).
    cuda_graphs: bool = True
    # On a CPU worker with max_streams > 1: the language model and the flow estimator in
    # bfloat16 (engines/bf16.py); only where the CPU has AMX-BF16 or AVX512-BF16 (cpuflags.py).
    cpu_bf16: bool = False


@dataclass(frozen=True)
class EngineConfig:
    name: str = "piper"
    voice: str = ""
    piper: PiperConfig = field(default_factory=PiperConfig)
    cosyvoice: CosyVoiceConfig = field(default_factory=CosyVoiceConfig)


@dataclass(frozen=True)
class LogConfig:
    file: str = _setting("/var/log/cosyvoiced/cosyvoiced.log", path=True)
    max_bytes: int = _setting(10 << 20, _at_least(4096), size=True)
    backups: int = _setting(5, _at_least(0))
    level: str = _setting("info", _one_of(*LOG_LEVELS))


RSS_LIMIT_AUTO = -1  # worker.rss_limit = "auto", until the Config resolves it


@dataclass(frozen=True)
class WorkerConfig:
    start_timeout_s: float = _setting(300.0, _at_least(1))
    drain_timeout_s: float = _setting(30.0, _at_least(0))
    heartbeat_interval_s: float = _setting(2.0, _at_least(0.1))
    heartbeat_timeout_s: float = _setting(30.0, _at_least(1))
    max_start_failures: int = _setting(3, _at_least(1))
    # Recycling: 0 turns a limit off. rss_limit "auto" (the default, RSS_LIMIT_AUTO here) is
    # resolved when the Config is made (`resolve_rss_limit`): half the machine's memory (or
    # its cgroup's limit) split among the workers (devices x per_device, plus the spare),
    # never under what the engine needs (memory.ENGINE_RSS_FLOOR: Piper 2 GiB, CosyVoice
    # 8 GiB). A plain WorkerConfig() leaves it unresolved, which the policy takes as off.
    rss_limit: int = _setting(RSS_LIMIT_AUTO, _at_least(0), size=True, auto=RSS_LIMIT_AUTO)
    gpu_memory_limit: int = _setting(0, _at_least(0), size=True)
    max_jobs: int = _setting(0, _at_least(0))
    spare: bool = False
    # A job with no progress (no chunk) for this long gets its worker killed. 0: scale with
    # the text, 30 s + 0.2 s per character, at most job_timeout_max_s.
    job_timeout_s: float = _setting(0.0, _at_least(0))
    job_timeout_max_s: float = _setting(600.0, _at_least(1))
    kill_grace_s: float = _setting(5.0, _at_least(0.1))
    # Placement: per_device worker processes on each device ("cpu", "cuda:0", ...); each
    # sees only its own GPU. More workers serve more jobs at once (one segment each).
    # "auto" (the default, PER_DEVICE_AUTO here) is resolved when the Config is made
    # (`resolve_per_device`): Piper on a CPU-only host, one worker per core; else one.
    devices: list[str] = _setting(["cpu"], _devices)  # noqa: RUF009 - returns a field()
    per_device: int = _setting(PER_DEVICE_AUTO, _at_least(1), auto=PER_DEVICE_AUTO)

    @property
    def worker_count(self) -> int:
        """Worker processes that may hold a model at once: the slots, and the spare."""
        return len(self.devices) * self.per_device + (1 if self.spare else 0)


def resolve_per_device(worker: WorkerConfig, engine: str,
                       cores: Callable[[], int] = placement.usable_cores,
                       machine_bytes: Callable[[], int] = memory.machine_bytes) -> WorkerConfig:
    """`worker` with per_device "auto" replaced by its figure for this machine and engine."""
    if worker.per_device != PER_DEVICE_AUTO:
        return worker
    count = placement.auto_per_device(worker.devices, engine, cores(), machine_bytes())
    return replace(worker, per_device=count)


def resolve_rss_limit(worker: WorkerConfig, engine: str,
                      machine_bytes: Callable[[], int] = memory.machine_bytes) -> WorkerConfig:
    """`worker` with rss_limit "auto" replaced by its figure for this machine and engine."""
    if worker.rss_limit != RSS_LIMIT_AUTO:
        return worker
    limit = memory.auto_rss_limit(machine_bytes(), worker.worker_count, engine)
    return replace(worker, rss_limit=limit)


@dataclass(frozen=True)
class SchedulingConfig:
    # A streamed job's first segment ends at the first clause boundary after this many
    # words, so its first audio comes from a short synthesis; 0 keeps whole sentences.
    first_segment_words: int = _setting(5, _at_least(0))
    # A sentence longer than this is cut at clause boundaries.
    max_segment_chars: int = _setting(300, _at_least(20))
    # Consecutive short sentences share one segment up to this length (fewer engine calls).
    pack_segment_chars: int = _setting(120, _at_least(0))
    # Jobs of one class (interactive, bulk) in progress at once; the rest wait unstarted.
    max_active_jobs: int = _setting(8, _at_least(1))


@dataclass(frozen=True)
class ZmqConfig:
    bind: list[str] = _setting(["tcp://127.0.0.1:5555"])  # noqa: RUF009 - returns a field()
    curve: bool = False
    server_secret_key: str = _setting("", path=True)
    authorized_keys_dir: str = _setting("", path=True)
    allow_insecure: bool = False
    max_pending: int = _setting(256, _at_least(1))
    max_pending_per_client: int = _setting(16, _at_least(1))
    max_header_bytes: int = _setting(64 << 10, _at_least(1024), size=True)
    max_attachment_bytes: int = _setting(16 << 20, _at_least(1024), size=True)
    # A peer that connects and has not finished the ZMTP/CURVE handshake after this long is
    # dropped (set on the socket at start-up).
    handshake_timeout_s: float = _setting(10.0, _at_least(0.1))
    # Peers connected at once; over it, a new peer's handshake is refused (ZAP) and libzmq
    # closes its connection. Keep it well under the unit's LimitNOFILE=.
    max_connections: int = _setting(1024, _at_least(1))
    # Reply bytes made for one peer that it has not taken yet, at most (libzmq holds them in
    # the supervisor until the peer's socket takes them). Over it, a reply is dropped for a
    # `client_too_slow` error and its job cancelled, and `synthesize` gets `busy`. A single
    # reply bigger than this still goes when nothing else waits for that peer.
    max_buffered_bytes: int = _setting(64 << 20, _at_least(1 << 20), size=True)
    # A peer that sends nothing for this long and has no job in flight is disconnected
    # (0: never). libzmq clients reconnect by themselves; the new connection counts afresh.
    idle_timeout_s: float = _setting(300.0, _at_least(0))


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # "127.0.0.1:9464" turns the Prometheus endpoint on
    allow_remote: bool = False
    # A scraper's request must be whole this long after its first byte.
    header_timeout_s: float = _setting(10.0, _at_least(0.1))
    # A connection with no request in hand (fresh or kept alive) is closed after this.
    idle_timeout_s: float = _setting(30.0, _at_least(0.1))
    # Connections over this get 503 and are closed.
    max_connections: int = _setting(16, _at_least(1))


@dataclass(frozen=True)
class KeyConfig:
    """One API key's rights and limits: [http.keys.NAME], NAME as in http.api_keys_file
    ("NAME TOKEN" lines). Limits left out are http.rate_limit and http.chars_per_minute."""

    # An admin key sees and cancels every client's jobs (as a local cosyvoicectl does).
    admin: bool = False
    rate_limit: float | None = _setting(None, _at_least(0))
    chars_per_minute: float | None = _setting(None, _at_least(0))


@dataclass(frozen=True)
class HttpConfig:
    listen: str = ""  # "127.0.0.1:8000" turns the OpenAI-compatible speech endpoint on
    # One bearer token per line ('#' comments); needed for a listen address that is not
    # loopback, unless allow_insecure.
    api_keys_file: str = _setting("", path=True)
    allow_insecure: bool = False
    # Host names (besides IP addresses and localhost) a request may be sent to while there
    # are no keys: other names are refused as a DNS rebinding might be (intake/origins.py).
    allowed_hosts: list[str] = _setting([])  # noqa: RUF009 - returns a field()
    max_body_bytes: int = _setting(1 << 20, _at_least(1024), size=True)
    # A body that carries voice audio (a voice to register, a speech request's one-off
    # clone): 30 s of 48 kHz stereo WAV is 11 MiB.
    max_upload_bytes: int = _setting(16 << 20, _at_least(1024), size=True)
    max_pending_per_client: int = _setting(16, _at_least(1))
    # nginx's client limits. A request's line and headers must be whole this long after
    # its first byte (slowloris), and its body must be read within body_timeout_s (408).
    header_timeout_s: float = _setting(10.0, _at_least(0.1))
    body_timeout_s: float = _setting(30.0, _at_least(0.1))
    # A connection with no request in hand (fresh or kept alive) is closed after this.
    idle_timeout_s: float = _setting(30.0, _at_least(0.1))
    # A response write the client does not take within this closes the connection and
    # cancels its job.
    send_timeout_s: float = _setting(30.0, _at_least(0.1))
    # Connections over this get 503 at once and are closed; keep it well under the
    # process's file limit (the unit's LimitNOFILE=).
    max_connections: int = _setting(512, _at_least(1))
    # OpenAI voice names (alloy, echo, ...) -> ours.
    voices: dict[str, str] = field(default_factory=dict)
    # Per client (an API key; the client's address when there are no keys), 0 for none:
    # requests, and characters of input, per minute. Over it: 429 rate_limit_exceeded
    # with Retry-After. [http.keys.NAME] tables set them per key, and make a key an admin.
    rate_limit: float = _setting(0.0, _at_least(0))
    chars_per_minute: float = _setting(0.0, _at_least(0))
    keys: dict[str, KeyConfig] = field(default_factory=dict)
    # The web console at / (README: The web console), with the same keys as the API.
    console: bool = True


@dataclass(frozen=True)
class WyomingConfig:
    listen: str = ""  # "tcp://127.0.0.1:10200" turns the Wyoming server on
    # Wyoming has no authentication: a non-loopback address needs this.
    allow_remote: bool = False
    # A connection with no event for this long is closed (a satellite reconnects).
    idle_timeout_s: float = _setting(60.0, _at_least(1))
    # Once an event has begun, its header line, data and payload must all be in within this.
    read_timeout_s: float = _setting(10.0, _at_least(0.1))
    # Connections open at once; one more is refused (an `error`, then closed).
    max_connections: int = _setting(256, _at_least(1))
    # Requests one connection may have in flight (sentences of a streamed text count each).
    max_pending_per_client: int = _setting(16, _at_least(1))


@dataclass(frozen=True)
class CacheConfig:
    # Results of repeated requests, by content (text, voice, settings, model): systemd's
    # CacheDirectory=. Its contents may be deleted at any time; they are made again.
    dir: str = _setting("/var/cache/cosyvoiced", path=True)
    # Least recently used entries go first beyond this; 0 turns the cache off.
    max_bytes: int = _setting(512 << 20, _at_least(0), size=True)
    # false: a client's repeat is served from its own entries only (an API key's, a CURVE
    # key's, the anonymous clients', the drop folder's), so that no client learns from a hit,
    # or from its speed, what another asked for. true: one entry serves every client.
    across_clients: bool = False


HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a cluster host's name, whole


def _host_name(value: Any) -> str | None:
    if HOST_NAME.fullmatch(value):
        return None
    return f"expected letters, digits, '.', '-' or '_' (at most 64); got {value!r}"


@dataclass(frozen=True)
class ClusterConfig:
    # "redis://HOST:6379/0" (or rediss:// for TLS) shares one queue with every daemon on
    # that Redis; empty: a standalone daemon, no Redis needed.
    redis: str = ""
    # A file holding the Redis password (kept out of the URL and the config).
    password_file: str = _setting("", path=True)
    # This daemon's name among the others; unique per daemon. Empty: the host name.
    name: str = ""
    # Keys are "<prefix>:..."; a Redis ACL can limit the daemon's user to them.
    key_prefix: str = _setting("cosyvoiced", _host_name)
    # A job whose host stops answering for this long is taken over by another host.
    claim_idle_s: float = _setting(30.0, _at_least(2.0))
    # Outcomes waiting for a receiving host that is down are kept at most this long ...
    outcome_ttl_s: float = _setting(7 * 86400.0, _at_least(60.0))
    # ... and at most this many per receiving host (the oldest go first).
    max_outcomes: int = _setting(100_000, _at_least(100))


@dataclass(frozen=True)
class Config:
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    zmq: ZmqConfig = field(default_factory=ZmqConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    wyoming: WyomingConfig = field(default_factory=WyomingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        # Resolved here, where the engine and the worker count are known, so that every
        # Config (loaded, reloaded or a default) holds bytes; frozen, hence object.__setattr__.
        # per_device first: the auto rss_limit is split among the workers.
        worker = resolve_per_device(self.worker, self.engine.name)
        object.__setattr__(self, "worker", resolve_rss_limit(worker, self.engine.name))


def load(path: str | Path, *, validate: bool = True) -> Config:
    """Read, type-check and validate a config file. `validate` False (cosyvoicectl, run by
    any submitter): typed only, the secrets it names (keys, passwords, readable by the daemon
    alone) neither read nor looked for."""
    config_path = Path(path)
    try:
        with config_path.open("rb") as stream:
            table = tomllib.load(stream)
    except OSError as error:
        raise ConfigError(f"{config_path}: cannot read: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{config_path}: not valid TOML: {error}") from error
    base_dir = config_path.resolve().parent
    if not validate:
        typed: Config = _build(Config, table, "", base_dir)
        return typed
    return from_table(table, base_dir=base_dir)


def from_table(table: dict[str, Any], base_dir: Path) -> Config:
    config: Config = _build(Config, table, "", base_dir)
    _check_engine(config.engine)
    _check_zmq(config.zmq)
    _check_metrics(config.metrics)
    _check_http(config.http)
    _check_wyoming(config.wyoming)
    _check_cluster(config.cluster)
    if config.worker.heartbeat_timeout_s <= 2 * config.worker.heartbeat_interval_s:
        raise ConfigError("worker.heartbeat_timeout_s: must be more than twice "
                          "worker.heartbeat_interval_s")
    return config


_LOOPBACK_HOSTS = ("localhost", "lo", "::1", "[::1]")


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc:// and inproc:// endpoints and tcp:// binds on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0]
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def _check_metrics(settings: MetricsConfig) -> None:
    if not settings.listen:
        return
    host, _, port = settings.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics.listen: expected HOST:PORT such as \"127.0.0.1:9464\"; "
                          f"got {settings.listen!r}")
    if not settings.allow_remote and not is_loopback_endpoint(f"tcp://{settings.listen}"):
        raise ConfigError(f"metrics.listen: {settings.listen!r} is not loopback; metrics are "
                          "unauthenticated: keep them on 127.0.0.1 or set "
                          "metrics.allow_remote = true")


def read_api_keys(path: str) -> dict[str, str]:
    """The bearer tokens in an api_keys_file, each with its name: one key per line, "NAME
    TOKEN" or a bare TOKEN (named key-<digest>, never by the secret); blank lines and '#'
    comments are skipped. Raises OSError if the file cannot be read."""
    keys: dict[str, str] = {}
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            fields = line.split("#", 1)[0].split()
            if len(fields) == 1:
                token = fields[0]
                keys[token] = "key-" + hashlib.sha256(token.encode()).hexdigest()[:8]
            elif len(fields) == 2:
                keys[fields[1]] = fields[0]
    return keys


def _check_http(settings: HttpConfig) -> None:
    if not settings.listen:
        return
    host, _, port = settings.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"http.listen: expected HOST:PORT such as \"127.0.0.1:8000\"; "
                          f"got {settings.listen!r}")
    if settings.keys and not settings.api_keys_file:
        raise ConfigError(f"http.keys.{sorted(settings.keys)[0]}: keys are named in "
                          "http.api_keys_file, which is not set")
    if settings.api_keys_file:
        try:
            keys = read_api_keys(settings.api_keys_file)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"http.api_keys_file: cannot read {settings.api_keys_file!r}: "
                              f"{getattr(error, 'strerror', None) or error}") from None
        if not keys:
            raise ConfigError(f"http.api_keys_file: {settings.api_keys_file!r} holds no key "
                              "(one per line)")
        unknown = sorted(set(settings.keys) - set(keys.values()))
        if unknown:
            raise ConfigError(f"http.keys.{unknown[0]}: no key of that name in "
                              f"http.api_keys_file (lines \"NAME TOKEN\")")
    elif not settings.allow_insecure and not is_loopback_endpoint(f"tcp://{settings.listen}"):
        raise ConfigError(
            f"http.listen: {settings.listen!r} is reachable from the network but "
            "http.api_keys_file is not set; give clients bearer tokens in http.api_keys_file "
            "or, on a trusted network only, set http.allow_insecure = true")


def _check_wyoming(settings: WyomingConfig) -> None:
    if not settings.listen:
        return
    scheme, _, rest = settings.listen.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme == "unix" and rest:
        return
    if scheme != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"wyoming.listen: expected tcp://HOST:PORT such as "
                          f"\"tcp://127.0.0.1:10200\", or unix://PATH; got {settings.listen!r}")
    if not settings.allow_remote and not is_loopback_endpoint(settings.listen):
        raise ConfigError(f"wyoming.listen: {settings.listen!r} is not loopback; the Wyoming "
                          "protocol has no authentication: set wyoming.allow_remote = true "
                          "to serve Home Assistant on another host (trusted networks only)")


def _check_cluster(settings: ClusterConfig) -> None:
    if not settings.redis:
        return
    scheme = settings.redis.partition("://")[0]
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"cluster.redis: expected redis://HOST:PORT/DB, rediss://... (TLS) "
                          f"or unix://PATH; got a {scheme!r} URL")
    if settings.name and _host_name(settings.name):
        raise ConfigError(f"cluster.name: {_host_name(settings.name)}")
    if settings.password_file:
        try:
            read_password(settings.password_file)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cluster.password_file: cannot read "
                              f"{settings.password_file!r}: "
                              f"{getattr(error, 'strerror', None) or error}") from None


def read_password(path: str) -> str:
    """The first line of a password file, without its line end."""
    with open(path, encoding="utf-8") as stream:
        return stream.readline().rstrip("\r\n")


def _check_zmq(settings: ZmqConfig) -> None:
    for endpoint in settings.bind:
        scheme = endpoint.partition("://")[0]
        if scheme not in ("tcp", "ipc") or "://" not in endpoint:
            raise ConfigError(f"zmq.bind: {endpoint!r} is not a tcp:// or ipc:// endpoint")
        if not (settings.curve or settings.allow_insecure or is_loopback_endpoint(endpoint)):
            raise ConfigError(
                f"zmq.bind: {endpoint!r} is reachable from the network but zmq.curve is off; "
                "turn on zmq.curve (with zmq.server_secret_key and zmq.authorized_keys_dir) "
                "or, on a trusted network only, set zmq.allow_insecure = true")
    if settings.curve:
        if not Path(settings.server_secret_key).is_file():
            raise ConfigError("zmq.server_secret_key: zmq.curve needs the server's secret "
                              f"key file; {settings.server_secret_key!r} is not a file "
                              "(create one with `cosyvoicectl keygen DIR`)")
        if not Path(settings.authorized_keys_dir).is_dir():
            raise ConfigError("zmq.authorized_keys_dir: zmq.curve needs a directory of "
                              "authorized client public keys; "
                              f"{settings.authorized_keys_dir!r} is not a directory")


_PLUGIN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _check_engine(engine: EngineConfig) -> None:
    engines = available_engines()
    # "package.module:loader" names an engine that is not installed as an entry point; it is
    # imported in the worker only, never here.
    if engine.name not in engines and not _PLUGIN.match(engine.name):
        raise ConfigError(f"engine.name: unknown engine {engine.name!r}; "
                          f"available: {', '.join(engines)} (or a module:loader reference)")
    if engine.name == "cosyvoice":
        _check_cosyvoice(engine.cosyvoice)
    for voice in engine.piper.voices:
        if not voice.endswith(".onnx"):
            raise ConfigError(f"engine.piper.voices: {voice!r} is not an .onnx voice file")
        for needed in (Path(voice), Path(voice + ".json")):
            if not needed.is_file():
                raise ConfigError(f"engine.piper.voices: {str(needed)!r} does not exist")


def _check_cosyvoice(settings: CosyVoiceConfig) -> None:
    # Checked here because upstream would take a missing directory for a model hub name
    # and try to download it.
    model_dir = Path(settings.model_dir)
    if not settings.model_dir or not model_dir.is_dir():
        raise ConfigError("engine.cosyvoice.model_dir: the cosyvoice engine needs a model "
                          f"directory; {settings.model_dir!r} is not a directory")
    if not any((model_dir / name).is_file() for name in COSYVOICE_MODEL_FILES):
        raise ConfigError(f"engine.cosyvoice.model_dir: {settings.model_dir!r} has none of "
                          f"{', '.join(COSYVOICE_MODEL_FILES)}: not a CosyVoice model")
    if settings.repo and not (Path(settings.repo) / "cosyvoice" / "cli").is_dir():
        raise ConfigError(f"engine.cosyvoice.repo: {settings.repo!r} is not a CosyVoice "
                          "checkout (no cosyvoice/cli/ in it)")


def _build(cls: type, table: Any, prefix: str, base_dir: Path) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table")
    known = {spec.name: spec for spec in fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key")
    hints = get_type_hints(cls)
    values = {}
    for name, value in table.items():
        key, spec, hint = prefix + name, known[name], hints[name]
        if isinstance(hint, type) and is_dataclass(hint):
            values[name] = _build(hint, value, key + ".", base_dir)
        else:
            values[name] = _value(key, value, hint, spec.metadata, base_dir)
    return cls(**values)


def _value(key: str, value: Any, hint: Any, meta: Any, base_dir: Path) -> Any:
    if value == "auto" and meta.get("auto") is not None:
        return meta["auto"]
    if meta.get("size"):
        try:
            value = parse_size(value)
        except ValueError as error:
            also = ' or "auto"' if meta.get("auto") is not None else ""
            raise ConfigError(f"{key}: {error}{also}") from None
    value = _typed(key, value, hint)
    if meta.get("path"):
        value = _resolve(value, base_dir)
    check = meta.get("check")
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{key}: {problem}")
    return value


def _typed(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list; got {type(value).__name__}")
        return [_typed(f"{key}[{index}]", entry, item) for index, entry in enumerate(value)]
    if origin is dict:
        key_type, item = get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table; got {type(value).__name__}")
        return {_typed(f"{key}.{name}", name, key_type): _typed(f"{key}.{name}", entry, item)
                for name, entry in value.items()}
    if isinstance(hint, type) and is_dataclass(hint):  # a table of tables: [a.b.NAME]
        return _build(hint, value, key + ".", Path("."))
    if origin in (Union, types.UnionType):
        # `X | None`: TOML has no null, so a present key is always an X.
        (present,) = [arg for arg in get_args(hint) if arg is not type(None)]
        return _typed(key, value, present)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}; got {type(value).__name__} "
                          f"{value!r}")
    return value


def _resolve(value: Any, base_dir: Path) -> Any:
    if isinstance(value, list):
        return [_resolve(item, base_dir) for item in value]
    if value == "":
        return value
    return str((base_dir / Path(value).expanduser()).resolve())
