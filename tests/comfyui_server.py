"""A real ComfyUI server on loopback for tests, and the UI-format -> API-format workflow conversion.

``start_server`` runs ComfyUI's ``main.py`` from COMFYUI_PATH (with COMFYUI_PYTHON) on 127.0.0.1 and a free
port, with ``--base-directory`` pointing at a work folder (custom_nodes/, models/, input/, output/, user/),
an in-memory database (nothing is written into the checkout) and its log in ``<work>/server.log``; optionally
another frontend (``front_end_root``: a folder holding a frontend's index.html, e.g. the ``static`` folder of a
``comfyui-frontend-package`` installed apart) and its own user folder (settings and saved workflows).

``ui_to_api`` converts a workflow as the frontend saves it (``nodes`` + ``links``) into the prompt that
``POST /prompt`` takes, using the server's own ``/object_info`` for the widget order, the same way the
frontend's graphToPrompt lays values out: one ``widgets_values`` entry per widget input in ``input_order``,
plus the extra entries the frontend stores for a ``control_after_generate`` widget (seed-like INTs) and for
an upload button (``image_upload`` combos).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

UI_ONLY_NODES = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
MUTED, BYPASSED = 2, 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc, url, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log_tail(self, chars=4000):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, body, timeout=30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt):
        """POST /prompt; returns the prompt id (fails with the server's node errors when it refuses it)."""
        status, reply = self.post("/prompt", {"prompt": prompt, "client_id": "idadapter-tests"})
        assert status == 200 and not reply.get("node_errors"), (status, reply)
        return reply["prompt_id"]

    def wait(self, prompt_id, timeout=600, poll=0.5):
        """Polls /history/<id> until the prompt finished (success or error); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "ComfyUI exited:\n" + self.log_tail()
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(poll)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s\n" + self.log_tail())

    def run(self, prompt, timeout=600):
        return self.wait(self.queue(prompt), timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def start_server(comfy_path, work, python=None, timeout=300, front_end_root=None, user_directory=None,
                 log_name="server.log"):
    """Starts ComfyUI's server with ``work`` as its base directory; returns once /object_info answers."""
    port = free_port()
    log_path = os.path.join(work, log_name)
    args = [python or sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--base-directory", str(work), "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
            "--preview-method", "none"]
    if front_end_root:
        args += ["--front-end-root", str(front_end_root)]
    if user_directory:
        args += ["--user-directory", str(user_directory)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("ComfyUI exited during start-up:\n" + server.log_tail())
        try:
            server.get("/object_info/KSampler", timeout=5)
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n" + server.log_tail())


# ---------------------------------------------------------------------------------------------------------
# UI format -> API format

def _is_widget(spec):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _extra_widget_values(name, spec):
    """How many values the frontend stores after this widget's own: a control_after_generate combo for INT/FLOAT
    inputs that ask for it (an INT named seed or noise_seed gets one unless it says control_after_generate:
    false) and for combos that ask for it; the upload button of image/video/audio upload combos."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    extra = 0
    control = opts.get("control_after_generate")
    if kind in ("INT", "FLOAT"):
        if control if control is not None else (kind == "INT" and name in ("seed", "noise_seed")):
            extra += 1
    elif control:
        extra += 1
    if any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload", "animated_image_upload")):
        extra += 1
    return extra


def widget_layout(node_def):
    """[(input name, spec, number of extra stored values)] for the widget inputs of a node, in stored order."""
    inputs = {**node_def["input"].get("required", {}), **node_def["input"].get("optional", {})}
    order = node_def.get("input_order") or {}
    names = list(order.get("required", [])) + list(order.get("optional", [])) if order else list(inputs)
    return [(n, inputs[n], _extra_widget_values(n, inputs[n])) for n in names if _is_widget(inputs[n])]


def ui_to_api(workflow, object_info):
    """The API-format prompt of a UI-format workflow (see the module docstring)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: (l[1], l[2]) for l in workflow["links"]}

    def source(link_id):
        """(node id, slot) feeding a link, through Reroutes and bypassed nodes; a PrimitiveNode gives its value."""
        src, slot = links[link_id]
        node = nodes[src]
        if node["type"] == "Reroute":
            return source(node["inputs"][0]["link"])
        if node.get("mode") == BYPASSED:  # the frontend passes the first input of the same type through
            kind = node["outputs"][slot]["type"]
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and inp["type"] == kind:
                    return source(inp["link"])
            return None
        if node["type"] == "PrimitiveNode":
            return ("value", node["widgets_values"][0])
        return [str(src), slot]

    prompt = {}
    for nid, node in nodes.items():
        kind = node["type"]
        if kind in UI_ONLY_NODES or kind in ("Reroute", "PrimitiveNode") or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise KeyError(f"node {nid}: type {kind} is not on this server")
        inputs = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # some frontends' nodes store widgets by name
            names = {n for n, _, _ in widget_layout(object_info[kind])}
            inputs.update({k: v for k, v in values.items() if k in names})
        else:
            i = 0
            for name, _spec, extra in widget_layout(object_info[kind]):
                if i < len(values):
                    inputs[name] = values[i]
                i += 1 + extra
            if i < len(values):
                raise ValueError(f"node {nid} ({kind}): {len(values)} widget values, the server's widgets take {i}")
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            if src is None:
                continue
            inputs[inp["name"]] = src[1] if isinstance(src, tuple) else src
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs}
    return prompt
