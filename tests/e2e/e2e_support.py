"""The real ComfyUI server (a subprocess) with this pack in custom_nodes, and the real frontend in headless Chromium.

The server is started from scripts/run_server.py's own pieces (prepare_base, server_command), so `make run` and
these tests start ComfyUI the same way; here each session gets its own base directory and a free port, and the
server is stopped with SIGTERM by PID (a background ComfyUI ignores SIGINT). Used by conftest.py's fixtures and
by export_workflow.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PACK_ROOT / "scripts"))
from comfy_root import comfy_root  # noqa: E402
from run_server import prepare_base, server_command  # noqa: E402

PACK_CATEGORY = "spectral_anchors"
PACK_FOLDER = "spectral-anchors"  # the custom_nodes entry prepare_base() links; ComfyUI names the pack after it
WORKFLOW_DIR = PACK_ROOT / "workflows"
ARTIFACTS = PACK_ROOT / "artifacts"  # git-ignored: screenshots and the server log of the last e2e run
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A fresh profile: no template dialog, no version-update popups.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Notification.ShowVersionUpdates": False}
# Loader nodes whose file combo /prompt validates against a models/ folder (the first widget of each).
MODEL_LOADERS = {
    "CheckpointLoaderSimple": "checkpoints", "CheckpointLoader": "checkpoints", "LoraLoader": "loras",
    "LoraLoaderModelOnly": "loras", "VAELoader": "vae", "ControlNetLoader": "controlnet",
    "CLIPVisionLoader": "clip_vision", "UpscaleModelLoader": "upscale_models",
}
SERVER_START_TIMEOUT = 240.0
# The newest comfyui-frontend-package from PyPI, installed (pip --target, no dependencies) for the browser tests
# of both renderers; cached under .comfy-state (git-ignored) so a second run installs nothing.
FRONTEND_PACKAGE = "comfyui-frontend-package"
LATEST_FRONTEND_DIR = PACK_ROOT / ".comfy-state" / "frontend-latest"
# Console errors of the frontend itself, not of the pack: comfyui-frontend-package 1.58.x asks every server for
# /api/jobs, which ComfyUI 0.3.75 does not have (404) and 0.8.0 answers 400 for status=cancelled; it then logs
# these. A fresh user's start-up 404s (user.css, empty userdata folders, templates index) are the app's own too.
KNOWN_CONSOLE_ERRORS = (
    re.compile(r"/api/jobs\?"),
    re.compile(r"\[Jobs API\] Error fetching jobs"),
    re.compile(r"Failed to fetch (queue|jobs)"),
    re.compile(r"JobsApiError"),
    re.compile(r"status of 404 \(Not Found\) @ \S*/(user\.css|api/userdata)"),
)
APP_READY_TIMEOUT_MS = 180_000


def pack_node_ids() -> list[str]:
    """The node ids the pack registers, from its own node_list() (tests/conftest.py loads the pack in-process)."""
    from spectral_anchors.nodes import node_list

    return sorted(node.GET_SCHEMA().node_id for node in node_list())


def workflow_paths() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


def workflow_model_files(workflow: dict) -> set[tuple[str, str]]:
    """(folder, file name) of every model file the loader nodes of a UI-format workflow name."""
    wanted = set()
    for node in workflow.get("nodes", []):
        values = node.get("widgets_values")
        folder = MODEL_LOADERS.get(node.get("type"))
        if folder and isinstance(values, list) and values and isinstance(values[0], str):
            wanted.add((folder, values[0]))
    return wanted


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ComfyServer:
    url: str
    base: Path
    log_path: Path
    process: subprocess.Popen

    def request(self, path: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, object]:
        """GET (or POST JSON when body is given); returns (status, parsed JSON or text), 4xx answers included."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get_json(self, path: str) -> object:
        status, payload = self.request(path)
        assert status == 200, f"GET {path} -> {status}: {payload}"
        return payload

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def model_file(self, folder: str, name: str, target: Path | None = None) -> Path:
        """Make models/<folder>/<name> exist: a symlink to target, or else an empty placeholder. /prompt's
        validation only checks that the name is listed, so a placeholder serves validation, never execution."""
        path = self.base / "models" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if target is not None:
            if path.is_symlink() or path.exists():
                path.unlink()
            path.symlink_to(target)
        elif not path.exists():
            path.touch()
        return path

    def queue(self, prompt: dict, workflow: dict | None = None) -> tuple[int, dict]:
        """POST an API-format prompt to /prompt as the Queue button does."""
        body = {"prompt": prompt, "client_id": "spectral-anchors-e2e"}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        return self.request("/prompt", body)

    def wait_for_history(self, prompt_id: str, timeout: float) -> dict:
        """Poll /history/<id> until the prompt has finished, successfully or not; returns its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server died:\n{self.log()[-4000:]}")
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and (entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str")):
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log()[-4000:]}")


def prepare_test_base(base: Path) -> None:
    """A base directory as run_server.prepare_base makes it, with test settings and placeholder model files
    for every file the example workflows name (so /prompt validation can pass)."""
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(SETTINGS))  # prepare_base keeps an existing settings file
    prepare_base(base)
    for path in workflow_paths():
        for folder, name in workflow_model_files(json.loads(path.read_text())):
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (base / "models" / folder / name).touch(exist_ok=True)
    # The image ComfyUI ships in its input folder, which reference_character_sdxl's Load Image names.
    example = comfy_root(prepare=True) / "input" / "example.png"
    if example.exists():
        (base / "input").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(example, base / "input" / "example.png")


def newest_frontend_version() -> str:
    """The newest comfyui-frontend-package on the package index, as the venv's pip sees it."""
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", FRONTEND_PACKAGE],
                            capture_output=True, text=True, timeout=180)
    found = re.search(rf"^{re.escape(FRONTEND_PACKAGE)} \(([^)]+)\)", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"`pip index versions {FRONTEND_PACKAGE}` failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout)[-1500:]}")
    return found.group(1)


