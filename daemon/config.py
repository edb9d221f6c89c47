"""All of locod's configuration: one TOML file, ``LOCOD_*`` environment overrides, then CLI overrides.

The dataclasses below are the schema. ``load_config`` checks every key against them, so an unknown key, a
wrong type or an out-of-range value is an error that names the file, the key and what was expected.
docs/configuration.md documents each key; ``locod config show`` prints the effective result.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import zmq

from locod.daemon.regular_file import read_regular
from locod.daemon.typed_toml import (
    build_table,
    in_range,
    one_of,
    read_toml,
    separated_by,
    set_text,
    tomllib,
)
from locod.errors import ConfigError
from locod.protocol import NO_CONFIG_FILE, port_number, tcp_host_port, unbracketed, zmq_address
from locod.words import closest, quoted

# The most a routing weight, V, the queue's cap, a price or an energy figure may be: beyond, products of them
# overflow the router's arithmetic (inf, then NaN costs in every decision and its record) while meaning no more
# than a million does, as costs are normalised over the dearest action.
MOST = 1e6
LEAST_V = 1e-3  # MESS+'s V: the price of satisfaction divides by it
DEFAULT_KEY_ENV = "LOCOD_CLOUD_API_KEY"  # a cloud model's api_key_env unless its entry names another


@dataclass(frozen=True)
class LocalModelConfig:
    """One GGUF model the daemon may run. ``path`` is absolute or relative to ``paths.models_dir``."""

    name: str
    path: str
    # None: use the chat template stored in the GGUF itself.
    chat_format: str | None = None
    n_ctx: int = field(default=2048, metadata=in_range(128, 1 << 20))
    n_gpu_layers: int = field(default=0, metadata=in_range(-1, 10_000))
    # Joules per generated token when no power sensor is available; used for energy accounting.
    joules_per_token: float = field(default=0.05, metadata=in_range(0, MOST))


@dataclass(frozen=True)
class CloudModelConfig:
    """One model behind an OpenAI-compatible endpoint, with its prices (USD)."""

    name: str
    base_url: str
    model: str
    api_key_env: str = DEFAULT_KEY_ENV
    api_key_file: str = ""
    # False: the endpoint takes no key (a llama.cpp server on loopback): none is read, sent or warned about.
    needs_key: bool = True
    usd_per_mtok_in: float = field(default=0.15, metadata=in_range(0, MOST))
    usd_per_mtok_out: float = field(default=0.60, metadata=in_range(0, MOST))
    usd_per_image: float = field(default=0.0, metadata=in_range(0, MOST))
    vision: bool = True
    context_tokens: int = field(default=0, metadata=in_range(0))  # 0: unknown, never masked for length
    # The request field for the answer's length: OpenAI's reasoning models (o-series, gpt-5) refuse max_tokens.
    max_tokens_param: str = field(default="max_tokens", metadata=one_of("max_tokens", "max_completion_tokens"))
    sampling: bool = True  # send the turn's temperature, seed, top_p, penalties; false: a model takes only its own

    def price(self, tokens_in: int, tokens_out: int, images: int) -> float:
        """USD for one call."""
        tokens = tokens_in * self.usd_per_mtok_in + tokens_out * self.usd_per_mtok_out
        return tokens / 1e6 + images * self.usd_per_image


@dataclass(frozen=True)
class DaemonConfig:
    # Keys earlier versions had, and what became of them (typed_toml names them so in an old config file).
    retired_keys: ClassVar[Mapping[str, str]] = {
        "cloud_workers": "it never did anything (cloud calls run on the turn pool); remove it",
        "watchdog_stall_s": "it never did anything (the watchdog pings from the serving loop, which a hang "
        "stops); remove it",
    }
    # Extra loopback endpoint, e.g. "tcp://127.0.0.1:5557"; the ipc socket is always bound.
    tcp: str = ""
    # Shared secret required from tcp clients (ignored on the ipc socket, which is protected by file modes).
    tcp_secret_file: str = ""
    # Connections the tcp endpoint holds at once (never over a quarter of the open-file limit), and from one
    # peer address: each holds a descriptor before its secret is read (tcpguard.py). A newcomer over either
    # takes the slot of the oldest connection that has not passed the secret, else it is closed at once.
    max_tcp_connections: int = field(default=64, metadata=in_range(1, 1 << 20))
    max_tcp_per_host: int = field(default=16, metadata=in_range(1, 1 << 20))
    max_message_bytes: int = field(default=32 << 20, metadata=in_range(1024, 1 << 30))
    # Characters of a chat's messages together: past this it is refused before any work on its text (task
    # rules, relevance, features and tokenising cost about a second per megabyte, holding the GIL).
    max_prompt_chars: int = field(default=1_000_000, metadata=in_range(1))
    session_idle_s: float = field(default=1800.0, metadata=in_range(1))
    # Characters of history a session keeps (oldest dropped first): bounds its memory and a cloud turn's upload.
    max_history_chars: int = field(default=100_000, metadata=in_range(1))
    max_sessions: int = field(default=1000, metadata=in_range(1))
    queue_limit: int = field(default=256, metadata=in_range(1))
    # One client's turns in flight: no client can hold every worker (of queue_limit) by itself.
    max_turns_per_client: int = field(default=32, metadata=in_range(1))
    # Replies waiting for one client that reads slowly; past this it is dropped and its turns cancelled.
    max_queued_bytes: int = field(default=16 << 20, metadata=in_range(1 << 16, 1 << 34))
    shutdown_grace_s: float = field(default=20.0, metadata=in_range(0))


@dataclass(frozen=True)
class HttpConfig:
    # The OpenAI-compatible HTTP API (docs/http.md), e.g. "127.0.0.1:8080"; empty: off. Needs locod[http].
    listen: str = ""
    # Bearer key every HTTP request must carry; required for an address beyond loopback. Owner-only file.
    api_key_file: str = ""
    # Conversations the HTTP API remembers to map a client's whole history onto a daemon session.
    max_conversations: int = field(default=1000, metadata=in_range(1))
    # Connections open at once: each holds a descriptor before its key is read (never over half the
    # process's open-file limit, see fdlimit.py). A newcomer over it takes the slot of one slow to send its
    # request or idle between requests (httpconn.py), else it is answered 503 and closed.
    max_connections: int = field(default=128, metadata=in_range(1, 1 << 20))
    # Seconds a client has to send a whole request, headers and body: a slow one is closed.
    request_timeout_s: float = field(default=30.0, metadata=in_range(0.1, 3600))
    # Web pages (origins, "http://localhost:3000") allowed to call the API from a browser (CORS); as text
    # (--set), comma-separated: an origin holds colons.
    cors_origins: list[str] = field(default_factory=list, metadata=separated_by(","))


@dataclass(frozen=True)
class PathsConfig:
    state_dir: str = ""
    runtime_dir: str = ""
    models_dir: str = ""
    # Directories under which the daemon may open a path named by a client (instead of receiving bytes).
    allow_dirs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="INFO", metadata=one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    # Store prompt text in the decision log; off by default (a hash and the length are stored instead).
    prompts: bool = False


# The model shipped with locod (models/manifest.toml): the default local model.
EMBEDDED_MODEL = LocalModelConfig(name="smollm2-135m-instruct", path="SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(frozen=True)
class LocalConfig:
    default: str = EMBEDDED_MODEL.name
    memory_budget_mb: int = field(default=4096, metadata=in_range(64))
    n_threads: int = field(default=0, metadata=in_range(0, 1024))
    max_tokens: int = field(default=256, metadata=in_range(1, 1 << 20))
    # Dialogue KV states kept between turns, in MiB, inside memory_budget_mb: -1 sizes it from the model and
    # the free memory, 0 turns it off.
    cache_mb: int = field(default=-1, metadata=in_range(-1, 1 << 20))
    # Evicted dialogue states parked under state_dir/kvcache, in MiB; 0: none.
    cache_disk_mb: int = field(default=0, metadata=in_range(0, 1 << 24))
    models: list[LocalModelConfig] = field(default_factory=list)
    # Where `locod models pull hf://...` downloads from; empty: $HF_ENDPOINT, else the Hugging Face hub.
    hub_endpoint: str = ""


@dataclass(frozen=True)
class CloudConfig:
    default: str = ""
    timeout_s: float = field(default=30.0, metadata=in_range(0.1, 3600))
    # A cloud call's whole life (retries, waiting and streaming), however the server trickles its bytes.
    deadline_s: float = field(default=300.0, metadata=in_range(1.0, 86400))
    # Bytes one answer's response may take, and one event (line) of it.
    max_answer_bytes: int = field(default=16 << 20, metadata=in_range(4096))
    max_event_bytes: int = field(default=1 << 20, metadata=in_range(1024))
    max_retries: int = field(default=2, metadata=in_range(0, 10))
    max_retry_after_s: float = field(default=10.0, metadata=in_range(0, 3600))
    daily_cap_usd: float = field(default=0.0, metadata=in_range(0))
    breaker_failures: int = field(default=3, metadata=in_range(1))
    breaker_cooldown_s: float = field(default=60.0, metadata=in_range(0))
    models: list[CloudModelConfig] = field(default_factory=list)


@dataclass(frozen=True)
class AttachmentsConfig:
    # Bytes of one file, at most a GiB, as a request's frame (daemon.max_message_bytes): a file is read whole, up
    # to this, so a limit past the memory ended `locod ask --attach` in a MemoryError, even for a small file.
    max_bytes: int = field(default=20 << 20, metadata=in_range(1, 1 << 30))
    max_count: int = field(default=8, metadata=in_range(0, 64))
    image_max_side: int = field(default=1024, metadata=in_range(32, 16384))
    image_max_pixels: int = field(default=100_000_000, metadata=in_range(1))
    image_jpeg_bytes: int = field(default=300_000, metadata=in_range(1000))
    # Memory every turn's image decodes share (a small file can decode to hundreds of MB); larger ones are refused.
    decode_mb: int = field(default=1024, metadata=in_range(16))
    doc_chunk_chars: int = field(default=1200, metadata=in_range(100))
    doc_token_budget: int = field(default=1500, metadata=in_range(0))


@dataclass(frozen=True)
class RoutingConfig:
    # "auto": the policy decides; "local"/"cloud": every turn goes there unless the request forces otherwise.
    mode: str = field(default="auto", metadata=one_of("auto", "local", "cloud"))
    sla: float = field(default=0.8, metadata=in_range(0.0, 1.0))
    # Above 0: at 0 every action's objective was 0, so each turn went to whichever action was listed first; at
    # a tiny V the queue's price (Z / V) overflowed to inf.
    v: float = field(default=20.0, metadata=in_range(LEAST_V, MOST))
    explore_c: float = field(default=0.2, metadata=in_range(0.0))
    q_cap: float = field(default=50.0, metadata=in_range(0.0, MOST))
    weight_money: float = field(default=1.0, metadata=in_range(0.0, MOST))
    weight_energy: float = field(default=0.2, metadata=in_range(0.0, MOST))
    weight_policy: float = field(default=0.5, metadata=in_range(0.0, MOST))
    policy_path: str = ""
    battery_critical_pct: float = field(default=10.0, metadata=in_range(0.0, 100.0))
    judge: bool = False
    # Shadow answers (daemon/shadow.py): "ac" only while on mains power (or no battery), "always", "off".
    shadow: str = field(default="ac", metadata=one_of("off", "ac", "always"))
    # Answer locally, escalate if unsure: the local model answers first and its answer is judged by its own
    # confidence over its first escalate_tokens tokens (held back until then) before anything is shown.
    escalate: bool = True
    escalate_tokens: int = field(default=32, metadata=in_range(1, 4096))


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = field(default=1.0, metadata=in_range(0.05, 3600))
    probe_interval_s: float = field(default=30.0, metadata=in_range(1, 86400))
    sysfs_root: str = "/sys"
    procfs_root: str = "/proc"
    # Read a discrete NVIDIA GPU through NVML (the gpu extra). NVML is not under sysfs_root, so trees that
    # stand for another device turn it off.
    nvml: bool = True
    # Prior for upload bandwidth before any real upload was measured (bytes/s): a modest WiFi uplink.
    bandwidth_prior_bps: float = field(default=2_000_000.0, metadata=in_range(1))


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    attachments: AttachmentsConfig = field(default_factory=AttachmentsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    # Where the values came from, for `locod config show` and error messages.
    source: str = field(default=NO_CONFIG_FILE, compare=False)

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.paths.runtime_dir)

    @property
    def models_dir(self) -> Path:
        return Path(self.paths.models_dir)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "locod.db"

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "locod.sock"

    @property
    def ipc_endpoint(self) -> str:
        return f"ipc://{self.socket_path}"

    @property
    def ipc_address(self) -> bytes:
        """The ipc endpoint as ZeroMQ binds it (``zmq_address``), in the bytes its directory was made with."""
        return zmq_address(self.ipc_endpoint)

    def local_model(self, name: str) -> LocalModelConfig:
        return _named(self.local.models, name, "local")

    def cloud_model(self, name: str) -> CloudModelConfig:
        return _named(self.cloud.models, name, "cloud")


ModelConfig = TypeVar("ModelConfig", LocalModelConfig, CloudModelConfig)


def _named(models: list[ModelConfig], name: str, kind: str) -> ModelConfig:
    """The ``kind`` model called ``name``; a ConfigError naming the configured ones when none is."""
    for model in models:
        if model.name == name:
            return model
    raise ConfigError(f"no {kind} model named {name!r}; configured: {[m.name for m in models]}")


# Environment overrides: variable -> dotted key. Documented in docs/configuration.md.
ENV_OVERRIDES: dict[str, str] = {
    "LOCOD_STATE_DIR": "paths.state_dir",
    "LOCOD_RUNTIME_DIR": "paths.runtime_dir",
    "LOCOD_MODELS_DIR": "paths.models_dir",
    "LOCOD_LOG_LEVEL": "log.level",
    "LOCOD_LOG_PROMPTS": "log.prompts",
    "LOCOD_TCP": "daemon.tcp",
    "LOCOD_HTTP": "http.listen",
    "LOCOD_ROUTING": "routing.mode",
    "LOCOD_SLA": "routing.sla",
    "LOCOD_LOCAL_MODEL": "local.default",
    "LOCOD_CLOUD_MODEL": "cloud.default",
    "LOCOD_DAILY_CAP_USD": "cloud.daily_cap_usd",
    "LOCOD_POLICY": "routing.policy_path",
    "LOCOD_HUB_ENDPOINT": "local.hub_endpoint",
}

MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; read on the serving loop at reload, so never unbounded
# Local models (pulled ones included), and cloud models, each: every model is a MESS+ predictor of 32 kB in the
# router's state, saved after each turn. 22,000 entries fit in MAX_CONFIG_BYTES and made that file 725 MB.
MAX_MODELS = 128
# The model an OpenAI client names to have locod route the turn (docs/http.md): no configured model may take
# it, or that model could not be named over HTTP and /v1/models would list the name twice.
ROUTED_MODEL = "auto"
# How a GGUF on disk becomes a model: said where a model is named by its file's path instead (and by `pull`).
NAME_A_GGUF = (
    'name it in the config, [[local.models]] name = "...", path = "/its/path.gguf" (docs/configuration.md), '
    "then `locod reload`"
)


def gguf_path_hint(name: str) -> str:
    """The words to add where a model was named by a GGUF file's path (``--model ~/models/x.gguf``, the HTTP
    ``model``, ``local.default``): models are named, their files given in the config; "" for another name."""
    return f"; a GGUF file is not a model's name: {NAME_A_GGUF}" if name.lower().endswith(".gguf") else ""


# Keys naming one file or folder (besides the lists and the key files): ``~`` expanded, a relative one refused.
PATH_KEYS = (
    "paths.state_dir",
    "paths.runtime_dir",
    "paths.models_dir",
    "routing.policy_path",
    "telemetry.sysfs_root",
    "telemetry.procfs_root",
)
ROOT_KEYS = ("telemetry.sysfs_root", "telemetry.procfs_root")  # of PATH_KEYS, those with no empty default
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")  # what api_key_env may hold: a variable's name


def find_config_file(env: Mapping[str, str]) -> Path | None:
    """The first config file that exists: $LOCOD_CONFIG, $XDG_CONFIG_HOME/locod, /etc/locod."""
    if env.get("LOCOD_CONFIG"):
        path = Path(env["LOCOD_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"$LOCOD_CONFIG names {path}, which is not a file")
        return path
    xdg = xdg_dir(env, "XDG_CONFIG_HOME", Path.home() / ".config")
    for candidate in (xdg / "locod" / "config.toml", Path("/etc/locod/config.toml")):
        if candidate.is_file():
            return candidate
    return None


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Read ``path`` (or the first default file), apply env then ``overrides`` ("section.key" -> text)."""
    env = os.environ if env is None else env
    file = Path(path) if path is not None else find_config_file(env)
    table: dict[str, Any] = {}
    source = NO_CONFIG_FILE
    if file is not None:
        # absolute: a client in another folder compares the file it names with this one (reload's note)
        source = str(file.absolute())
        try:
            table = read_toml(file, MAX_CONFIG_BYTES)
        except FileNotFoundError:
            raise ConfigError(f"{file}: no such config file") from None
    origins: dict[str, str] = {}  # key -> where its value came from, when not the file
    given = [(key, env[var], f"${var}") for var, key in ENV_OVERRIDES.items() if env.get(var, "") != ""]
    given += [(key, text, f"override {key}") for key, text in (overrides or {}).items()]
    for key, text, origin in given:  # in order: an override wins over the environment
        set_text(Config, table, key, text, origin)
        origins[key] = origin
    config = build_table(Config, table, source, "")
    _check_names(config, source)
    config = _with_defaults(_expanded_paths(dataclasses.replace(config, source=source), origins), env)
    _check_models(config, origins)
    _check_cache(config, origins)
    _check_secrets(config, origins)
    _check_endpoints(config, origins)
    _check_socket_path(config, origins)
    _warn_unknown_variables(env, config)
    return config


