#!/usr/bin/env bash
# One idempotent setup for a fresh Debian machine: Debian packages the tests need, the .venv with pinned
# packages, the geometryd package itself, and a first Jittor import (compiles its core once, ~3 min on 2 cores).
# Fast when already done: each step is skipped when its stamp matches the inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP_DIR="$VENV/.geometryd-stamps"
log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Debian packages (mosquitto, GStreamer RTSP server for the RTSP camera fixture, chromium for the viewer test,
#    oneDNN 2.x for the Jittor networks' CPU convolutions: daemon/model/conv_cpu.py).
APT_PKGS=(mosquitto python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
          gstreamer1.0-plugins-ugly chromium systemd libdnnl-dev)
if [ "${GEOMETRYD_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    log "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# 2. The venv (Python 3.11 preferred: av 18 / aiortc 1.16 / torch 2.13 CPU are verified there).
PY=${GEOMETRYD_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do command -v "$c" >/dev/null && { PY=$c; break; }; done
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
mkdir -p "$STAMP_DIR"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
want=$(cat requirements.txt requirements-test.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP_DIR/pip" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages (torch CPU build, jittor, PyAV, aiortc, aiomqtt, test references)"
  "${PIP[@]}" -r requirements.txt -r requirements-test.txt
  "${PIP[@]}" --no-deps -r requirements-nodeps.txt
  "${PIP[@]}" --no-deps -e . >/dev/null 2>&1 || "${PIP[@]}" --no-deps -e .
  echo "$want" > "$STAMP_DIR/pip"
fi

# 3. On a GPU box (usable CUDA driver): stock Jittor 1.3.11 does not build on CUDA 13 / cuDNN 9 / CCCL 3;
#    apply the versioned, idempotent, reversible compatibility patches before the first import.
if "$VENV/bin/python" -c "from daemon.jittor_env import detect_cuda; raise SystemExit(0 if detect_cuda().driver_ok else 1)"; then
  log "CUDA device found: applying the Jittor CUDA 13 compatibility patches (geometryd doctor --fix)"
  "$VENV/bin/python" -m daemon.commands.doctor --fix >&2 || log "doctor --fix reported a problem (see above)"
fi

# 4. First Jittor import: compiles Jittor's core into ~/.cache/jittor (keyed by venv path).
if [ ! -f "$STAMP_DIR/jittor" ]; then
  log "first Jittor import (compiles its core once; a few minutes on 2 cores)"
  "$VENV/bin/python" -c "from daemon.jittor_env import import_jittor; jt = import_jittor(); assert (jt.array([1.0, 2.0]) * 2).numpy().tolist() == [2.0, 4.0]"
  touch "$STAMP_DIR/jittor"
fi
# 5. The CPU backend of the networks: Jittor's oneDNN ops built against libdnnl (once, ~30 s; cached).
if [ ! -f "$STAMP_DIR/cpu-conv" ]; then
  log "building the oneDNN CPU convolution ops"
  "$VENV/bin/python" -c "from daemon.model.conv_cpu import backend; print('[setup] CPU conv backend: %s (%s)' % backend())" >&2
  touch "$STAMP_DIR/cpu-conv"
fi
log "ready: $VENV"
