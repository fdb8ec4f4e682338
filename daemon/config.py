"""`config.toml` -> typed, validated, frozen configuration; the `check-config` command.

Parsing is `tomllib` + `msgspec` (types, ranges, enums, unknown keys), followed by the checks that span
several keys (overlap < window_size, per-source-type keys, non-loopback HTTP needs a token, TLS needs
CAs...). The whole file is validated once, at load; the first problem found is raised as a `ConfigError`
whose text is ONE
line: ``config error: <dotted.key> = <bad value>: <what is allowed>``.

Relative paths (source files, model/output folders, CA file) resolve against the config file's folder.
Secrets (``mqtt.password``, ``http.token``, credentials inside RTSP URLs) never appear in ``repr`` or in error
messages; ``GEOMETRYD_MQTT_PASSWORD`` / ``GEOMETRYD_HTTP_TOKEN`` override the file's values when set.

The shipped ``config.toml`` documents every key and equals ``default_config()`` plus one example source
(checked by tests/daemon/test_config.py, in the style of MediaMTX's ``mediamtx.yml``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import sys
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect as mi

from daemon.intrinsics import check_pixel_intrinsics
from daemon.redact import redact_value, scrub

__all__ = [
    "Config",
    "ClusterConfig",
    "ConfigError",
    "DaemonConfig",
    "FilesConfig",
    "GeometryConfig",
    "FoxgloveConfig",
    "HttpConfig",
    "McapConfig",
    "LoggingConfig",
    "ModelConfig",
    "MqttConfig",
    "OverloadConfig",
    "PriorConfig",
    "Source",
    "StreamingConfig",
    "default_config",
    "load_config",
    "load_config_or_exit",
    "parse_config",
    "check_runnable",
    "scrub_url",
    "to_toml",
]

SOURCE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "GEOMETRYD_MQTT_PASSWORD": ("mqtt", "password"),
    "GEOMETRYD_HTTP_TOKEN": ("http", "token"),
    "GEOMETRYD_FOXGLOVE_TOKEN": ("foxglove", "token"),
}
DEFAULT_CONFIG_PATH = "config.toml"
MAX_TIMEOUT_S = 86400.0

# Reusable constrained types (msgspec checks them and names the failing key).
# ge=0.001, not gt=0: msgspec checks gt=0 on floats as ">= the smallest denormal", which a process with
# flush-to-zero/denormals-are-zero set (Jittor's -Ofast CPU kernels set them when loaded) lets 0.0 pass.
MIN_SECONDS = 0.001
PosSeconds = Annotated[float, msgspec.Meta(ge=MIN_SECONDS, le=MAX_TIMEOUT_S)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
MAX_SIZE = 2048  # 2048x2048 is ~17x the pixels of the 384x640 default (~22 GB GPU memory): far beyond any GPU
Multiple64 = Annotated[int, msgspec.Meta(ge=64, le=MAX_SIZE, multiple_of=64)]


class ConfigError(ValueError):
    """An invalid config file; ``str()`` is one line naming the key, the bad value and what is allowed."""

    def __init__(self, key: str, value: str, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(scrub(f"config error: {key} = {value}: {allowed}"))


scrub_url = scrub  # the one scrubber (daemon/redact.py); the old name stays for callers


def _scrub_value(key: str, value: Any) -> Any:
    return redact_value(key, value)


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config table: frozen, unknown keys rejected, secrets hidden from ``repr``."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={_scrub_value(f, getattr(self, f))!r}" for f in self.__struct_fields__)
        return f"{type(self).__name__}({fields})"

    __str__ = __repr__

    def __rich_repr__(self) -> list[tuple[str, Any]]:  # rich's pretty printer: same scrubbing
        return [(f, _scrub_value(f, getattr(self, f))) for f in self.__struct_fields__]


class ModelConfig(_Section, frozen=True, kw_only=True):
    dir: Annotated[str, msgspec.Meta(min_length=1)] = "/var/lib/geometryd/model"
    variant: Literal["diff", "determ"] = "diff"
    dtype: Literal["fp16", "fp32"] = "fp16"


class GeometryConfig(_Section, frozen=True, kw_only=True):
    height: Multiple64 = 384
    width: Multiple64 = 640
    window_size: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 110
    overlap: Annotated[int, msgspec.Meta(ge=0)] = 25
    steps: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    decode_chunk_size: Annotated[int, msgspec.Meta(ge=1)] = 8
    low_memory: bool = False
    force_projection: bool = True
    force_fixed_focal: bool = True
    use_extract_interp: bool = False
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 42
    window_deadline_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_TIMEOUT_S)] = 0.0
    deadline_factor: Annotated[float, msgspec.Meta(ge=1.0, le=1000.0)] = 3.0
    deadline_floor_s: PosSeconds = 60.0
    heartbeat_s: PosSeconds = 5.0
    restart_budget: Annotated[int, msgspec.Meta(ge=0)] = 5
    restart_timeout_s: PosSeconds = 900.0
    stop_timeout_s: PosSeconds = 15.0
    metric: bool = False


PriorDevice = Literal["auto", "cpu", "cuda"]


def prior_device(value: str) -> PriorDevice:
    """A device name from the command line as the schema's type (ValueError if it is none of them)."""
    for choice in typing.get_args(PriorDevice):
        if value == choice:
            return choice
    raise ValueError(f"prior device must be auto, cpu or cuda, got {value!r}")