def parsed_override(dotted: str, text: str, origin: str) -> Any:
    """The value ``text`` stands for at ``dotted`` (``LOCOD_SLA=0.9`` -> 0.9), checked as an override is."""
    table: dict[str, Any] = {}
    set_text(Config, table, dotted, text, origin)
    value: Any = table
    for part in dotted.split("."):
        value = value[part]
    return value


def xdg_dir(env: Mapping[str, str], name: str, fallback: Path) -> Path:
    """``$name`` when it holds an absolute path, else ``fallback``. The XDG Base Directory spec has a relative
    value ignored: taken, it put the state and the socket wherever the daemon happened to start, where a
    client started elsewhere never found them."""
    value = env.get(name, "")
    return Path(value) if os.path.isabs(value) else fallback


def default_runtime_dir(env: Mapping[str, str]) -> str:
    """Where the socket lives when no config says: LOCOD_RUNTIME_DIR, systemd's RuntimeDirectory, then
    $XDG_RUNTIME_DIR/locod. A client uses it when the config file itself cannot be read."""
    return (
        os.path.expanduser(env.get("LOCOD_RUNTIME_DIR", ""))
        or env.get("RUNTIME_DIRECTORY", "").split(":")[0]
        or str(xdg_dir(env, "XDG_RUNTIME_DIR", Path(f"/tmp/locod-{os.getuid()}")) / "locod")
    )


