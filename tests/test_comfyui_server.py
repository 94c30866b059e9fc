r"""The example workflows on a live ComfyUI server (COMFYUI_PATH): queued over HTTP in API format, and loaded by
ComfyUI's real frontend in a headless Chromium.

One server per module, started on 127.0.0.1 with ``--base-directory`` at a temporary folder: the pack linked
into custom_nodes/, the tiny random SD1.5-shaped checkpoint, CLIP vision file, IDAdapter and insightface pack
of tests/comfyui_checks.py. The workflows name real models (an SD2.1 checkpoint, ViT-H/14, antelopev2, ...):
the models tree gets symlinks under exactly those names that point at the tiny stand-ins (``STAND_INS``), so
the workflow files are queued with their own model names. To keep a CPU run short, the converted prompts
sample 3 steps at 64x64 (``FAST``); everything else is the workflow's.

The browser tests need playwright (pip) and Chromium at CHROMIUM (default /usr/bin/chromium, Debian's
``chromium`` package); they are skipped otherwise. They load every workflow in two frontends: ``pinned``, the one
the ComfyUI checkout requires (its installed comfyui-frontend-package), served by the module's server; and
``newest``, the frontend whose static folder COMFYUI_FRONTEND_ROOT names (e.g. the newest comfyui-frontend-package,
installed into a folder of its own so that the checkout keeps its pinned one), served by a second server on the
same models with ``--front-end-root`` and a fresh user folder. Without COMFYUI_FRONTEND_ROOT the ``newest`` tests
are skipped with that reason. Both frontends, e.g.::

    apt-get install chromium
    pip install --no-deps --target ~/frontends/1.58.1 comfyui-frontend-package==1.58.1
    COMFYUI_PATH=~/src/ComfyUI COMFYUI_PYTHON=~/comfy-venv/bin/python \
    COMFYUI_FRONTEND_ROOT=~/frontends/1.58.1/comfyui_frontend_package/static ./dev test tests/test_comfyui_server.py
"""

import contextlib
import copy
import glob
import json
import os
import shutil
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_server import start_server, ui_to_api, widget_layout
from test_comfyui import COMFYUI_PATH, REPO, make_work_dir, needs_comfyui, run_check
from tiny_face_models import make_pack

pytestmark = needs_comfyui

WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
# loader node type -> (models subfolder, the tiny stand-in made by the fixture) for the name its first widget holds
STAND_INS = {"CheckpointLoaderSimple": ("checkpoints", "tiny_sd15.safetensors"),
             "CLIPVisionLoader": ("clip_vision", "vit_l.safetensors"),
             "IDA_LoadIDAdapter": ("idadapter", "tiny.safetensors"),
             "IDA_LoadAdaFace": ("adaface", "tiny_adaface.safetensors"),
             "IDA_LoadE4EEncoder": ("wplus", "tiny_e4e_official.pt"),
             "IDA_LoadWPlusAdapter": ("wplus", "tiny_wplus.safetensors")}
FAST = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 3}}
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FRONTEND_ROOT = os.environ.get("COMFYUI_FRONTEND_ROOT")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _load(path):
    with open(path) as f:
        return json.load(f)


def _provide_workflow_models(work):
    """Symlinks under every model name the example workflows use, pointing at the tiny stand-ins."""
    models = work / "models"
    for path in WORKFLOWS:
        for node in _load(path)["nodes"]:
            if node["type"] in STAND_INS:
                folder, stand_in = STAND_INS[node["type"]]
                link = models / folder / node["widgets_values"][0]
                if not link.exists():
                    os.symlink(models / folder / stand_in, link)
            elif node["type"] == "IDA_LoadInsightFace":
                pack = node["widgets_values"][0]
                if not (models / "insightface" / "models" / pack).exists():
                    make_pack(str(models / "insightface"), pack)