class PriorConfig(_Section, frozen=True, kw_only=True):
    checkpoint: str = ""
    python: str = ""
    device: PriorDevice = "auto"
    fp16: bool = False
    resolution_level: Annotated[int, msgspec.Meta(ge=0, le=9)] = 9
    request_timeout_s: PosSeconds = 300.0
    startup_timeout_s: PosSeconds = 120.0
    restart_budget: Annotated[int, msgspec.Meta(ge=0)] = 5
    model: Literal["moge1", "moge2"] = "moge1"


class MqttConfig(_Section, frozen=True, kw_only=True):
    enabled: bool = True
    host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    port: Port = 1883
    tls: bool = False
    ca_file: str = ""
    username: str = ""
    password: str = ""
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    topic_prefix: Annotated[str, msgspec.Meta(pattern=r"^[^+#/\x00]+(/[^+#/\x00]+)*$")] = "geometry"
    depth_encoding: Literal["png16", "f16"] = "png16"
    points_encoding: Literal["f16"] = "f16"
    publish_points: bool = True
    points_stride: Annotated[int, msgspec.Meta(ge=1)] = 1
    qos: Literal[0, 1, 2] = 0
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1024, le=268435455)] = 8 * 1024 * 1024
    publish_timeout_s: PosSeconds = 5.0
    outbox_size: Annotated[int, msgspec.Meta(ge=1)] = 256
    keepalive_s: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 30
    reconnect_initial_s: PosSeconds = 0.5
    reconnect_max_s: PosSeconds = 30.0


class FilesConfig(_Section, frozen=True, kw_only=True):
    enabled: bool = False
    dir: Annotated[str, msgspec.Meta(min_length=1)] = "/var/lib/geometryd/output"
    npz: Literal["off", "window", "clip"] = "window"
    png16_depth: bool = False


class McapConfig(_Section, frozen=True, kw_only=True):
    enabled: bool = False
    dir: str = ""  # "" = files.dir
    colour: bool = True
    points_stride: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    compression: Literal["zstd", "lz4", "none"] = "zstd"
    rotate_mb: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 1024
    rotate_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_TIMEOUT_S)] = 3600.0


class FoxgloveConfig(_Section, frozen=True, kw_only=True):
    enabled: bool = False
    bind: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8765
    token: str = ""
    colour: bool = True
    points_stride: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    backlog: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 64