def runtime_dir_leniently(path: Path | None, env: Mapping[str, str], overrides: Mapping[str, str]) -> str:
    """Where the socket is, for a client whose config file does not load (a syntax error elsewhere in it,
    a value out of range): ``paths.runtime_dir`` from an override, $LOCOD_RUNTIME_DIR, or that one line of
    the file read on its own; else the default place."""
    if overrides.get("paths.runtime_dir"):
        return os.path.expanduser(overrides["paths.runtime_dir"])
    if env.get("LOCOD_RUNTIME_DIR") or path is None:
        return default_runtime_dir(env)
    try:
        text = read_regular(path, MAX_CONFIG_BYTES).decode("utf-8", "replace")
    except OSError:
        return default_runtime_dir(env)
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and not line.startswith("[["):
            section = line[1 : line.find("]")].strip() if "]" in line else ""
            continue
        key = line.split("=", 1)[0].strip() if "=" in line else ""
        if (section, key) in (("paths", "runtime_dir"), ("", "paths.runtime_dir")):
            try:
                table = tomllib.loads(line)
            except ValueError:
                break
            value = table.get("runtime_dir") or table.get("paths", {}).get("runtime_dir")
            if isinstance(value, str) and value:
                return os.path.expanduser(value)
            break
    return default_runtime_dir(env)


