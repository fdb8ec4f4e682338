"""config.toml + daemon.config: shipped file == defaults, one-line errors with exit 2, valid variations,
credential scrubbing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from daemon.config import (
    Config,
    ConfigError,
    Source,
    default_config,
    load_config,
    load_config_or_exit,
    scrub_url,
    to_toml,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config.toml"
SECRET_ENV = ("GEOMETRYD_MQTT_PASSWORD", "GEOMETRYD_HTTP_TOKEN")


@pytest.fixture(autouse=True)
def _no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _check_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", "--config", str(path), *extra],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# shipped file


def test_shipped_config_equals_defaults_plus_example_source() -> None:
    cfg = load_config(SHIPPED)
    expected = msgspec.structs.replace(
        default_config(), sources={"demo": Source(type="file", path=str(REPO / "var/demo/sample.mp4"))}
    )
    assert cfg == expected
    assert cfg.sources["demo"].type == "file"


def test_shipped_config_lists_and_documents_every_key() -> None:
    raw = tomllib.loads(SHIPPED.read_text())
    defaults = msgspec.to_builtins(default_config())
    for section, table in defaults.items():
        if section == "sources":
            continue
        assert set(raw[section]) == set(table), f"[{section}] keys differ from the built-in defaults"
    assert set(raw) == set(defaults)
    # Every key has a comment above it (keys may share one comment block, as host/port do).
    text = SHIPPED.read_text()
    lines = text[: text.index("[sources.demo]")].splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_0-9]+ = ", line):
            j = i - 1
            while j >= 0 and re.match(r"^[a-z_0-9]+ = ", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"line {i + 1} ({line!r}): no comment above"
    # Source keys are documented together in the comment block before the example source.
    for name in Source.__struct_fields__:
        assert re.search(rf"^#.*\b{name}\b", text, re.M), f"source key {name} not documented"


def test_check_config_on_shipped_file_prints_ok() -> None:
    out = _check_config(SHIPPED, "--syntax-only")  # this machine has no /var/lib/geometryd/model
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert out.stderr == ""


def test_defaults_match_the_contract() -> None:
    c = default_config()
    assert (c.model.dir, c.model.variant, c.model.dtype) == ("/var/lib/geometryd/model", "diff", "fp16")
    g = c.geometry
    assert (g.height, g.width, g.window_size, g.overlap) == (384, 640, 110, 25)
    assert (g.steps, g.decode_chunk_size) == (5, 8)
    m = c.mqtt
    assert (m.host, m.port, m.qos) == ("127.0.0.1", 1883, 0)
    assert (m.topic_prefix, m.depth_encoding) == ("geometry", "png16")
    assert m.max_payload_bytes == 8 * 1024 * 1024
    assert (c.http.bind, c.http.port) == ("127.0.0.1", 9410)
    assert (c.logging.level, c.logging.format, c.overload.policy) == ("info", "text", "skip")
    assert c.prior.resolution_level == 9 and c.sources == {}
    assert c.prior_checkpoint() == Path("/var/lib/geometryd/model/moge/model.pt")
    assert c.prior_python() == sys.executable
    with pytest.raises(AttributeError):
        c.geometry.height = 64  # type: ignore[misc]  # frozen


# ------------------------------------------------------------------------------------------------------
# invalid configs: exit 2, exactly one stderr line naming the key and the bad value

INVALID: list[tuple[str, str, str, str]] = [
    # (id, toml text, key named, bad value named)
    ("height-not-64", "[geometry]\nheight = 100\n", "geometry.height", "100"),
    ("width-zero", "[geometry]\nwidth = 0\n", "geometry.width", "0"),
    ("height-type", '[geometry]\nheight = "tall"\n', "geometry.height", '"tall"'),
    ("overlap-ge-window", "[geometry]\nwindow_size = 16\noverlap = 16\n", "geometry.overlap", "16"),
    ("overlap-negative", "[geometry]\noverlap = -1\n", "geometry.overlap", "-1"),
    ("steps-zero", "[geometry]\nsteps = 0\n", "geometry.steps", "0"),
    ("decode-chunk-zero", "[geometry]\ndecode_chunk_size = 0\n", "geometry.decode_chunk_size", "0"),
    ("variant-enum", '[model]\nvariant = "fast"\n', "model.variant", '"fast"'),
    ("dtype-enum", '[model]\ndtype = "bf16"\n', "model.dtype", '"bf16"'),
    ("mqtt-port-range", "[mqtt]\nport = 70000\n", "mqtt.port", "70000"),
    ("http-port-zero", "[http]\nport = 0\n", "http.port", "0"),
    ("qos-3", "[mqtt]\nqos = 3\n", "mqtt.qos", "3"),
    ("bool-as-string", '[mqtt]\ntls = "yes"\n', "mqtt.tls", '"yes"'),
    ("depth-encoding", '[mqtt]\ndepth_encoding = "jpeg"\n', "mqtt.depth_encoding", '"jpeg"'),
    ("topic-wildcard", '[mqtt]\ntopic_prefix = "geo/#"\n', "mqtt.topic_prefix", '"geo/#"'),
    ("unknown-key", "[geometry]\nheigth = 384\n", "geometry.heigth", "384"),
    ("unknown-section", "[gpu]\nid = 0\n", "gpu", "id = 0"),
    ("resolution-level", "[prior]\nresolution_level = 10\n", "prior.resolution_level", "10"),
    ("timeout-zero", "[prior]\nrequest_timeout_s = 0\n", "prior.request_timeout_s", "0"),
    ("log-level", '[logging]\nlevel = "verbose"\n', "logging.level", '"verbose"'),
    ("npz-enum", '[files]\nnpz = "frame"\n', "files.npz", '"frame"'),
    ("overload-enum", '[overload]\npolicy = "block"\n', "overload.policy", '"block"'),
    ("source-name", '[sources."cam 1"]\ntype = "file"\npath = "a.mp4"\n', "sources", '"cam 1"'),
    ("source-type", '[sources.cam]\ntype = "usb"\n', "sources.cam.type", '"usb"'),
    ("source-no-type", '[sources.cam]\npath = "a.mp4"\n', "sources.cam.type", "(missing)"),
    ("file-no-path", '[sources.clip]\ntype = "file"\n', "sources.clip.path", "(missing)"),
    ("rtsp-bad-scheme", '[sources.cam]\ntype = "rtsp"\nurl = "http://cam/stream"\n', "sources.cam.url", '"http://cam/stream"'),
    ("rtsp-key-on-file", '[sources.clip]\ntype = "file"\npath = "a.mp4"\nstall_timeout_s = 3.0\n', "sources.clip.stall_timeout_s", "3.0"),
    ("source-unknown-key", '[sources.cam]\ntype = "webrtc"\nfps = 30\n', "sources.cam.fps", "30"),
    ("source-bad-loop", '[sources.clip]\ntype = "file"\npath = "a.mp4"\nloop = 1\n', "sources.clip.loop", "1"),
    ("bind-no-token", '[http]\nbind = "0.0.0.0"\n', "http.bind", '"0.0.0.0"'),
    ("tls-missing-ca", '[mqtt]\ntls = true\nca_file = "no-such-ca.pem"\n', "mqtt.ca_file", "no-such-ca.pem"),
    ("reconnect-order", "[mqtt]\nreconnect_initial_s = 60.0\nreconnect_max_s = 30.0\n", "mqtt.reconnect_initial_s", "60.0"),
    ("section-not-table", "mqtt = 3\n", "mqtt", "3"),
    ("toml-syntax", "[mqtt\nport = 1\n", "file", "config.toml"),
]  # fmt: skip


# One subprocess per kind costs ~0.4 s (CLI start-up); these kinds go through the real command line,
# all kinds go through load_config_or_exit in-process (the same code path behind the command).
SUBPROCESS_KINDS = {
    "height-not-64", "height-type", "overlap-ge-window", "steps-zero", "variant-enum", "mqtt-port-range",
    "qos-3", "bool-as-string", "topic-wildcard", "unknown-key", "source-name", "source-type", "file-no-path",
    "rtsp-bad-scheme", "bind-no-token", "tls-missing-ca", "toml-syntax",
}  # fmt: skip


def _assert_one_line(stderr: str, key: str, value: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(f"config error: {key} = "), line
    assert value in line[len(f"config error: {key} = ") :], line


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [c[1:] for c in INVALID if c[0] in SUBPROCESS_KINDS],
    ids=[c[0] for c in INVALID if c[0] in SUBPROCESS_KINDS],
)
def test_invalid_config_cli_exits_2_with_one_line(tmp_path: Path, text: str, key: str, value: str) -> None:
    out = _check_config(_write(tmp_path, text))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    _assert_one_line(out.stderr, key, value)


@pytest.mark.parametrize(("text", "key", "value"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config_load_or_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config_or_exit(_write(tmp_path, text))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _assert_one_line(captured.err, key, value)


def test_at_least_twelve_kinds_through_the_cli() -> None:
    assert len(SUBPROCESS_KINDS) >= 12 and SUBPROCESS_KINDS <= {c[0] for c in INVALID}


def test_missing_file_exits_2(tmp_path: Path) -> None:
    out = _check_config(tmp_path / "nope.toml")
    assert out.returncode == 2
    expected = f'config error: file = "{tmp_path / "nope.toml"}": not found (pass --config PATH)'
    assert out.stderr.splitlines() == [expected]


def test_error_names_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, '[model]\nvariant = "fast"\n'))
    assert str(exc.value) == 'config error: model.variant = "fast": one of "diff", "determ"'
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, "[geometry]\nheight = 100\n"))
    assert str(exc.value) == "config error: geometry.height = 100: a multiple of 64 in 64..2048"
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, "[geometry]\nheigth = 384\n"))
    assert "allowed: height, width, window_size" in str(exc.value)


def test_load_config_or_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config_or_exit(_write(tmp_path, "[mqtt]\nqos = 7\n"))
    assert exc.value.code == 2
    assert capsys.readouterr().err == "config error: mqtt.qos = 7: one of 0, 1, 2\n"
    assert isinstance(load_config_or_exit(_write(tmp_path, "")), Config)


# ------------------------------------------------------------------------------------------------------
# valid variations


def test_valid_variations(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    text = """
[model]
dir = "models/gc"
variant = "determ"
dtype = "fp32"
[geometry]
height = 576
width = 1024
window_size = 8
overlap = 0
[prior]
checkpoint = "moge-small.pt"
[mqtt]
tls = true
ca_file = "ca.pem"
username = "geo"
password = "hunter2"
qos = 2
reconnect_initial_s = 1      # an integer is fine for a float key
[http]
bind = "0.0.0.0"
token = "s3cret-token"
[files]
enabled = true
dir = "out"
npz = "clip"
[sources.clip_1]
type = "file"
path = "clips/a.mp4"
loop = true
[sources.cam-2]
type = "rtsp"
url = "rtsps://admin:pa55word@192.0.2.7:8554/live"
stall_timeout_s = 2.5
[sources.phone]
type = "webrtc"
"""
    cfg = load_config(_write(tmp_path, text))
    assert cfg.model.dir == str(tmp_path / "models/gc") and cfg.model.variant == "determ"
    assert (cfg.geometry.height, cfg.geometry.width, cfg.geometry.overlap) == (576, 1024, 0)
    assert cfg.prior_checkpoint() == tmp_path / "moge-small.pt"
    assert cfg.mqtt.ca_file == str(tmp_path / "ca.pem") and cfg.mqtt.qos == 2
    assert cfg.mqtt.reconnect_initial_s == 1.0 and isinstance(cfg.mqtt.reconnect_initial_s, float)
    assert cfg.files.dir == str(tmp_path / "out")
    assert cfg.sources["clip_1"].path == str(tmp_path / "clips/a.mp4") and cfg.sources["clip_1"].loop
    assert cfg.sources["cam-2"].type == "rtsp" and cfg.sources["cam-2"].url.startswith("rtsps://admin:")
    assert cfg.sources["cam-2"].stall_timeout_s == 2.5
    assert cfg.sources["phone"].type == "webrtc"
    assert list(cfg.sources) == ["clip_1", "cam-2", "phone"]


def test_to_toml_round_trip(tmp_path: Path) -> None:
    cfg = msgspec.structs.replace(
        load_config(SHIPPED),
        mqtt=msgspec.structs.replace(default_config().mqtt, username="u", password='p"\\w ü', qos=1),
        sources={
            "cam": Source(type="rtsp", url="rtsp://u:p@h/s", stall_timeout_s=1e-3),
            "clip": Source(type="file", path="/x/ä b.mp4", loop=True),
            "web": Source(type="webrtc"),
        },
    )
    assert load_config(_write(tmp_path, to_toml(cfg))) == cfg


def test_absolute_paths_kept_and_empty_file_is_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, '[sources.a]\ntype = "file"\npath = "/data/a.mp4"\n'))
    assert cfg.sources["a"].path == "/data/a.mp4"
    assert load_config(_write(tmp_path, "# nothing\n")) == default_config()


def test_env_overrides_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOMETRYD_MQTT_PASSWORD", "from-env")
    monkeypatch.setenv("GEOMETRYD_HTTP_TOKEN", "tok-env")
    cfg = load_config(_write(tmp_path, '[mqtt]\nusername = "u"\npassword = "from-file"\n'))
    assert cfg.mqtt.password == "from-env"
    assert cfg.http.token == "tok-env"


# ------------------------------------------------------------------------------------------------------
# credentials never shown


def test_scrub_url() -> None:
    assert scrub_url("rtsp://admin:pa55@192.0.2.7:554/live?x=1") == "rtsp://***:***@192.0.2.7:554/live?x=1"
    assert scrub_url("rtsp://cam.local/live") == "rtsp://cam.local/live"
    assert scrub_url("rtsps://user@[2001:db8::1]/s") == "rtsps://***:***@[2001:db8::1]/s"


def test_repr_and_errors_hide_credentials(tmp_path: Path) -> None:
    text = """