def _bad_adapter_files(work):
    folder = work / "models" / "idadapter"
    # an IP-Adapter-style file (no format metadata) where an IDAdapter is expected
    save_file({"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)},
              str(folder / "ip-adapter_sd15.safetensors"))
    data = (folder / "tiny.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])


def _fresh_user_folder(folder):
    (folder / "default").mkdir(parents=True)
    # no first-run template browser over the canvas
    (folder / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = make_work_dir(tmp_path_factory.mktemp("comfy_server") / "base")
    run_check(work, "make_sd15_assets", {})
    run_check(work, "make_idadapters", {})
    run_check(work, "make_adafaces", {})
    run_check(work, "make_wplus_assets", {})
    _provide_workflow_models(work)
    _bad_adapter_files(work)
    _fresh_user_folder(work / "user")
    srv = start_server(COMFYUI_PATH, str(work), python=os.environ.get("COMFYUI_PYTHON"))
    srv.work = work
    srv.object_info = srv.get("/object_info", timeout=120)
    yield srv
    srv.stop()


def api_prompt(server, path):
    prompt = ui_to_api(_load(path), server.object_info)
    for node in prompt.values():
        node["inputs"].update(FAST.get(node["class_type"], {}))
    return prompt


def output_images(server, entry):
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    for img in images:
        assert (server.work / img["type"] / img["subfolder"] / img["filename"]).is_file(), img
    return images


def errors(entry):
    return [data for event, data in entry["status"]["messages"] if event == "execution_error"]


def test_converter_uses_the_servers_widget_layout(server):
    prompt = ui_to_api(_load(os.path.join(REPO, "example_workflows", "idadapter_portrait.json")), server.object_info)
    assert prompt["3"] == {"class_type": "LoadImage", "inputs": {"image": "face.png"}}  # upload button value dropped
    ks = prompt["12"]["inputs"]
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"]) == (0, 30, 7.0, "dpmpp_2m")  # after "fixed"
    assert ks["model"] == ["8", 0] and ks["latent_image"] == ["11", 0]
    assert prompt["7"]["inputs"]["seed"] == 0 and prompt["7"]["inputs"]["face_embeds"] == ["5", 0]


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_example_workflow_runs_on_the_server(server, path):
    entry = server.run(api_prompt(server, path))
    assert entry["status"]["status_str"] == "success", errors(entry) or server.log_tail()
    assert output_images(server, entry)


def _portrait_with(server, **changes):
    prompt = api_prompt(server, os.path.join(REPO, "example_workflows", "idadapter_portrait.json"))
    for node_id, inputs in changes.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def _adaface_with(server, **inputs):
    prompt = api_prompt(server, os.path.join(REPO, "example_workflows", "adaface_portrait.json"))
    for node in prompt.values():
        node["inputs"].update({k: v for k, v in inputs.items() if k in node["inputs"]})
    return prompt


def test_bad_inputs_fail_with_the_packs_message_and_the_fixed_graph_runs(server):
    face = api_prompt(server, os.path.join(REPO, "example_workflows", "face_embeds.json"))
    no_face = copy.deepcopy(face)
    no_face["1"]["inputs"]["image"] = "empty.png"
    cases = [
        (no_face, face, "IDA_FaceEmbed", "no face"),
        (_portrait_with(server, **{"6": {"file": "ip-adapter_sd15.safetensors"}}), _portrait_with(server),
         "IDA_LoadIDAdapter", "has format None, expected 'idadapter/1'"),
        (_portrait_with(server, **{"6": {"file": "truncated.safetensors"}}), _portrait_with(server),
         "IDA_LoadIDAdapter", "is not a readable safetensors file"),
        (_adaface_with(server, inverter="inverter_only.safetensors"), _adaface_with(server),
         "IDA_LoadAdaFace", "holds no Arc2Face ID encoder: put Arc2Face's 'encoder' folder"),
        (_adaface_with(server, placeholder="z1"), _adaface_with(server),
         "IDA_AdaFaceEncode", "must be one word of letters"),
    ]
    for bad, fixed, node_type, message in cases:
        entry = server.run(bad)
        assert entry["status"]["status_str"] == "error", entry["status"]
        (err,) = errors(entry)
        assert err["node_type"] == node_type and message in err["exception_message"], err
        entry = server.run(fixed)
        assert entry["status"]["status_str"] == "success", errors(entry) or server.log_tail()
        assert output_images(server, entry)


def _image_pixels(server, entry):
    (image,) = output_images(server, entry)
    return torch.from_numpy(np.array(Image.open(server.work / image["type"] / image["subfolder"] / image["filename"])))


def test_saved_adaface_embedding_works_in_a_plain_prompt(server):
    """Save AdaFace Embedding over HTTP, then a graph with only ComfyUI's CLIP Text Encode and embedding:<name>
    samples the very image the AdaFace Encode graph samples."""
    prompt = api_prompt(server, os.path.join(REPO, "example_workflows", "adaface_portrait.json"))
    encode_id = next(k for k, node in prompt.items() if node["class_type"] == "IDA_AdaFaceEncode")
    encode = prompt[encode_id]["inputs"]
    with_save = copy.deepcopy(prompt)
    with_save["save_embedding"] = {"class_type": "IDA_SaveAdaFaceEmbedding", "inputs": {
        "adaface": encode["adaface"], "face_embeds": encode["face_embeds"], "strength": encode["strength"],
        "name": "served_person", "overwrite": True}}
    entry = server.run(with_save)
    assert entry["status"]["status_str"] == "success", errors(entry) or server.log_tail()
    assert (server.work / "models" / "embeddings" / "served_person.safetensors").is_file()
    plain = copy.deepcopy(prompt)
    text = encode["text"].replace("z,", "embedding:served_person,", 1)
    assert text != encode["text"]
    plain[encode_id] = {"class_type": "CLIPTextEncode", "inputs": {"clip": encode["clip"], "text": text}}
    plain_entry = server.run(plain)
    assert plain_entry["status"]["status_str"] == "success", errors(plain_entry) or server.log_tail()
    assert torch.equal(_image_pixels(server, plain_entry), _image_pixels(server, entry))
    # and the identity shows in the image: the prompt with a literal "z" samples another one
    plain[encode_id]["inputs"]["text"] = encode["text"]
    literal = server.run(plain)
    assert not torch.equal(_image_pixels(server, literal), _image_pixels(server, entry))


# ---------------------------------------------------------------------------------------------------------
# the real frontend, in Chromium

def _browser_missing():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never `playwright install`: Chromium comes from apt)"
    if not shutil.which(CHROMIUM) and not os.path.isfile(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    return None


# frontend 1.27.10 itself throws this once while it registers its settings on a fresh user folder
# (Comfy.Canvas.NavigationMode's onChange reads a canvas that is not there yet), before any workflow is loaded
KNOWN_STARTUP_ERRORS = {"1.27.10": ("Cannot read properties of undefined (reading 'id')", "addSetting")}


def open_frontend(playwright, server, width=1600, height=1000):
    """A page with ComfyUI's frontend ready (window.app set up); collects page errors in ``page.errors``, and the
    frontend's version in ``page.version``. Fails on a start-up error other than the version's known one."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(f"{exc}\n{exc.stack}"))
    page.goto(server.url, timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
    page.version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    message, where = KNOWN_STARTUP_ERRORS.get(page.version, (None, None))
    unknown = [e for e in page.errors if not (e.startswith(message + "\n") and where in e)] if message else page.errors
    page.errors = []
    if unknown:
        browser.close()
        raise AssertionError(f"frontend {page.version} failed while starting:\n" + "\n".join(unknown))
    return browser, page


@contextlib.contextmanager
def other_frontend_server(server, front_end_root):
    """A second server on ``server``'s base folder (same models and inputs) serving the frontend at
    ``front_end_root``, with a fresh user folder of its own."""
    index = os.path.join(front_end_root, "index.html")
    assert os.path.isfile(index), f"COMFYUI_FRONTEND_ROOT={front_end_root} holds no index.html"
    user = server.work / "user_other_frontend"
    shutil.rmtree(user, ignore_errors=True)
    _fresh_user_folder(user)
    other = start_server(COMFYUI_PATH, str(server.work), python=os.environ.get("COMFYUI_PYTHON"),
                         front_end_root=front_end_root, user_directory=user, log_name="server_other_frontend.log")
    try:
        with urllib.request.urlopen(other.url + "/", timeout=30) as reply, open(index, "rb") as f:
            assert reply.read() == f.read(), f"the server does not serve {index}"
        yield other
    finally:
        other.stop()


LOAD_JS = """async (wf) => {
  const app = window.app;
  const registered = window.LiteGraph?.registered_node_types ?? app.graph.constructor.registered_node_types ?? {};
  const missing = wf.nodes.map(n => n.type).filter(t => !(t in registered));
  await app.loadGraphData(wf, true, true, null);
  await new Promise(r => requestAnimationFrame(() => r()));
  const saved = app.graph.serialize();
  const nodes = app.graph.nodes.map(n => ({
    id: n.id, type: n.type, has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value})),
  }));
  return {missing, nodes, saved: saved.nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values}))};
}"""

# a notice over the canvas: 1.27.10's dialogs (e.g. "Some Nodes Are Missing"), 1.58's status toasts
# (e.g. "Missing node: ...")
NOTICES_JS = """() => [...document.querySelectorAll('.p-dialog, [role=dialog], [role=alertdialog], [role=status]')]
  .map(d => d.innerText.trim().slice(0, 300)).filter(t => t)"""

NEW_NODE_JS = """(type) => {
  const node = window.LiteGraph.createNode(type);
  return (node.widgets || []).map(w => ({name: w.name, value: w.value}));
}"""


@pytest.fixture(scope="module", params=["pinned", "newest"])
def frontend(request, server):
    """A page of the checkout's own frontend (pinned) or of the one at COMFYUI_FRONTEND_ROOT (newest)."""
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    if request.param == "newest" and not FRONTEND_ROOT:
        pytest.skip("COMFYUI_FRONTEND_ROOT is not set (point it at another frontend's static folder, e.g. "
                    "comfyui_frontend_package/static of the newest comfyui-frontend-package installed apart)")
    from playwright.sync_api import sync_playwright

    with contextlib.ExitStack() as stack:
        srv = server if request.param == "pinned" else stack.enter_context(other_frontend_server(server, FRONTEND_ROOT))
        browser, page = open_frontend(stack.enter_context(sync_playwright()), srv)
        stack.callback(browser.close)
        page.notices_before = page.evaluate(NOTICES_JS)
        yield page