def _expanded_paths(config: Config, origins: Mapping[str, str]) -> Config:
    """The files and folders the config names (``PATH_KEYS``, ``paths.allow_dirs``) with ``~`` expanded, as a
    shell would: taken as written, ``~/locod`` made a folder named ``~`` in whatever directory the daemon
    started in, and ``~/policy.onnx`` or ``~/sys`` were never found (MESS+ alone, no battery read). A relative
    one is refused: the daemon and every command (each started elsewhere) would look in different places."""
    written = [(key, _at(config, key)) for key in PATH_KEYS]
    written += [("paths.allow_dirs", directory) for directory in config.paths.allow_dirs]
    for key, value in written:
        if (value and os.path.isabs(os.path.expanduser(value))) or (not value and key not in ROOT_KEYS):
            continue  # ~name of no user stays relative; an empty key other than a root is unset
        shown, why = (
            (quoted(value), "a relative one would depend on the directory each command and the daemon start in")
            if value
            else ('""', "the root the device is read under: empty, it read the directory the daemon started in")
        )
        raise ConfigError(
            f"{origins.get(key, config.source)}: {key} must be an absolute path or begin with ~/, got {shown} ({why})"
        )
    allow_dirs = [os.path.expanduser(directory) for directory in config.paths.allow_dirs]
    sections: dict[str, dict[str, Any]] = {"paths": {"allow_dirs": allow_dirs}}
    for key, value in written[: len(PATH_KEYS)]:
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = os.path.expanduser(value)
    expanded = {section: dataclasses.replace(getattr(config, section), **keys) for section, keys in sections.items()}
    return dataclasses.replace(config, **expanded)