class OverloadConfig(_Section, frozen=True, kw_only=True):
    policy: Literal["skip", "queue"] = "skip"
    max_queued_windows: Annotated[int, msgspec.Meta(ge=1)] = 2


class HttpConfig(_Section, frozen=True, kw_only=True):
    enabled: bool = True
    bind: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    port: Port = 9410
    token: str = ""
    header_timeout_s: PosSeconds = 10.0
    idle_timeout_s: PosSeconds = 30.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 256


class LoggingConfig(_Section, frozen=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class DaemonConfig(_Section, frozen=True, kw_only=True):
    shutdown_grace_s: PosSeconds = 10.0
    watchdog_interval_s: PosSeconds = 5.0
    shm_slack_frames: Annotated[int, msgspec.Meta(ge=0)] = 8


class StreamingConfig(_Section, frozen=True, kw_only=True):
    stats: Literal["follow", "frozen"] = "follow"
    stats_smoothing: Annotated[float, msgspec.Meta(ge=0.01, le=1.0)] = 0.5
    stats_max_step: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.4
    cut_threshold: Annotated[float, msgspec.Meta(ge=0.01, le=10.0)] = 0.4
    preview_batch: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2


class ClusterConfig(_Section, frozen=True, kw_only=True):
    address: Annotated[str, msgspec.Meta(min_length=1)] = "local"
    actors: Annotated[int, msgspec.Meta(ge=0)] = 0
    gpus_per_actor: Annotated[float, msgspec.Meta(ge=0.0, le=64.0)] = 1.0
    local_gpus: Annotated[int, msgspec.Meta(ge=-1)] = -1
    local_cpus: Annotated[int, msgspec.Meta(ge=0)] = 0
    object_store_mb: Annotated[int, msgspec.Meta(ge=80)] = 256
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 1
    restart_timeout_s: PosSeconds = 60.0
    status_interval_s: PosSeconds = 1.0
    default_fps: Annotated[float, msgspec.Meta(ge=MIN_SECONDS, le=1000.0)] = 30.0
    http_port: Port = 9420


# Keys each source type may set (besides `type`); the others keep their defaults.
SOURCE_TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "file": ("path", "loop", "realtime", "preview", "intrinsics"),
    "rtsp": ("url", "open_timeout_s", "stall_timeout_s", "reconnect_initial_s", "reconnect_max_s", "preview",
             "intrinsics"),
    "webrtc": ("preview", "intrinsics"),
}


class Source(_Section, frozen=True, kw_only=True):
    """One input stream, ``[sources.<name>]``. One struct for all types; keys are checked per type."""

    type: Literal["file", "rtsp", "webrtc"]
    # file
    path: str = ""
    loop: bool = False
    realtime: bool = False
    # rtsp
    url: str = ""
    open_timeout_s: PosSeconds = 10.0
    stall_timeout_s: PosSeconds = 10.0
    reconnect_initial_s: PosSeconds = 1.0
    reconnect_max_s: PosSeconds = 30.0
    # every type
    preview: bool = True
    # [fx, fy, cx, cy] in pixels of the source's decoded size (daemon/model/intrinsics.py); absent: estimated
    intrinsics: Annotated[list[float], msgspec.Meta(min_length=4, max_length=4)] | None = None