def load_in_frontend(page, wf):
    """Loads a UI-format workflow; fails on a page error or a new notice (a missing node, a bad value)."""
    result = page.evaluate(LOAD_JS, wf)
    assert not page.errors, (page.version, page.errors)
    notices = [n for n in page.evaluate(NOTICES_JS) if n not in page.notices_before]
    assert notices == [], (page.version, notices)
    return result


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_example_workflow_loads_cleanly_in_the_frontend(server, frontend, path):
    wf = _load(path)
    result = load_in_frontend(frontend, wf)
    assert result["missing"] == [], result["missing"]
    # as saved: 1.58 keeps the live nodes' ids as strings, its saved workflow has the numbers
    assert sorted((n["id"], n["type"]) for n in result["saved"]) == sorted((n["id"], n["type"]) for n in wf["nodes"])
    assert len(result["nodes"]) == len(wf["nodes"]) and not [n for n in result["nodes"] if n["has_errors"]], result
    for node in result["nodes"]:  # one widget per widget input of the node's definition, in its order
        layout = [name for name, _spec, _extra in widget_layout(server.object_info[node["type"]])]
        assert [w["name"] for w in node["widgets"] if w["name"] in layout] == layout, (node["type"], node["widgets"])
    loaded = {n["id"]: n["widgets_values"] or [] for n in result["saved"]}
    for node in wf["nodes"]:  # a value the frontend rejects, rewrites or adds (e.g. a control widget) shows here
        assert loaded[node["id"]] == node.get("widgets_values", []), (node["type"], loaded[node["id"]])
    for node in result["nodes"]:  # no pack node's seed re-draws on each queue
        controls = [w for w in node["widgets"] if w["name"] == "control_after_generate"]
        assert all(w["value"] == "fixed" for w in controls), (node["type"], controls)