def _at(config: Config, dotted: str) -> Any:
    """The value of ``section.key`` in ``config``."""
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def _check_names(config: Config, source: str) -> None:
    """Every model of the file has a name: an empty (or blank) one was served as a model that no client,
    ``--model`` or ``local.default`` can name clearly (``serving ... with local model`` and nothing after);
    and every cloud model the endpoint's id for it."""
    local_names, cloud_names = [m.name for m in config.local.models], [m.name for m in config.cloud.models]
    for key, names in (("local.models", local_names), ("cloud.models", cloud_names)):
        for index, name in enumerate(names):
            if not name.strip():
                raise ConfigError(
                    f"{source}: {key}[{index}].name must not be empty: it is how clients and the defaults name it"
                )
    for index, model in enumerate(config.cloud.models):
        if not model.model.strip():  # sent as "", the endpoint refused every turn, each falling back to local
            raise ConfigError(
                f"{source}: cloud.models[{index}].model must not be empty: it is the model id the endpoint is asked "
                "for (e.g. gpt-4o-mini)"
            )


def _with_defaults(config: Config, env: Mapping[str, str]) -> Config:
    """Fill in what the file may leave unset and depends on the machine: directories (XDG or systemd's), the
    embedded and the pulled models, the hub and the cloud default, so that the checks see what will run."""
    home = Path.home()
    state = (
        config.paths.state_dir
        or env.get("STATE_DIRECTORY", "").split(":")[0]
        or str(xdg_dir(env, "XDG_STATE_HOME", home / ".local/state") / "locod")
    )
    runtime = config.paths.runtime_dir or default_runtime_dir(env)
    models = config.paths.models_dir or str(xdg_dir(env, "XDG_DATA_HOME", home / ".local/share") / "locod/models")
    local_models = list(config.local.models)
    if not any(m.name == EMBEDDED_MODEL.name for m in local_models):
        local_models.insert(0, EMBEDDED_MODEL)
    local_models += [m for m in _pulled(Path(models)) if not any(c.name == m.name for c in local_models)]
    hub = config.local.hub_endpoint or env.get("HF_ENDPOINT") or "https://huggingface.co"
    cloud_default = config.cloud.default or (config.cloud.models[0].name if config.cloud.models else "")
    return dataclasses.replace(
        config,
        paths=dataclasses.replace(config.paths, state_dir=state, runtime_dir=runtime, models_dir=models),
        local=dataclasses.replace(config.local, models=local_models, hub_endpoint=hub.rstrip("/")),
        cloud=dataclasses.replace(config.cloud, default=cloud_default),
    )