class Config(_Section, frozen=True, kw_only=True):
    model: ModelConfig = ModelConfig()
    geometry: GeometryConfig = GeometryConfig()
    prior: PriorConfig = PriorConfig()
    mqtt: MqttConfig = MqttConfig()
    files: FilesConfig = FilesConfig()
    overload: OverloadConfig = OverloadConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    daemon: DaemonConfig = DaemonConfig()
    streaming: StreamingConfig = StreamingConfig()
    cluster: ClusterConfig = ClusterConfig()
    mcap: McapConfig = McapConfig()
    foxglove: FoxgloveConfig = FoxgloveConfig()
    sources: dict[str, Source] = {}

    def prior_checkpoint(self) -> Path:
        """The MoGe checkpoint: ``prior.checkpoint``, or ``<model.dir>/moge/model.pt`` when empty
        (``<model.dir>/moge2/model.pt`` for ``prior.model = "moge2"``)."""
        folder = "moge2" if self.prior.model == "moge2" else "moge"
        return Path(self.prior.checkpoint or Path(self.model.dir) / folder / "model.pt")

    def moge_version(self) -> int:
        """The sidecar's ``--moge-version``: 2 for ``prior.model = "moge2"``, else 1."""
        return 2 if self.prior.model == "moge2" else 1

    def prior_python(self) -> str:
        """Interpreter for the sidecar: ``prior.python``, or the daemon's own interpreter when empty."""
        return self.prior.python or sys.executable

    def redacted(self) -> dict[str, Any]:
        """Plain-data view with secrets replaced by ``***`` (for ``check-config --print`` and logs)."""
        return _redact(msgspec.to_builtins(self))


def _redact(data: Any, key: str = "") -> Any:
    if isinstance(data, dict):
        return {k: _redact(v, k) for k, v in data.items()}
    return _scrub_value(key, data)


def default_config() -> Config:
    """The built-in defaults (no sources). The shipped config.toml must equal this plus its example source."""
    return Config()


def to_toml(cfg: Config) -> str:
    """Serialise ``cfg`` as a config file that `load_config` reads back equal (secrets included: keep the
    file private). For programs that write configs (the demo, tests)."""
    data = msgspec.to_builtins(cfg)
    sources = data.pop("sources")
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    for name, src in sources.items():
        lines.append(f"[sources.{name}]")
        keys = ("type", *SOURCE_TYPE_KEYS[src["type"]])
        lines += [f"{k} = {_toml_value(src[k])}" for k in keys if src[k] is not None]
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    return repr(v)


# --------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate ``path``; raise ``ConfigError`` (one line) on the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file", _fmt(str(path)), "not found (pass --config PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("file", _fmt(str(path)), f"cannot read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", _fmt(str(path)), f"invalid TOML: {exc}") from None
    for env, (section, key) in ENV_OVERRIDES.items():
        if env in os.environ:
            table = raw.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = os.environ[env]
    return parse_config(raw, base_dir=path.resolve().parent)


def write_config(path: Path, tables: dict[str, Any]) -> Config:
    """Validate ``tables`` (a TOML document as nested dicts; omitted keys take their defaults) and write it
    to ``path`` as a complete config file. For programs that run the daemon (the demo, benchmarks)."""
    path = Path(path)
    cfg = parse_config(tables, path.parent)
    path.write_text(to_toml(cfg))
    return cfg


def parse_config(raw: dict[str, Any], base_dir: Path) -> Config:
    """Validate an already-parsed TOML document; relative paths resolve against ``base_dir``."""
    raw = dict(raw)
    raw_sources = raw.pop("sources", {})
    cfg = _convert(raw, Config, prefix="")
    sources = _convert_sources(raw_sources)
    cfg = msgspec.structs.replace(cfg, sources=sources)
    cfg = _resolve_paths(cfg, base_dir)
    _check(cfg)
    return cfg


def load_config_or_exit(path: str | os.PathLike[str], *, runnable: bool = False) -> Config:
    """`load_config` for commands: on error print the one line to stderr and exit with status 2.
    ``runnable``: also `check_runnable` (model folder, checkpoint, source files exist)."""
    try:
        cfg = load_config(path)
        if runnable:
            check_runnable(cfg)
        return cfg
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def _convert(raw: Any, typ: type, prefix: str) -> Any:
    try:
        return msgspec.convert(raw, typ, strict=True)
    except msgspec.ValidationError as exc:
        raise _translate(str(exc), raw, typ, prefix) from None


