#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), from anywhere: downloads the cp312 manylinux wheels that
# bench/gpu/run.sh installs on the GPU machine (which has no registry access) into <repo>/.whl/.
#
# What the GPU image lacks (../shared/notes/jittor-cuda13.md, .library/device/KINDS.md): Jittor (built here
# from its sdist: pure Python + C++ sources compiled on first import), astunparse (Jittor), numpy 1.26.4
# (Jittor 1.3.11 needs numpy<2; run.sh installs it with Jittor into their own --target dir so torch keeps
# the image's numpy 2), diffusers 0.42.1 + importlib_metadata (the PyTorch reference networks). The image
# already has transformers 5.x, huggingface_hub, safetensors, six, zipp, regex, filelock, pillow, tqdm.
# The folder must stay under 64 MiB (it travels with the working tree); the script checks that.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WHL="$ROOT/.whl"
PY="${PYTHON:-python3}"
mkdir -p "$WHL"
grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || grep -qx '/.whl/' "$ROOT/.gitignore" \
  || echo '/.whl/' >> "$ROOT/.git/info/exclude"

PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() {  # one pinned distribution, binary only, for CPython 3.12 x86_64
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d "$WHL" "$1"
}
dl numpy==1.26.4
dl diffusers==0.42.1
dl importlib_metadata==8.7.0
dl astunparse==1.6.3
if ! ls "$WHL"/jittor-1.3.11*.whl >/dev/null 2>&1; then
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" jittor==1.3.11 \
    || "$PY" -m pip wheel -q --no-deps -w "$WHL" jittor==1.3.11
fi
# exactly one version of each distribution (two stop the whole install on the GPU machine)
dups=$(ls "$WHL"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "prepare_wheels: several versions of: $dups (remove the extra ones from $WHL)" >&2; exit 1; }
size=$(du -sm "$WHL" | cut -f1)
ls -la "$WHL"
echo "prepare_wheels: $WHL holds ${size} MiB"
[ "$size" -lt 60 ] || { echo "prepare_wheels: over the 64 MiB carry limit" >&2; exit 1; }