def latest_frontend_root() -> tuple[str, Path]:
    """(version, static folder) of the newest frontend package, installed once under .comfy-state."""
    version = newest_frontend_version()
    target = LATEST_FRONTEND_DIR / version
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        staging = LATEST_FRONTEND_DIR / f".{version}.partial"
        if staging.exists():
            subprocess.run(["rm", "-rf", str(staging)], check=True)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                                 str(staging), f"{FRONTEND_PACKAGE}=={version}"],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"pip install {FRONTEND_PACKAGE}=={version} failed: {result.stderr[-1500:]}")
        if target.exists():
            subprocess.run(["rm", "-rf", str(target)], check=True)
        staging.rename(target)  # only a complete install is ever found at target
    return version, static


def start_server(base: Path, front_end_root: Path | None = None) -> ComfyServer:
    """Start ComfyUI (CPU) on a free loopback port with base as its base directory; wait until it answers.
    front_end_root serves another frontend build than the installed comfyui-frontend-package."""
    prepare_test_base(base)
    port = free_port()
    root = comfy_root(prepare=True)
    command = server_command(root, base, port, gpu=False)
    if front_end_root is not None:
        command += ["--front-end-root", str(front_end_root)]
    log_path = base / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=root, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log_path, process)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {process.returncode} during start-up:\n{server.log()[-6000:]}")
            try:
                if server.request("/system_stats", timeout=5)[0] == 200:
                    return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer within {SERVER_START_TIMEOUT:.0f} s:\n"
                                   f"{server.log()[-6000:]}")
            time.sleep(0.25)
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: ComfyServer) -> None:
    """SIGTERM by PID, then wait; SIGKILL only if it does not stop within 30 s."""
    process = server.process
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


# ---------------------------------------------------------------- browser


def is_loopback(url: str) -> bool:
    parsed = urllib.parse.urlparse(url)
    return parsed.scheme in ("data", "blob") or parsed.hostname in ("127.0.0.1", "localhost", "::1")


@dataclass
class AppPage:
    """One headless-Chromium page on the real frontend, with what went wrong in it recorded."""

    page: object
    server: ComfyServer
    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def evaluate(self, script: str, arg: object = None) -> object:
        return self.page.evaluate(script, arg)

    def take_errors(self) -> list[str]:
        taken = list(self.errors)
        self.errors.clear()
        return taken

    def take_unknown_errors(self) -> list[str]:
        """The errors recorded since the last take, without KNOWN_CONSOLE_ERRORS (the frontend's own noise)."""
        return [error for error in self.take_errors()
                if not any(pattern.search(error) for pattern in KNOWN_CONSOLE_ERRORS)]

    def screenshot(self, name: str, **options: object) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        self.page.screenshot(path=str(path), **options)
        return path


