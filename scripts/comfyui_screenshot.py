"""Screenshot a workflow in a running ComfyUI's web UI (headless Chromium, via Playwright).

    python scripts/comfyui_screenshot.py http://127.0.0.1:8188 workflows/x.json docs/images/x.png [--size 1920x1080]

Needs `pip install playwright` and a Chromium (`CHROMIUM`, default /usr/bin/chromium; Playwright's
own browser download is not used). Loads the workflow with the frontend's `app.loadGraphData`,
closes dialogs (e.g. the missing-models notice when the model files are not installed), fits the
graph to the window and saves a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Fit the graph (nodes and groups) into the canvas element; LiteGraph draws text only above ~0.6 zoom,
# so choose a window large enough for the graph.
FIT_JS = """() => {
  const app = window.app, c = app.canvas, g = app.graph;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of g._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  for (const gr of (g._groups || [])) {
    const b = gr._bounding || gr.bounding;
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
  const el = c.canvas, W = el.clientWidth, H = el.clientHeight, m = 30;
  const s = Math.min((W - 2 * m) / (x1 - x0), (H - 2 * m) / (y1 - y0));
  c.ds.scale = s;
  c.ds.offset = [(W - s * (x1 - x0)) / 2 / s - x0, (H - s * (y1 - y0)) / 2 / s - y0];
  c.setDirty(true, true); c.draw(true, true);
  return s;
}"""


# Hide the minimap and the "missing model" outlines (the model files need not be installed here).
CLEAN_JS = """async () => {
  const app = window.app;
  try { await app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {}
  for (const n of app.graph._nodes) { n.has_errors = false; }
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("workflow", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="1920x1080")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    wf = json.loads(args.workflow.read_text())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), headless=True, args=FLAGS
        )
        page = browser.new_page(viewport={"width": w, "height": h}, device_scale_factor=1)
        page.goto(args.url, wait_until="networkidle")
        page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
        page.wait_for_timeout(1500)
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
        page.wait_for_timeout(1500)
        for _ in range(3):
            page.keyboard.press("Escape")
            page.wait_for_timeout(200)
        page.evaluate(
            """() => { document.querySelectorAll('.p-dialog-mask, .p-toast').forEach(e => e.remove());
                       const c = window.app.canvas; c.deselectAll && c.deselectAll(); }"""
        )
        page.evaluate(CLEAN_JS)
        page.evaluate(FIT_JS)
        page.wait_for_timeout(1000)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