# LOCOD_* variables read elsewhere: the config file's place, the default key and the client's tcp secret;
# then those of the scripts and tests (scripts/test.sh's venv, tests/conftest.py's models), accepted but
# not offered.
OTHER_VARIABLES = ("LOCOD_CONFIG", "LOCOD_CLOUD_API_KEY", "LOCOD_SECRET")
TOOLING_VARIABLES = ("LOCOD_VENV", "LOCOD_TEST_MODELS_DIR")
_warned: set[str] = set()


def _warn_unknown_variables(env: Mapping[str, str], config: Config) -> None:
    """One warning per process for a ``LOCOD_*`` variable nothing reads (``LOCOD_SLAA``): a misspelt
    override is otherwise silently ignored."""
    known = {*ENV_OVERRIDES, *OTHER_VARIABLES, *(m.api_key_env for m in config.cloud.models)}
    unknown = sorted(v for v in env if v.startswith("LOCOD_") and v not in {*known, *TOOLING_VARIABLES, *_warned})
    if unknown:
        _warned.update(unknown)
        said = [f"{name} (did you mean {meant}?)" if (meant := closest(name, known)) else name for name in unknown]
        logging.getLogger(__name__).warning(
            "ignoring unknown environment variable(s) %s; known: %s", ", ".join(said), ", ".join(sorted(known))
        )


def _pulled(models_dir: Path) -> list[LocalModelConfig]:
    """The models ``locod models pull`` registered; the catalog checks its entries with this module's rules,
    so it is imported here rather than at the top. One a locod of before ``ROUTED_MODEL`` was refused pulled
    under that name is left out, with a warning: refused as a configured one is, it stopped every start and
    every command that reads the config, ``locod models rm`` that would remove it among them."""
    from locod.daemon.catalog import manifest_path, pulled_models

    pulled = pulled_models(models_dir)
    if any(m.name == ROUTED_MODEL for m in pulled):
        _left_out_routed(manifest_path(models_dir))
    return [m.as_local() for m in pulled if m.name != ROUTED_MODEL]


@functools.cache
def _left_out_routed(manifest: Path) -> None:
    """Say once a process (a command reads the config more than once) why the model pulled as ``auto`` is
    left out, and what to do."""
    name = ROUTED_MODEL
    logging.getLogger(__name__).warning(
        f"%s: the model pulled as {name!r} is left out: an OpenAI client's model {name!r} asks locod to route the "
        f'turn; rename it there (its line name = "{name}"), then `locod reload`, or remove it with `locod models '
        f"rm {name}` (which deletes its file)",
        manifest,
    )


