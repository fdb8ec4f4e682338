"""Configs that validate but cannot run, and secrets in every spelling (issue #18): check-config refuses
them with one line and exit 2; no value of a secret-looking key, no ``user:pass@`` reaches a message."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GEOMETRYD_MQTT_PASSWORD", "GEOMETRYD_HTTP_TOKEN")}
    return subprocess.run([sys.executable, "-m", "daemon", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model folder with a MoGe checkpoint file (its content is not read by check-config)."""
    d = tmp_path / "model"
    (d / "moge").mkdir(parents=True)
    (d / "moge" / "model.pt").write_bytes(b"x")
    return d


def _one_line(out: subprocess.CompletedProcess[str], key: str) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {key} = "), out.stderr
    return lines[0]


def test_runnable_config_is_ok(tmp_path: Path, model_dir: Path) -> None:
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"")
    out = _check_config(_write(tmp_path, f'[model]\ndir = "{model_dir}"\n[sources.a]\ntype = "file"\n'
                                         f'path = "a.mp4"\n'))
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "ok", "")


def test_missing_model_folder_exits_2(tmp_path: Path) -> None:
    _one_line(_check_config(_write(tmp_path, f'[model]\ndir = "{tmp_path / "nope"}"\n')), "model.dir")


def test_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = _one_line(_check_config(_write(tmp_path, f'[model]\ndir = "{tmp_path / "empty"}"\n')), "model.dir")
    assert "moge/model.pt" in line


def test_missing_source_file_exits_2(tmp_path: Path, model_dir: Path) -> None:
    text = f'[model]\ndir = "{model_dir}"\n[sources.cam]\ntype = "file"\npath = "missing.mp4"\n'
    line = _one_line(_check_config(_write(tmp_path, text)), "sources.cam.path")
    assert "missing.mp4" in line


def test_run_exits_2_on_a_missing_source_file(tmp_path: Path, model_dir: Path) -> None:
    text = (f'[model]\ndir = "{model_dir}"\n[http]\nenabled = false\n[mqtt]\nenabled = false\n'
            '[sources.cam]\ntype = "file"\npath = "missing.mp4"\n')
    out = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(_write(tmp_path, text))],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    _one_line(out, "sources.cam.path")


@pytest.mark.parametrize("key", ["height", "width"])
def test_size_upper_bound(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, f"[geometry]\n{key} = 65536\n"))
    assert f"geometry.{key} = 65536" in str(exc.value) and "64..2048" in str(exc.value)
    assert load_config(_write(tmp_path, f"[geometry]\n{key} = 2048\n"))


@pytest.mark.parametrize("token", [" ", "   ", "\t", "a b", "tok\n"])
def test_blank_or_spaced_token_rejected(tmp_path: Path, token: str) -> None:
    text = f'[http]\ntoken = "{token.encode("unicode_escape").decode()}"\n'
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text))
    assert str(exc.value).startswith("config error: http.token = ")


def test_summary_to_unwritable_path_is_one_line(tmp_path: Path, model_dir: Path) -> None:
    text = f'[model]\ndir = "{model_dir}"\n[http]\nenabled = false\n[mqtt]\nenabled = false\n'
    bad = tmp_path / "no" / "such" / "dir" / "summary.json"
    out = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(_write(tmp_path, text)),
                          "--summary", str(bad), "--exit-when-done"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"geometryd run: error: --summary {bad}: the folder "
                                       f"{bad.parent} does not exist"]


# ------------------------------------------------------------------------------------------------------
# secrets


@pytest.mark.parametrize("key", ["password", "passwd", "passwrd", "pasword", "pwd", "token", "tokn", "tken",
                                 "secret", "secrt", "api_key", "apikey", "auth", "credentials", "PassWord"])
def test_misspelled_secret_key_value_never_shown(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, f'[geometry]\n{key} = "hunter2-s3cret"\n'))
    msg = str(exc.value)
    assert f"geometry.{key} = " in msg and "hunter2" not in msg, msg
    from daemon.redact import is_secret_key

    assert is_secret_key(key)


def test_known_keys_are_not_secret() -> None:
    import msgspec

    from daemon.config import Source, default_config
    from daemon.redact import is_secret_key

    keys = set(Source.__struct_fields__)
    for table in msgspec.to_builtins(default_config()).values():
        keys |= set(table)
    assert sorted(k for k in keys if is_secret_key(k)) == ["password", "token"]


@pytest.mark.parametrize("url", ["user:pw-s3cret@host/x", "admin:pw-s3cret@192.0.2.7:554/live",
                                 "http://admin:pw-s3cret@host/x", "rtsp://u:pw-s3cret@h@host:bad/x"])
def test_credentials_without_rtsp_scheme_scrubbed_in_config_errors(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, f'[sources.cam]\ntype = "rtsp"\nurl = "{url}"\n'))
    assert "s3cret" not in str(exc.value) and "sources.cam.url" in str(exc.value), str(exc.value)


def test_one_scrub_function() -> None:
    from daemon import config
    from daemon.redact import scrub
    from daemon.stages import ingest_rtsp

    assert config.scrub_url is scrub and ingest_rtsp.scrub is scrub and not hasattr(ingest_rtsp, "scrub_url")
    assert scrub("open failed: u:p@h/x 401") == "open failed: ***:***@h/x 401"
    assert scrub("rtsp://cam.local/live and a@b.example") == "rtsp://cam.local/live and a@b.example"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_redacted(capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    from daemon.logging_setup import setup_logging

    setup_logging("info", fmt)
    try:
        log = logging.getLogger("daemon.test")
        log.warning("cannot open %s", "user:pw-s3cret@cam/x", extra={"url": "rtsp://a:pw-s3cret@h/x",
                                                                     "passwrd": "pw-s3cret"})
        try:
            raise RuntimeError("boom rtsp://a:pw-s3cret@h/x")
        except RuntimeError:
            log.exception("failed")
        err = capsys.readouterr().err
        assert "s3cret" not in err and "***:***@cam/x" in err, err
    finally:
        logging.getLogger().handlers.clear()