[mqtt]
username = "geo"
password = "hunter2"
[http]
token = "tok-XYZ"
[sources.cam]
type = "rtsp"
url = "rtsp://admin:pa55word@192.0.2.7/live"
"""
    cfg = load_config(_write(tmp_path, text))
    import rich.pretty

    views = (repr(cfg), str(cfg), repr(cfg.mqtt), repr(cfg.sources["cam"]), str(cfg.redacted()))
    for shown in (*views, rich.pretty.pretty_repr(cfg), f"{cfg}", "%s" % (cfg,)):  # noqa: UP031 - %-formatting is one of the views under test
        for secret in ("hunter2", "tok-XYZ", "pa55word", "admin"):
            assert secret not in shown, (secret, shown)
    assert "rtsp://***:***@192.0.2.7/live" in repr(cfg.sources["cam"])
    # Errors about a URL or a secret show it scrubbed too.
    bad = text.replace("rtsp://admin", "http://admin")
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, bad))
    assert "pa55word" not in str(exc.value) and "sources.cam.url" in str(exc.value)
    bad = '[sources.f]\ntype = "file"\npath = "a.mp4"\nurl = "rtsp://u:pa55word@h/x"\n'
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, bad))
    assert "pa55word" not in str(exc.value) and "sources.f.url" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, "[mqtt]\npassword = 12345\n"))
    assert "12345" not in str(exc.value) and 'mqtt.password = "***"' in str(exc.value)


def test_zero_timeout_rejected_after_jittor_kernels_set_flush_to_zero(tmp_path: Path) -> None:
    """Jittor's CPU kernels are built with -Ofast; loading one sets FTZ/DAZ for the thread. A bound like
    msgspec's gt=0 (checked as >= the smallest denormal) then let 0.0 through (found by test order)."""
    import numpy as np

    from daemon.jittor_env import import_jittor
    from daemon.model.attention import attention

    jt = import_jittor()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 37, 64)).astype(np.float32)
    k = rng.standard_normal((6, 29, 64)).astype(np.float32)
    attention(jt.array(q), jt.array(k), jt.array(k), max_bytes=12876).numpy()  # loads such a kernel
    tiny = np.array([5e-324], dtype=np.float64)
    ftz = bool((tiny * 1.0)[0] == 0.0)
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, "[prior]\nrequest_timeout_s = 0\n"))
    print("flush-to-zero active:", ftz)
