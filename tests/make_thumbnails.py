"""Writes example_workflows/<name>.jpg: a screenshot of each example workflow's graph as ComfyUI's frontend
draws it. Run by hand after changing a workflow (not a test, not run by CI):

    COMFYUI_PATH=~/src/ComfyUI COMFYUI_PYTHON=~/comfy-venv/bin/python python tests/make_thumbnails.py [names...]

Needs playwright (pip) and Chromium (CHROMIUM, default /usr/bin/chromium: Debian's ``chromium`` package). It starts
ComfyUI's server on 127.0.0.1 with a temporary base folder (the pack linked into custom_nodes/, empty files under
the model names the workflows use, so the loaders show their values), loads each workflow with the frontend's
``app.loadGraphData``, fits the graph into a 1600x900 view and saves the canvas, cropped to the graph, as a JPEG.
"""

import argparse
import glob
import io
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from comfyui_server import start_server  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "CLIPVisionLoader": "clip_vision",
                 "IDA_LoadIDAdapter": "idadapter", "IDA_LoadAdaFace": "adaface", "IDA_LoadE4EEncoder": "wplus",
                 "IDA_LoadWPlusAdapter": "wplus"}
SIZE = (1600, 900)
MARGIN = 24

FIT_JS = """async (wf) => {
  const app = window.app;
  await app.loadGraphData(wf, true, false, null);
  const canvas = app.canvas;
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of app.graph.nodes) {
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const [w, h] = [canvas.canvas.clientWidth, canvas.canvas.clientHeight];
  const margin = 30;
  const scale = Math.min((w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0), 1.25);
  canvas.ds.scale = scale;
  canvas.ds.offset = [(w / scale - (x1 - x0)) / 2 - x0, (h / scale - (y1 - y0)) / 2 - y0];
  canvas.deselectAll?.();
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const box = [(x0 + canvas.ds.offset[0]) * scale, (y0 + canvas.ds.offset[1]) * scale,
               (x1 + canvas.ds.offset[0]) * scale, (y1 + canvas.ds.offset[1]) * scale];
  return {box, ratio: window.devicePixelRatio};
}"""


def prepare_base(base, workflows):
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(REPO, os.path.join(base, "custom_nodes", "comfyui-idadapter"))
    os.makedirs(os.path.join(base, "input"))
    os.makedirs(os.path.join(base, "user", "default"))
    with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
        json.dump({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                   "Comfy.Graph.CanvasMenu": False}, f)
    for path in workflows:
        with open(path) as f:
            wf = json.load(f)
        for node in wf["nodes"]:
            name = (node.get("widgets_values") or [None])[0]
            if node["type"] in MODEL_FOLDERS:
                target = os.path.join(base, "models", MODEL_FOLDERS[node["type"]], name)
            elif node["type"] == "IDA_LoadInsightFace":
                target = os.path.join(base, "models", "insightface", "models", name, "placeholder.onnx")
            else:  # LoadImage: no file, so the node shows no preview of a stand-in picture
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "wb").close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all in example_workflows/)")
    args = parser.parse_args()
    workflows = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
    if args.names:
        workflows = [w for w in workflows if os.path.basename(w)[:-5] in args.names]
    comfy = os.environ["COMFYUI_PATH"]
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as base:
        prepare_base(base, workflows)
        server = start_server(comfy, base, python=os.environ.get("COMFYUI_PYTHON"))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                    args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run"])
                page = browser.new_page(viewport={"width": SIZE[0], "height": SIZE[1]})
                page.goto(server.url, timeout=120_000)
                page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
                for path in workflows:
                    with open(path) as f:
                        fit = page.evaluate(FIT_JS, json.load(f))
                    png = page.locator("#graph-canvas").screenshot()
                    image = Image.open(io.BytesIO(png)).convert("RGB")
                    x0, y0, x1, y1 = (v * fit["ratio"] for v in fit["box"])  # the graph plus a margin
                    image = image.crop((max(0, int(x0) - MARGIN), max(0, int(y0) - MARGIN),
                                        min(image.width, int(x1) + MARGIN), min(image.height, int(y1) + MARGIN)))
                    out = path[:-5] + ".jpg"
                    image.save(out, quality=88, optimize=True)
                    print(f"{out}: {image.size[0]}x{image.size[1]}")
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