def test_workflow_saved_with_a_seed_control_still_loads(frontend):
    """Saved by an earlier version, MFF Embed stored a control value after its seed: the node loads with its values."""
    wf = _load(os.path.join(REPO, "example_workflows", "idadapter_portrait.json"))
    (mff,) = [n for n in wf["nodes"] if n["type"] == "IDA_IDAdapterMFFEmbed"]
    mff["widgets_values"] = [2, False, 1234, "randomize"]
    result = load_in_frontend(frontend, wf)
    assert result["missing"] == []
    (loaded,) = [n for n in result["saved"] if n["id"] == mff["id"]]
    assert loaded["widgets_values"] == [2, False, 1234]


def test_new_mff_embed_node_keeps_its_seed(frontend):
    """Added from the node menu (no stored values), IDAdapter MFF Embed's seed must not re-draw on each queue."""
    widgets = frontend.evaluate(NEW_NODE_JS, "IDA_IDAdapterMFFEmbed")
    names = [w["name"] for w in widgets]
    assert "seed" in names, widgets
    assert all(w["value"] != "randomize" for w in widgets), widgets


def test_the_load_check_sees_a_missing_node(frontend):
    """The check above is not blind in this frontend: a node type the server lacks is caught (and noticed)."""
    wf = _load(os.path.join(REPO, "example_workflows", "face_embeds.json"))
    wf["nodes"][0]["type"] = "IDA_NoSuchNode"
    result = frontend.evaluate(LOAD_JS, wf)
    assert result["missing"] == ["IDA_NoSuchNode"]
    assert [n["type"] for n in result["nodes"] if n["has_errors"]] == ["IDA_NoSuchNode"]
    frontend.wait_for_function(f"() => ({NOTICES_JS})().some(t => t.includes('IDA_NoSuchNode'))", timeout=30_000)