def _check_models(config: Config, origins: Mapping[str, str]) -> None:
    """At most MAX_MODELS of each kind, model names unique, the defaults naming configured models, and a
    cloud to route to if asked for."""
    local_names = [m.name for m in config.local.models]
    cloud_names = [m.name for m in config.cloud.models]
    for key, names in (("local.models", local_names), ("cloud.models", cloud_names)):
        if len(names) > MAX_MODELS:
            raise ConfigError(
                f"{config.source}: {key} must hold at most {MAX_MODELS} models, got {len(names)}"
                + (" (the embedded and the pulled ones included)" if key == "local.models" else "")
            )
    everything = local_names + cloud_names
    duplicated = {name for name, count in Counter(everything).items() if count > 1}
    if duplicated:
        raise ConfigError(f"{config.source}: model names must be unique, repeated: {sorted(duplicated)}")
    if ROUTED_MODEL in everything:
        raise ConfigError(
            f"{config.source}: a model may not be named {ROUTED_MODEL!r}: an OpenAI client's model {ROUTED_MODEL!r} "
            "asks locod to route the turn; give the model another name"
        )
    for key, default, names, kind in (
        ("local.default", config.local.default, local_names, "local"),
        ("cloud.default", config.cloud.default, cloud_names, "cloud"),
    ):
        if (default or kind == "local") and default not in names:  # an empty cloud.default: the first one
            raise ConfigError(
                f"{origins.get(key, config.source)}: {key} is {quoted(default)}, which names no {kind} model "
                f"({kind} models: {names}){gguf_path_hint(default)}"
            )
    if config.routing.mode == "cloud" and not cloud_names:  # else every turn would answer locally, each saying why
        raise ConfigError(
            f"{origins.get('routing.mode', config.source)}: routing.mode is 'cloud', but no cloud model is "
            "configured: add a [[cloud.models]] entry, or set routing.mode to auto or local"
        )


def _check_cache(config: Config, origins: Mapping[str, str]) -> None:
    """``local.cache_mb`` within ``local.memory_budget_mb``: the cache is held inside the budget, beside the
    loaded models, so a larger one (up to 1 TiB was taken) was silently a smaller one."""
    local = config.local
    if local.cache_mb > local.memory_budget_mb:
        raise ConfigError(
            f"{origins.get('local.cache_mb', config.source)}: local.cache_mb must be -1, 0 or at most "
            f"local.memory_budget_mb ({local.memory_budget_mb}), got {local.cache_mb}: the dialogue cache is held "
            "within the budget, beside the loaded models; lower it, or raise the budget"
        )


def _check_secrets(config: Config, origins: Mapping[str, str]) -> None:
    """Where keys come from, and the endpoints they go to. A key slipped into ``api_key_env`` or into a key
    file's path (a value that is no variable's name, a path that is not absolute) is refused unquoted: it
    was logged, and shown by `locod status` and `config show`. A base_url is quoted without its password."""
    for model in config.cloud.models:
        where = f"{config.source}: cloud model {model.name!r}"
        if not ENV_NAME.fullmatch(model.api_key_env):
            raise ConfigError(
                f"{where}: api_key_env must name the environment variable that holds the key (letters, digits "
                "and _, such as OPENAI_API_KEY), not hold the key: put the key in that variable, or in api_key_file"
            )
        problem = _url_problem(model.base_url)
        if problem is not None:
            raise ConfigError(
                f"{where}: base_url must be an http(s) URL, such as https://api.openai.com/v1, got {problem}"
            )
        _check_keyless(model, where)
    files = [(f"cloud model {m.name!r}: api_key_file", m.api_key_file, config.source) for m in config.cloud.models]
    files += [
        ("http.api_key_file", config.http.api_key_file, origins.get("http.api_key_file", config.source)),
        ("daemon.tcp_secret_file", config.daemon.tcp_secret_file, origins.get("daemon.tcp_secret_file", config.source)),
    ]
    for what, path, source in files:
        if path and not path.startswith(("/", "~")):
            raise ConfigError(
                f"{source}: {what} must be an absolute path or begin with ~/ (a relative one would depend on the "
                "directory the daemon starts in); the value is not shown, as it may be the key itself"
            )