@dataclass
class RenderedPage:
    """An AppPage in one renderer of one frontend (see conftest.rendered_page)."""

    app: AppPage
    frontend: str  # "pinned" or "latest"
    version: str  # the frontend's own version
    vue: bool  # Comfy.VueNodes.Enabled

    @property
    def name(self) -> str:
        return f"{self.version}-{'vue' if self.vue else 'classic'}"


def launch_chromium(playwright: object, profile_dir: Path) -> object:
    """Chromium from the system (never a Playwright download) with ENVIRONMENT.md's flags, on a fresh profile."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium chromium-driver)")
    # A persistent context on a fresh directory is the fresh --user-data-dir the flags call for.
    context = playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1600, "height": 1000}, service_workers="block")
    # The "try Nodes 2.0" banner would cover the top of every screenshot; the frontend keeps its dismissal here.
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    return context


def open_app(context: object, server: ComfyServer) -> AppPage:
    """A new page on the frontend, every non-loopback request aborted; returns once the app is usable."""
    page = context.new_page()
    app_page = AppPage(page, server)

    def route(route_request: object) -> None:
        url = route_request.request.url
        if is_loopback(url):
            route_request.continue_()
        else:
            app_page.blocked.append(url)
            route_request.abort()

    def on_console(message: object) -> None:
        location = (message.location or {}).get("url") or ""
        # Requests we aborted ourselves surface as console errors: the offline sandbox, not the app.
        if message.type == "error" and not (location and not is_loopback(location)):
            app_page.errors.append(f"console: {message.text} @ {location}")

    page.route("**/*", route)
    page.on("pageerror", lambda error: app_page.errors.append(f"pageerror: {error}"))
    page.on("console", on_console)
    page.goto(server.url + "/", wait_until="domcontentloaded", timeout=APP_READY_TIMEOUT_MS)
    page.wait_for_function(
        "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
        " && Object.keys(window.LiteGraph.registered_node_types).length > 50"
        " && window.app.extensionManager !== undefined", timeout=APP_READY_TIMEOUT_MS, polling=250)
    return app_page


# JS run in the page: load a UI-format workflow the way the frontend opens a file, without the missing-nodes and
# missing-models dialogs, and report every node that is missing (not a registered type) or flagged with errors,
# plus every toast the load raised (the frontend reports schema-validation failures and repaired links as toasts,
# not as console errors).
LOAD_WORKFLOW_JS = """
async (workflow) => {
  for (const toast of document.querySelectorAll('.p-toast-message')) toast.dataset.spectralSeen = '1';
  await app.loadGraphData(workflow, true, true, null,
                          {showMissingNodesDialog: false, showMissingModelsDialog: false});
  await new Promise((resolve) => setTimeout(resolve, 300));  // toasts render on Vue's next ticks
  const toasts = [...document.querySelectorAll('.p-toast-message')].filter((t) => !t.dataset.spectralSeen)
    .map((t) => ({severity: [...t.classList].find((c) => /^p-toast-message-[a-z]+$/.test(c)),
                  text: t.textContent.trim().slice(0, 3000)}));
  const nodes = app.graph.nodes.map((node) => ({
    id: node.id, type: node.type, registered: node.type in LiteGraph.registered_node_types,
    has_errors: !!node.has_errors,
  }));
  return {nodes, count: app.graph.nodes.length, toasts};
}
"""

# JS run in the page: build a graph with the LiteGraph API. nodes: [key, type, pos, size|null, {widget: value}];
# links: [from key, output type or name, to key, input name]. Returns the node ids by key. firstId (optional) numbers
# the nodes from there, so they do not take the ids of a graph shown before.
BUILD_GRAPH_JS = """
({nodes, links, graphId, scale, offset, firstId}) => {
  app.graph.clear();
  if (graphId) app.graph.id = graphId;
  const made = {};
  for (const [index, [key, type, pos, size, widgets]] of nodes.entries()) {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error(`node type ${type} is not registered`);
    if (firstId) node.id = firstId + index;
    node.pos = pos;
    app.graph.add(node);
    for (const [name, value] of Object.entries(widgets)) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`${type} has no widget ${name}`);
      widget.value = value;
    }
    if (size) node.setSize(size);
    made[key] = node;
  }
  for (const [from, output, to, input] of links) {
    const source = made[from], target = made[to];
    const outSlot = source.outputs.findIndex((o) => o.type === output || o.name === output);
    const inSlot = target.findInputSlot(input);
    if (outSlot < 0 || inSlot < 0) throw new Error(`cannot link ${from}.${output} -> ${to}.${input}`);
    if (!source.connect(outSlot, target, inSlot)) throw new Error(`link ${from}.${output} -> ${to}.${input} failed`);
  }
  app.canvas.ds.scale = scale ?? 1;
  app.canvas.ds.offset = offset ?? [20, 90];
  app.graph.setDirtyCanvas(true, true);
  return Object.fromEntries(Object.entries(made).map(([key, node]) => [key, node.id]));
}
"""

# JS run in the page: redraw the canvas now and return every string drawn with fillText (what the user sees).
DRAWN_TEXT_JS = """
() => {
  const drawn = [];
  const original = CanvasRenderingContext2D.prototype.fillText;
  CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
    drawn.push(String(text));
    return original.call(this, text, ...rest);
  };
  try {
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
  } finally {
    CanvasRenderingContext2D.prototype.fillText = original;
  }
  return drawn;
}
"""



def graph_to_prompt(page: AppPage) -> dict:
    """app.graphToPrompt() of the current graph, JSON-encoded in the page as the Queue button sends it (Playwright
    would turn undefined fields into nulls): {"output": API-format prompt, "workflow": UI-format workflow}."""
    return json.loads(page.evaluate(
        "async () => { const p = await app.graphToPrompt(); return JSON.stringify({output: p.output,"
        " workflow: p.workflow}); }"))


# JS run in the page: the hints of one node as the user sees them. Vue renderer: the badge pills inside the
# node's DOM element (text from their own text nodes, colours from the computed style). Classic canvas: redraw
# and record every fillText with its colour and the colour of the shape filled just before it (the pill).
RENDERED_HINTS_JS = """
(id) => {
  if (LiteGraph.vueNodesMode) {
    const root = document.querySelector(`[data-node-id="${id}"]`);
    if (!root) return {renderer: 'vue', pills: null};
    const pills = [];
    for (const element of root.querySelectorAll('div')) {
      const own = [...element.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE)
        .map((n) => n.textContent).join('').trim();
      if (!own || !element.style.backgroundColor) continue;
      const style = getComputedStyle(element);
      const box = element.getBoundingClientRect();
      pills.push({text: own, color: style.color, background: style.backgroundColor,
                  visible: box.width > 0 && box.height > 0 && style.visibility !== 'hidden'});
    }
    return {renderer: 'vue', pills};
  }
  const node = app.graph.getNodeById(id);
  const drawn = [];
  const proto = CanvasRenderingContext2D.prototype;
  const {fillText, fill} = proto;
  const canvas = app.canvas;
  const drawNode = canvas.drawNode;
  let lastFill = null;
  let drawing = null;  // only what is drawn while the canvas draws this node (its badges included)
  canvas.drawNode = function (current, ...rest) {
    drawing = current;
    try { return drawNode.call(this, current, ...rest); } finally { drawing = null; }
  };
  proto.fill = function (...rest) { lastFill = this.fillStyle; return fill.apply(this, rest); };
  proto.fillText = function (text, ...rest) {
    if (drawing === node) {
      drawn.push({text: String(text), color: String(this.fillStyle),
                  background: lastFill === null ? null : String(lastFill), visible: true});
    }
    return fillText.call(this, text, ...rest);
  };
  try {
    canvas.setDirty(true, true);
    canvas.draw(true, true);
  } finally {
    proto.fillText = fillText;
    proto.fill = fill;
    if (Object.prototype.hasOwnProperty.call(canvas, 'drawNode') && canvas.drawNode !== drawNode) {
      delete canvas.drawNode;
      if (canvas.drawNode !== drawNode) canvas.drawNode = drawNode;
    }
  }
  // The badge entries as the canvas gets them (functions or badge objects), for their own fields.
  const badges = (node?.badges ?? []).map((b) => (typeof b === 'function' ? b() : b))
    .map((b) => ({text: b?.text ?? null, fgColor: b?.fgColor ?? null, bgColor: b?.bgColor ?? null}));
  return {renderer: 'classic', pills: drawn, badges};
}
"""


def css_color(value: str | None) -> tuple[int, int, int] | None:
    """'#e8e6ff', 'rgb(232, 230, 255)' or 'rgba(..)' -> (232, 230, 255)."""
    if not value:
        return None
    value = value.strip().lower()
    if value.startswith("#") and len(value) == 7:
        return tuple(int(value[i:i + 2], 16) for i in (1, 3, 5))
    found = re.match(r"rgba?\((\d+),\s*(\d+),\s*(\d+)", value)
    return tuple(int(part) for part in found.groups()) if found else None