def _convert_sources(raw_sources: Any) -> dict[str, Source]:
    if not isinstance(raw_sources, dict):
        raise ConfigError("sources", _fmt(raw_sources), "expected [sources.<name>] tables")
    sources: dict[str, Source] = {}
    for name, table in raw_sources.items():
        if not SOURCE_NAME_RE.fullmatch(name):
            raise ConfigError("sources", _fmt(name), "a source name matching [A-Za-z0-9_-]{1,32}")
        key = f"sources.{name}"
        if not isinstance(table, dict):
            raise ConfigError(key, _fmt(table), "expected a table with at least `type`")
        kind = table.get("type")
        if isinstance(kind, str) and kind in SOURCE_TYPE_KEYS:  # otherwise msgspec names the bad type
            allowed = ("type", *SOURCE_TYPE_KEYS[kind])
            for k in table:
                if k not in allowed:
                    shown = _fmt(_scrub_value(k, table[k]))
                    raise ConfigError(f"{key}.{k}", shown,
                                      f"not a key of a {kind} source ({', '.join(allowed)})")
        sources[name] = _convert(table, Source, prefix=key)
    return sources


_AT_RE = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$")
_UNKNOWN_RE = re.compile(r"Object contains unknown field `(?P<f>[^`]*)`")
_MISSING_RE = re.compile(r"Object missing required field `(?P<f>[^`]*)`")


def _translate(message: str, raw: Any, typ: type, prefix: str) -> ConfigError:
    """Turn a msgspec validation message into our one-line ConfigError (key, scrubbed value, allowed)."""
    m = _AT_RE.match(message)
    msg, path = (m["msg"], m["path"]) if m else (message, "")
    parts = [p for p in path.split(".") if p]
    info: Any = mi.type_info(typ)
    value: Any = raw
    for p in parts:
        info = _field_info(info, p)
        value = value.get(p) if isinstance(value, dict) else None
    if um := _UNKNOWN_RE.match(msg):
        field = um["f"]
        names = [f.name for f in info.fields] if isinstance(info, mi.StructType) else []
        key = ".".join([*parts, field])
        bad = value.get(field) if isinstance(value, dict) else None
        allowed = f"unknown key (allowed: {', '.join(names)})"
        return ConfigError(_join(prefix, key), _fmt(_scrub_value(field, bad)), allowed)
    if mm := _MISSING_RE.match(msg):
        key = ".".join([*parts, mm["f"]])
        finfo = _field_info(info, mm["f"])
        return ConfigError(_join(prefix, key), "(missing)", f"required: {_describe(finfo)}")
    key = ".".join(parts)
    leaf = parts[-1] if parts else ""
    return ConfigError(_join(prefix, key) or "config", _fmt(_scrub_value(leaf, value)), _describe(info))


def _join(prefix: str, key: str) -> str:
    return ".".join(p for p in (prefix, key) if p)


def _field_info(info: Any, name: str) -> Any:
    if isinstance(info, mi.StructType):
        for f in info.fields:
            if f.name == name and isinstance(f.type, mi.LiteralType):
                # msgspec sorts literal values; show them in declared order (the default first).
                return mi.LiteralType(values=typing.get_args(typing.get_type_hints(info.cls)[name]))
            if f.name == name:
                return f.type
    return mi.AnyType()


def _describe(info: Any) -> str:
    """What a msgspec type accepts, in words (the `allowed` part of the message)."""
    if isinstance(info, mi.LiteralType):
        return "one of " + ", ".join(_fmt(v) for v in info.values)
    if isinstance(info, mi.BoolType):
        return "true or false"
    if isinstance(info, mi.IntType):
        if info.multiple_of:
            return f"a multiple of {info.multiple_of} in {info.ge}..{info.le}"
        return "an integer" + _bounds(info)
    if isinstance(info, mi.FloatType):
        return "a number" + _bounds(info)
    if isinstance(info, mi.StrType):
        if info.pattern and "+#/" in info.pattern:
            return "a topic without wildcards (+ #), empty levels or leading/trailing '/'"
        if info.max_length is not None:
            return f"a string of at most {info.max_length} characters"
        if info.min_length:
            return "a non-empty string"
        return "a string"
    if isinstance(info, (mi.StructType, mi.DictType)):
        return "a table"
    if isinstance(info, mi.UnionType):  # `X | None` keys: the TOML file can only give X
        return " or ".join(_describe(t) for t in info.types if not isinstance(t, mi.NoneType))
    if isinstance(info, mi.ListType) and info.min_length is not None and info.min_length == info.max_length:
        return (f"an array of {info.min_length} "
                f"{'numbers' if isinstance(info.item_type, mi.FloatType) else 'items'}")
    return "a valid value"


