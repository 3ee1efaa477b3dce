#!/usr/bin/env bash
# A real ComfyUI for QVGen's integration tests, from the source snapshots in ../shared/comfyui/.
#
#   scripts/comfyui_setup.sh VERSION...          set up .comfyui/VERSION/ for each VERSION
#   scripts/comfyui_setup.sh --test VERSION...   ... then run the ComfyUI tests (integration, memory) against it
#
# VERSION is a snapshot `comfyui-VERSION.tar.gz` in COMFYUI_SNAPSHOTS (default ../shared/comfyui next
# to this repository): 0.29.0 (current upstream) and 0.3.64 (the oldest release the pack claims).
# A VERSION whose snapshot is absent is skipped with a message, so this runs on any machine.
#
# What it makes, all under the ignored .comfyui/VERSION/ (nothing of ComfyUI is ever committed):
#   ComfyUI/     the snapshot, with this repository symlinked as custom_nodes/QVGen (a plain clone:
#                QVGen is never pip-installed into ComfyUI's environment; the tests link it again
#                into their own temporary base directory);
#   venv/        ComfyUI's own environment: the CPU torch, ComfyUI's requirements.txt (without its
#                torch lines, under a constraint pinning that torch) and the pack's requirements.txt;
#   test-site/   what only the test process needs (pytest, diffusers for the tiny reference models),
#                on pytest's sys.path and never on that of the ComfyUI server it starts.
# PyPI's torchvision is a CUDA build that does not import beside the CPU torch, and 0.29 imports
# torchaudio at start-up: the venv gets the shim and the import-only torchaudio stub from the
# snapshot folder (its README.md says why). Nothing on the Wan path uses either.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
snapshots="${COMFYUI_SNAPSHOTS:-$here/../shared/comfyui}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
run_tests=0
if [ "${1:-}" = "--test" ]; then run_tests=1; shift; fi
[ $# -gt 0 ] || { sed -n '2,5p' "$0" >&2; exit 2; }

log() { echo "[comfyui $1] $2"; }

setup() {  # VERSION DEST
  local ver="$1" dest="$2" archive="$snapshots/comfyui-$1.tar.gz"
  mkdir -p "$dest"
  echo '*' > "$here/.comfyui/.gitignore"
  if [ ! -f "$dest/ComfyUI/main.py" ]; then
    tar xzf "$archive" -C "$dest"
  fi
  ln -sfn "$here" "$dest/ComfyUI/custom_nodes/QVGen"
  local py="$dest/venv/bin/python"
  [ -x "$py" ] || python3 -m venv "$dest/venv"
  echo "$torch_spec" > "$dest/constraints.txt"
  # --no-compile: byte-compiling every installed file costs more CPU than compiling what is imported
  pip_install() { "$py" -m pip install -q --no-compile "$@"; }
  pip_install "$torch_spec"
  grep -v -E '^(torch|torchvision|torchaudio)([<>=!~ ].*)?$' "$dest/ComfyUI/requirements.txt" > "$dest/requirements.txt"
  # 0.3.64 imports requests without listing it
  pip_install -c "$dest/constraints.txt" -r "$dest/requirements.txt" -r "$here/requirements.txt" requests
  local site
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp "$snapshots/tv_cpu_shim.py" "$site/qvgen_ci_tv_cpu_shim.py"
  echo "import qvgen_ci_tv_cpu_shim" > "$site/qvgen_ci_tv_cpu_shim.pth"
  rm -rf "$dest/stubs" && mkdir -p "$dest/stubs" && cp -r "$snapshots/stubs/torchaudio" "$dest/stubs/"
  "$py" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torchaudio") is not None)' \
    && echo "$dest/stubs" > "$site/qvgen_ci_torchaudio_stub.pth"
  pip_install --no-deps --target "$dest/test-site" --upgrade \
    pytest pluggy iniconfig diffusers accelerate importlib_metadata zipp regex
  if "$py" -I -c 'import qvgen' 2>/dev/null; then
    log "$ver" "qvgen is importable in ComfyUI's venv: the pack would not be tested as a plain clone" >&2
    exit 1
  fi
}

for ver in "$@"; do
  dest="$here/.comfyui/$ver"
  if [ ! -f "$snapshots/comfyui-$ver.tar.gz" ]; then
    log "$ver" "skipped: no snapshot $snapshots/comfyui-$ver.tar.gz"
    continue
  fi
  t0=$SECONDS
  setup "$ver" "$dest"
  log "$ver" "set up in $((SECONDS - t0))s: COMFYUI_PATH=$dest/ComfyUI COMFYUI_PYTHON=$dest/venv/bin/python"
  if [ "$run_tests" = 1 ]; then
    t0=$SECONDS
    # test-site goes on pytest's sys.path only: the ComfyUI server the tests start must not see it
    (cd "$here" && COMFYUI_PATH="$dest/ComfyUI" COMFYUI_PYTHON="$dest/venv/bin/python" HF_HUB_OFFLINE=1 \
      "$dest/venv/bin/python" -c 'import sys; sys.path[:0] = [sys.argv.pop(1)]; import pytest; sys.exit(pytest.main())' \
      "$dest/test-site" -p no:cacheprovider -m comfyui tests/test_comfyui_integration.py tests/test_comfyui_memory.py)
    log "$ver" "integration tests passed in $((SECONDS - t0))s"
  fi
done