def _check_keyless(model: CloudModelConfig, where: str) -> None:
    """A model that takes no key names no place for one: both said, one of them is a slip the daemon cannot
    settle (a key that would never be sent, or a warning-free model whose endpoint refuses every turn)."""
    places = (("api_key_file", bool(model.api_key_file)), ("api_key_env", model.api_key_env != DEFAULT_KEY_ENV))
    named = [key for key, given in places if given]
    if not model.needs_key and named:
        raise ConfigError(
            f"{where}: needs_key = false says the endpoint takes no key, but {' and '.join(named)} says where one "
            "is: remove one of them"
        )


def _check_socket_path(config: Config, origins: Mapping[str, str]) -> None:
    """The socket's path fits a Unix socket address (``sun_path``): a longer one (a deep $LOCOD_RUNTIME_DIR, a
    CI runner's workspace) loaded the model, then failed the bind in ZeroMQ's traceback."""
    size = len(os.fsencode(config.socket_path))
    if size > zmq.IPC_PATH_MAX_LEN:
        raise ConfigError(
            f"{origins.get('paths.runtime_dir', config.source)}: the socket's path {config.socket_path} is {size} "
            f"bytes, over the {zmq.IPC_PATH_MAX_LEN} a Unix socket's path may hold: set paths.runtime_dir "
            "($LOCOD_RUNTIME_DIR) to a shorter directory"
        )


def _url_problem(url: str) -> str | None:
    """What makes ``url`` no http(s) endpoint, quoted without a password it may hold; None when it is one.
    One that does not parse (``http://[zz/v1``, a port over 65535) raised ValueError from the cloud client
    built at a reload: an internal error, and a traceback at start."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is out of range or no number
    except ValueError as exc:
        return f"a URL that does not parse ({exc})"
    if not url.startswith(("http://", "https://")):
        return quoted(redacted_url(url))
    if not parts.hostname or any(char.isspace() or not char.isprintable() for char in url):
        return f"{quoted(redacted_url(url))}, which names no host or holds a space or control character"
    return None


def _check_endpoints(config: Config, origins: Mapping[str, str]) -> None:
    """Each address locod serves or calls is well formed, and one served beyond loopback has its key: these
    are refused here, before a model is loaded."""
    hub_problem = _url_problem(config.local.hub_endpoint)
    if hub_problem is not None:
        source = origins.get("local.hub_endpoint", config.source)
        raise ConfigError(f"{source}: local.hub_endpoint must be an http(s) URL, got {hub_problem}")
    if config.daemon.tcp:
        source = origins.get("daemon.tcp", config.source)
        address = tcp_host_port(config.daemon.tcp)
        if address is None:
            tcp = quoted(config.daemon.tcp)
            raise ConfigError(
                f"{source}: daemon.tcp must look like tcp://127.0.0.1:5557 (IPv6 in brackets: tcp://[::1]:5557), "
                f"got {tcp}"
            )
        host = address[0]
        if host not in LOOPBACK and not config.daemon.tcp_secret_file:  # refused before a model is loaded
            raise ConfigError(
                f"{source}: daemon.tcp binds {host}, beyond loopback: set daemon.tcp_secret_file", code="insecure_tcp"
            )
    for origin in config.http.cors_origins:
        parts = None if _url_problem(origin) else urlsplit(origin)  # urlsplit raises on one that does not parse
        if parts is None or f"{parts.scheme}://{parts.netloc}" != origin:
            source = origins.get("http.cors_origins", config.source)
            raise ConfigError(
                f"{source}: http.cors_origins holds {origin!r}, not an origin: a page's scheme, host and "
                "port only, such as http://localhost:3000 (no path, no trailing slash)"
            )
    if config.http.listen:
        source = origins.get("http.listen", config.source)
        host, _ = split_listen(config.http.listen, source)
        if host not in LOOPBACK and not config.http.api_key_file:  # refused before a model is loaded
            raise ConfigError(
                f"{source}: http.listen binds {host}, beyond loopback: set http.api_key_file", code="insecure_http"
            )


def split_listen(listen: str, source: str = "(config)") -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) of ``http.listen``, checked."""
    host, _, port = listen.rpartition(":")
    host = unbracketed(host)
    number = port_number(port)
    if not host or number is None:
        raise ConfigError(f"{source}: http.listen must look like 127.0.0.1:8080, got {quoted(listen)}")
    return host, number


def as_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data. Holds no secrets: keys live only in env or key files, and
    a base_url's user:password, if it has one, is left out."""
    data = dataclasses.asdict(config)
    for model in data["cloud"]["models"]:
        model["base_url"] = redacted_url(model["base_url"])
    return data


def redacted_url(url: str) -> str:
    """``url`` without any user:password it carries: how an endpoint is shown (status, metrics, messages)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6, as it was written
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))
