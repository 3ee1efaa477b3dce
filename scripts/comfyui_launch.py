"""Start a local ComfyUI for QVGen's integration tests: `python scripts/comfyui_launch.py COMFYUI_PATH [ComfyUI args]`.

Runs ComfyUI's `main.py` in this interpreter. One workaround is applied first: a torchvision wheel
built for another torch (e.g. PyPI's torchvision beside a CPU-only torch) fails to import with
"operator torchvision::nms does not exist", and ComfyUI imports torchvision at start-up. When that
happens the two missing operator schemas are declared and the import retried; nothing QVGen or the
tests use needs those operators. A working torchvision is left alone.
"""

from __future__ import annotations

import os
import runpy
import sys


def _torchvision_workaround() -> None:
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_workaround.lib = lib  # keep the definitions alive
        import torchvision  # noqa: F401
    except ImportError:
        pass  # no torchvision at all: ComfyUI reports that itself


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    root = os.path.abspath(sys.argv[1])
    if not os.path.isfile(os.path.join(root, "main.py")):
        raise SystemExit(f"{root}: not a ComfyUI checkout (no main.py)")
    _torchvision_workaround()
    sys.argv = [os.path.join(root, "main.py"), *sys.argv[2:]]
    sys.path.insert(0, root)
    os.chdir(root)
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