def _bounds(info: Any) -> str:
    lo = f">= {info.ge}" if info.ge is not None else (f"> {info.gt}" if info.gt is not None else "")
    hi = f"<= {info.le}" if info.le is not None else (f"< {info.lt}" if info.lt is not None else "")
    if info.ge is not None and info.le is not None:
        return f" in {info.ge}..{info.le}"
    return " " + " and ".join(s for s in (lo, hi) if s) if (lo or hi) else ""


def _fmt(value: Any) -> str:
    """A value as TOML-ish text for messages, kept short."""
    if value is None:
        return "(missing)"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = json.dumps(value) if isinstance(value, str) else repr(value)
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k} = {_fmt(_scrub_value(k, v))}" for k, v in value.items()) + "}"
    else:
        text = repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= 120 else text[:117] + "..."


def _resolve(path: str, base_dir: Path) -> str:
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base_dir / p))


def _resolve_paths(cfg: Config, base_dir: Path) -> Config:
    """Make relative paths absolute against the config file's folder (the interpreter name stays as is)."""
    replace = msgspec.structs.replace
    return replace(
        cfg,
        model=replace(cfg.model, dir=_resolve(cfg.model.dir, base_dir)),
        prior=replace(cfg.prior, checkpoint=_resolve(cfg.prior.checkpoint, base_dir)),
        mqtt=replace(cfg.mqtt, ca_file=_resolve(cfg.mqtt.ca_file, base_dir)),
        files=replace(cfg.files, dir=_resolve(cfg.files.dir, base_dir)),
        mcap=replace(cfg.mcap, dir=_resolve(cfg.mcap.dir, base_dir)),
        sources={
            n: replace(s, path=_resolve(s.path, base_dir)) if s.type == "file" else s
            for n, s in cfg.sources.items()
        },
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _system_cas_available() -> bool:
    paths = ssl.get_default_verify_paths()
    return any(p and os.path.exists(p) for p in (paths.cafile, paths.capath))


def _valid_rtsp_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("rtsp", "rtsps") and bool(parts.hostname)


def _check(cfg: Config) -> None:
    """Rules that span several keys or need the filesystem."""
    g = cfg.geometry
    if g.overlap >= g.window_size:
        allowed = f"must be < geometry.window_size ({g.window_size})"
        raise ConfigError("geometry.overlap", _fmt(g.overlap), allowed)
    if g.metric and cfg.prior.model != "moge2":
        raise ConfigError("geometry.metric", "true",
                          'needs prior.model = "moge2" (MoGe-1 has no metric scale)')
    m = cfg.mqtt
    if m.reconnect_initial_s > m.reconnect_max_s:
        raise ConfigError(
            "mqtt.reconnect_initial_s",
            _fmt(m.reconnect_initial_s),
            f"must be <= mqtt.reconnect_max_s ({m.reconnect_max_s})",
        )
    if m.tls and m.ca_file and not os.path.isfile(m.ca_file):
        allowed = 'no such file (a PEM CA bundle, or "" for the system CAs)'
        raise ConfigError("mqtt.ca_file", _fmt(m.ca_file), allowed)
    if m.tls and not m.ca_file and not _system_cas_available():
        raise ConfigError("mqtt.ca_file", '""', "tls = true needs a CA file: no system CA bundle found")
    if m.password and not m.username:
        raise ConfigError("mqtt.username", '""', "a username is required when mqtt.password is set")
    h = cfg.http
    if h.token and (not h.token.strip() or any(c.isspace() or not c.isprintable() for c in h.token)):
        raise ConfigError("http.token", '"***"', "a token of visible characters (no blanks, spaces or "
                          'control characters), or "" for no auth')
    if h.enabled and not _is_loopback(h.bind) and not h.token:
        allowed = "a non-loopback bind needs http.token (or bind 127.0.0.1)"
        raise ConfigError("http.bind", _fmt(h.bind), allowed)
    _check_token("foxglove", cfg.foxglove.token, cfg.foxglove.enabled, cfg.foxglove.bind)
    for name, src in cfg.sources.items():
        key = f"sources.{name}"
        if src.type == "file" and not src.path:
            raise ConfigError(f"{key}.path", "(missing)", "a file source needs path (a video file)")
        if src.type == "rtsp" and not _valid_rtsp_url(src.url):
            shown = _fmt(scrub_url(src.url)) if src.url else "(missing)"
            raise ConfigError(f"{key}.url", shown, "an rtsp:// or rtsps:// URL with a host")
        if src.type == "rtsp" and src.reconnect_initial_s > src.reconnect_max_s:
            raise ConfigError(
                f"{key}.reconnect_initial_s",
                _fmt(src.reconnect_initial_s),
                f"must be <= {key}.reconnect_max_s ({src.reconnect_max_s})",
            )
        if src.intrinsics is not None:
            try:
                check_pixel_intrinsics(src.intrinsics)
            except ValueError as exc:
                raise ConfigError(f"{key}.intrinsics", _fmt(src.intrinsics), str(exc)) from None
            if not g.force_projection:
                raise ConfigError("geometry.force_projection", "false", f"true: {key}.intrinsics replace the "
                                  "focal of the projection step")
        if src.type == "webrtc" and not h.enabled:
            allowed = f"true: webrtc source {name} needs the HTTP server (WHIP endpoint)"
            raise ConfigError("http.enabled", "false", allowed)


def _check_token(section: str, token: str, enabled: bool, bind: str) -> None:
    """The HTTP rule for any server: a token of visible characters; a non-loopback bind needs one."""
    if token and (not token.strip() or any(c.isspace() or not c.isprintable() for c in token)):
        raise ConfigError(f"{section}.token", '"***"', "a token of visible characters (no blanks, spaces or "
                          'control characters), or "" for no auth')
    if enabled and not _is_loopback(bind) and not token:
        allowed = f"a non-loopback bind needs {section}.token (or bind 127.0.0.1)"
        raise ConfigError(f"{section}.bind", _fmt(bind), allowed)


def check_runnable(cfg: Config) -> None:
    """What `run` needs on disk beyond a valid file: the model folder, the MoGe checkpoint and every file
    source's video (raises ConfigError; `check-config` and `run` call it, `load_config` does not, so that a
    config can be validated and written on a machine without the weights)."""
    if not os.path.isdir(cfg.model.dir):
        raise ConfigError("model.dir", _fmt(cfg.model.dir), "no such folder (fill it with `geometryd weights "
                          "pull --to DIR` or `geometryd weights make-tiny DIR`)")
    ckpt = cfg.prior_checkpoint()
    if not ckpt.is_file():
        key = "prior.checkpoint" if cfg.prior.checkpoint else "model.dir"
        raise ConfigError(key, _fmt(str(ckpt) if cfg.prior.checkpoint else cfg.model.dir),
                          f"no MoGe checkpoint at {ckpt}")
    for name, src in cfg.sources.items():
        if src.type == "file" and not os.path.isfile(src.path):
            raise ConfigError(f"sources.{name}.path", _fmt(src.path), "no such file (a video file)")
