#!/usr/bin/env bash
# Set up a local ComfyUI for QVGen's integration tests (nothing here is committed to this repo):
#
#   scripts/comfyui_setup.sh [COMFYUI_DIR] [VENV_DIR]
#   COMFYUI_PATH=COMFYUI_DIR COMFYUI_PYTHON=VENV_DIR/bin/python VENV_DIR/bin/python -m pytest tests/test_comfyui_integration.py
#
# COMFYUI_DIR (default ../ComfyUI-qvgen-tests) is cloned at COMFYUI_REF when missing (or reuse a
# checkout you have); VENV_DIR (default COMFYUI_DIR/.venv) gets torch (TORCH_SPEC, default the
# CPU build), ComfyUI's requirements and what the tests need (diffusers to make the tiny models,
# pytest). On CPU-only machines PyPI's torchvision may not match the CPU torch; the tests start
# ComfyUI through scripts/comfyui_launch.py, which works around that.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
comfy="${1:-$here/../ComfyUI-qvgen-tests}"
venv="${2:-$comfy/.venv}"
ref="${COMFYUI_REF:-v0.3.64}"
torch_spec="${TORCH_SPEC:-torch}"
torch_index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

case "$(cd "$(dirname "$comfy")" 2>/dev/null && pwd)/" in
  "$here"/*) echo "refusing to put ComfyUI inside this repository: $comfy" >&2; exit 1 ;;
esac
if [ ! -f "$comfy/main.py" ]; then
  git clone --depth 1 --branch "$ref" https://github.com/comfyanonymous/ComfyUI "$comfy"
fi
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
if [ -n "$torch_index" ]; then
  "$py" -m pip install -q "$torch_spec" torchvision --index-url "$torch_index" \
    || "$py" -m pip install -q "$torch_spec"
else
  "$py" -m pip install -q "$torch_spec"
fi
grep -v -E '^(torch|torchvision|torchaudio)([<>=!~ ].*)?$' "$comfy/requirements.txt" > "$venv/comfy-requirements.txt"
"$py" -m pip install -q -r "$venv/comfy-requirements.txt" requests
"$py" -m pip install -q -r "$here/requirements.txt" diffusers accelerate pytest
echo "ComfyUI: $comfy"
echo "run:  COMFYUI_PATH=$comfy COMFYUI_PYTHON=$py $py -m pytest $here/tests/test_comfyui_integration.py"
