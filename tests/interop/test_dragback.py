"""Every file Luna Saver writes drags back into ComfyUI's real frontend, old and new.

The files come from a real `luna up` (the `daemon` fixture of test_comfyui_node.py): one job per
file, each with a realistic ComfyUI workflow in `extra_pnginfo.workflow` and its API `prompt`,
over several images of different sizes and content (so WebP image chunks of both odd and even
length occur). Each frontend release in dragback/frontends.txt (installed from PyPI's
`comfyui-frontend-package` by tests/run) is served by a small stand-in for ComfyUI's server
(dragback/backend.py) and booted in Debian's Chromium through playwright-core (dragback/drop.mjs).
Each file is then dropped onto the canvas, the way a file dragged in from the desktop arrives,
and the graph the frontend ends up with is compared with the workflow we embedded: node ids and
types, links, and widget values that must survive byte for byte (non-ASCII prompt text, the seed).

Two modes per frontend: `stock` serves no extension (what anyone without the node installed
sees: PNG, WebP and AVIF must load there), `extension` serves the node's WEB_DIRECTORY as ComfyUI
does (every format must load, by drop and by Workflow > Open; JPEG and EXR only load this way).

Prerequisites (tests/run installs them; without them this test skips locally and fails under
CI=true): Debian's `chromium` (or LUNA_CHROMIUM), node with `npm ci` done in
tests/interop/dragback, aiohttp, and the frontend packages under LUNA_FRONTEND_CACHE.
"""

import base64
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from test_comfyui_node import daemon  # noqa: F401  (the fixture: a real `luna up`)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "dragback"
NODE_PACKAGE = ROOT / "clients" / "comfyui"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = Path(os.environ.get("LUNA_CHROMIUM", "/usr/bin/chromium"))
FRONTEND_CACHE = Path(os.environ.get(
    "LUNA_FRONTEND_CACHE", Path.home() / ".cache" / "luna-saver" / "comfyui-frontend"))
FRONTENDS = [line.split("#")[0].strip()
             for line in (HERE / "frontends.txt").read_text().splitlines()
             if line.split("#")[0].strip()]
FILE_TIMEOUT = 20.0
BOOT_TIMEOUT = 30.0
WAIT_MS = 8000  # per file: how long a load may take before it counts as not loaded


@dataclass(frozen=True)
class Format:
    """One row: how to ask the daemon for the format, and how a browser hands the file over."""
    name: str
    image: dict                      # per-image request fields
    mime: str                        # File.type as a browser sets it for this file
    stock: bool                      # must a stock frontend read it without our extension?
    job: dict = field(default_factory=dict)  # job-level request fields
    sample: str = "u8"               # how the pixels travel (the node sends f32 for float output)


FORMATS = [
    Format("png", {"format": "png"}, "image/png", stock=True),
    Format("webp", {"format": "webp"}, "image/webp", stock=True),
    Format("lossless_webp", {"format": "webp"}, "image/webp", stock=True,
           job={"lossless_webp": True}),
    Format("jpeg", {"format": "jpeg"}, "image/jpeg", stock=False),
    Format("png16", {"format": "png16"}, "image/png", stock=True, sample="f32"),
    # Browsers give EXR files odd types: none on Windows, image/x-exr on most Linux desktops.
    Format("exr", {"format": "exr"}, "", stock=False, sample="f32"),
    Format("avif", {"format": "avif"}, "image/avif", stock=True),
]
# Files without a workflow (embed_workflow off): with our extension the frontend must treat them
# exactly as without it (1.27.x: a toast; newer: a LoadImage node).
PLAIN = [
    Format("plain_jpeg", {"format": "jpeg"}, "image/jpeg", stock=False,
           job={"embed_workflow": False}),
    Format("plain_webp", {"format": "webp"}, "image/webp", stock=False,
           job={"embed_workflow": False}),
]


def images():
    """Sizes and content that differ enough for encoded chunk lengths to take both parities."""
    rng = np.random.default_rng(10)
    y, x = np.mgrid[0:48, 0:64]
    smooth = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1)
    blocks = np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((10, 10, 1)))
    yy, xx = np.mgrid[0:96, 0:128]
    rgba = np.stack([xx * 2, yy * 2, 255 - xx, yy * 255 // 95], axis=-1)
    out = [
        ("smooth_64x48", smooth),
        ("noise_97x61", rng.integers(0, 256, (61, 97, 3))),
        ("alpha_128x96", rgba),
        ("gray_33x77", rng.integers(0, 256, (77, 33, 1))),
        ("blocks_200x150", blocks),
        ("mixed_151x113", (rng.integers(0, 64, (113, 151, 3))
                           + np.mgrid[0:113, 0:151][1][..., None])),
        ("noise_45x53", rng.integers(0, 256, (53, 45, 3))),
        ("steps_90x70", np.kron(rng.integers(0, 256, (7, 9, 3)), np.ones((10, 10, 1)))),
    ]
    return [(name, np.clip(a, 0, 255).astype(np.uint8)) for name, a in out]


# --- the workflow we embed and expect back -----------------------------------------------------

def load_node_package():
    """The node package as ComfyUI imports it, for its node definition and WEB_DIRECTORY."""
    spec = importlib.util.spec_from_file_location(
        "luna_saver_dragback", NODE_PACKAGE / "__init__.py",
        submodule_search_locations=[str(NODE_PACKAGE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def widget_inputs(input_types):
    """(name, spec) of the inputs the frontend shows as widgets, in ComfyUI's order."""
    links = {"IMAGE", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "MASK"}
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind = spec[0]
            if isinstance(kind, str) and kind in links:
                continue
            yield name, spec


def widget_default(spec):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0]
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(kind, "")


def node_definition(name, input_types, outputs, category, display=None, output_node=False):
    """One /object_info entry, shaped as ComfyUI's server answers it."""
    def plain(section):
        return {k: [list(v[0]) if isinstance(v[0], (list, tuple)) else v[0], *v[1:]]
                for k, v in input_types.get(section, {}).items()}
    return {
        "input": {s: plain(s) for s in ("required", "optional") if s in input_types}
        | ({"hidden": input_types["hidden"]} if "hidden" in input_types else {}),
        "input_order": {s: list(input_types[s]) for s in ("required", "optional")
                        if s in input_types},
        "output": [o for o, _ in outputs], "output_is_list": [False] * len(outputs),
        "output_name": [n for _, n in outputs], "name": name, "display_name": display or name,
        "description": "", "python_module": "nodes", "category": category,
        "output_node": output_node, "deprecated": False, "experimental": False,
    }


SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"]
SCHEDULERS = ["normal", "karras", "exponential", "simple"]
CHECKPOINTS = ["sd_xl_base_1.0.safetensors"]
STOCK_INPUTS = {
    "CheckpointLoaderSimple": ({"required": {"ckpt_name": (CHECKPOINTS,)}},
                               [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], "loaders"),
    "CLIPTextEncode": ({"required": {"text": ("STRING", {"multiline": True,
                                                         "dynamicPrompts": True}),
                                     "clip": ("CLIP",)}},
                       [("CONDITIONING", "CONDITIONING")], "conditioning"),
    "EmptyLatentImage": ({"required": {
        "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}),
        "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}},
        [("LATENT", "LATENT")], "latent"),
    "KSampler": ({"required": {
        "model": ("MODEL",),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                          "round": 0.01}),
        "sampler_name": (SAMPLERS,), "scheduler": (SCHEDULERS,),
        "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
        "latent_image": ("LATENT",),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}},
        [("LATENT", "LATENT")], "sampling"),
    "VAEDecode": ({"required": {"samples": ("LATENT",), "vae": ("VAE",)}},
                  [("IMAGE", "IMAGE")], "latent"),
    # What a newer frontend turns a dropped image without a workflow into.
    "LoadImage": ({"required": {"image": (["example.png"], {"image_upload": True})}},
                  [("IMAGE", "IMAGE"), ("MASK", "MASK")], "image"),
}
# Model loaders the frontend looks up at boot (its model-to-node map); absent ones throw there.
for loader, model_input, model_output in (
        ("VAELoader", "vae_name", "VAE"), ("LoraLoader", "lora_name", "MODEL"),
        ("LoraLoaderModelOnly", "lora_name", "MODEL"), ("ControlNetLoader", "control_net_name",
                                                        "CONTROL_NET"),
        ("UNETLoader", "unet_name", "MODEL"), ("UpscaleModelLoader", "model_name", "UPSCALE_MODEL"),
        ("StyleModelLoader", "style_model_name", "STYLE_MODEL"),
        ("GLIGENLoader", "gligen_name", "GLIGEN"),
        ("ImageOnlyCheckpointLoader", "ckpt_name", "MODEL")):
    STOCK_INPUTS[loader] = ({"required": {model_input: ([],)}}, [(model_output, model_output)],
                            "loaders")


def object_info(luna):
    info = {name: node_definition(name, *spec) for name, spec in STOCK_INPUTS.items()}
    saver = luna.luna_saver_node.LunaDaemonImageSaver
    info["LunaDaemonImageSaver"] = node_definition(
        "LunaDaemonImageSaver", saver.INPUT_TYPES(),
        list(zip(saver.RETURN_TYPES, getattr(saver, "RETURN_NAMES", saver.RETURN_TYPES))),
        saver.CATEGORY, luna.NODE_DISPLAY_NAME_MAPPINGS.get("LunaDaemonImageSaver"),
        output_node=getattr(saver, "OUTPUT_NODE", False))
    return info


def workflow_for(case, luna):
    """A text-to-image workflow as ComfyUI's editor saves it (format 0.4), with ids, seed and
    prompt text unique to `case` so no file can pass with another file's graph."""
    k = 10 * case
    ckpt, pos, neg, latent, sampler, decode, save = (k + i for i in (4, 6, 7, 5, 3, 8, 9))
    seed = 100_000 + case
    positive = f"a lighthouse at dusk, café ☕, 夕暮れの灯台 #{case}"
    negative = "blurry, low quality"
    links = [  # [id, from node, from slot, to node, to slot, type]
        [k + 1, ckpt, 0, sampler, 0, "MODEL"], [k + 2, latent, 0, sampler, 3, "LATENT"],
        [k + 3, ckpt, 1, pos, 0, "CLIP"], [k + 4, pos, 0, sampler, 1, "CONDITIONING"],
        [k + 5, ckpt, 1, neg, 0, "CLIP"], [k + 6, neg, 0, sampler, 2, "CONDITIONING"],
        [k + 7, sampler, 0, decode, 0, "LATENT"], [k + 8, ckpt, 2, decode, 1, "VAE"],
        [k + 9, decode, 0, save, 0, "IMAGE"],
    ]

    def slots(node_id, names_types, incoming):
        ins = []
        for name, kind in names_types:
            link = next((l[0] for l in links if l[3] == node_id and l[4] == len(ins)), None)
            ins.append({"name": name, "type": kind, "link": link})
        return ins if incoming else None

    def outs(node_id, names_types):
        return [{"name": name, "type": kind, "slot_index": i,
                 "links": [l[0] for l in links if l[1] == node_id and l[2] == i]}
                for i, (name, kind) in enumerate(names_types)]

    saver_types = luna.luna_saver_node.LunaDaemonImageSaver.INPUT_TYPES()
    saver_widgets = [widget_default(spec) for _, spec in widget_inputs(saver_types)]
    image_inputs = [(n, "IMAGE") for n, s in saver_types.get("optional", {}).items()
                    if s[0] == "IMAGE"]

    def node(node_id, kind, pos_xy, size, order, inputs, outputs, widgets, title=None):
        n = {"id": node_id, "type": kind, "pos": pos_xy, "size": size, "flags": {},
             "order": order, "mode": 0, "outputs": outputs,
             "properties": {"Node name for S&R": kind}, "widgets_values": widgets}
        if inputs:
            n["inputs"] = inputs
        if title:
            n["title"] = title
        return n

    nodes = [
        node(ckpt, "CheckpointLoaderSimple", [26, 474], [315, 98], 0, None,
             outs(ckpt, [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]), CHECKPOINTS),
        node(latent, "EmptyLatentImage", [473, 609], [315, 106], 1, None,
             outs(latent, [("LATENT", "LATENT")]), [1024, 1024, 1]),
        node(pos, "CLIPTextEncode", [415, 186], [422, 164], 2,
             slots(pos, [("clip", "CLIP")], True), outs(pos, [("CONDITIONING", "CONDITIONING")]),
             [positive], title="Positive ✓"),
        node(neg, "CLIPTextEncode", [413, 389], [425, 180], 3,
             slots(neg, [("clip", "CLIP")], True), outs(neg, [("CONDITIONING", "CONDITIONING")]),
             [negative]),
        node(sampler, "KSampler", [863, 186], [315, 262], 4,
             slots(sampler, [("model", "MODEL"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT")], True),
             outs(sampler, [("LATENT", "LATENT")]),
             [seed, "fixed", 20, 6.5, "dpmpp_2m", "karras", 1]),
        node(decode, "VAEDecode", [1209, 188], [210, 46], 5,
             slots(decode, [("samples", "LATENT"), ("vae", "VAE")], True),
             outs(decode, [("IMAGE", "IMAGE")]), None),
        node(save, "LunaDaemonImageSaver", [1451, 189], [400, 600], 6,
             slots(save, image_inputs, True), outs(save, [("STRING", "STRING")]),
             saver_widgets),
    ]
    for n in nodes:
        if n["widgets_values"] is None:
            n["widgets_values"] = []
    workflow = {
        "id": str(uuid.UUID(int=case + 1)), "revision": 0, "last_node_id": k + 9,
        "last_link_id": k + 9, "nodes": nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4,
    }
    prompt = {
        str(ckpt): {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": CHECKPOINTS[0]}},
        str(latent): {"class_type": "EmptyLatentImage",
                      "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        str(pos): {"class_type": "CLIPTextEncode",
                   "inputs": {"text": positive, "clip": [str(ckpt), 1]}},
        str(neg): {"class_type": "CLIPTextEncode",
                   "inputs": {"text": negative, "clip": [str(ckpt), 1]}},
        str(sampler): {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 20, "cfg": 6.5, "sampler_name": "dpmpp_2m",
            "scheduler": "karras", "denoise": 1, "model": [str(ckpt), 0],
            "positive": [str(pos), 0], "negative": [str(neg), 0],
            "latent_image": [str(latent), 0]}},
        str(decode): {"class_type": "VAEDecode",
                      "inputs": {"samples": [str(sampler), 0], "vae": [str(ckpt), 2]}},
        str(save): {"class_type": "LunaDaemonImageSaver",
                    "inputs": {"images_1": [str(decode), 0], "save_path": "dragback"}},
    }
    metadata = {"positive": positive, "negative": negative, "seed": seed, "steps": 20,
                "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                "model": CHECKPOINTS[0]}
    return workflow, prompt, metadata


def graph_summary(graph):
    """What must survive a drag-back: node ids and types, links, prompt texts and the seed."""
    nodes = sorted((n["id"], n["type"]) for n in graph.get("nodes", []))
    links = sorted(tuple(l[:6]) if isinstance(l, list) else
                   (l["id"], l["origin_id"], l["origin_slot"], l["target_id"], l["target_slot"],
                    l["type"]) for l in graph.get("links", []))
    texts = sorted(str(n.get("widgets_values", [""])[0]) for n in graph.get("nodes", [])
                   if n["type"] == "CLIPTextEncode")
    seeds = [n.get("widgets_values", [None])[0] for n in graph.get("nodes", [])
             if n["type"] == "KSampler"]
    return {"nodes": nodes, "links": links, "texts": texts, "seeds": seeds}


# --- prerequisites -----------------------------------------------------------------------------

def missing(what):
    message = f"drag-back prerequisite missing: {what} (tests/run installs it)"
    if CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def tools():
    if not CHROMIUM.is_file():
        missing(f"{CHROMIUM} (apt-get install chromium)")
    node = shutil.which("node")
    if node is None:
        missing("node (apt-get install nodejs)")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        missing(f"playwright-core (npm ci --prefix {HERE})")
    if importlib.util.find_spec("aiohttp") is None:
        missing("aiohttp (pip install -r tests/interop/dragback/requirements.txt)")
    statics = {}
    for version in FRONTENDS:
        static = FRONTEND_CACHE / version / "comfyui_frontend_package" / "static"
        if not (static / "index.html").is_file():
            missing(f"comfyui-frontend-package=={version} in {FRONTEND_CACHE / version} "
                    f"(pip install --target {FRONTEND_CACHE / version} "
                    f"comfyui-frontend-package=={version})")
        statics[version] = static
    return {"node": node, "statics": statics}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the files ---------------------------------------------------------------------------------

def submit(url, body):
    request = urllib.request.Request(f"{url}/v1/jobs", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def luna():
    return load_node_package()


@pytest.fixture(scope="module")
def produced(daemon, luna):  # noqa: F811 (the imported fixture)
    """Per format: the files the daemon wrote, one job each, with what was embedded; or why the
    daemon would not write them."""
    save_path = f"dragback/{uuid.uuid4().hex[:10]}"
    pending = {}
    out = {}
    case = 0
    for fmt in FORMATS + PLAIN:
        out[fmt.name] = {"files": [], "error": None}
        for image_name, pixels in images()[:1] if fmt in PLAIN else images():
            case += 1
            workflow, prompt, metadata = workflow_for(case, luna)
            stem = f"{fmt.name}_{image_name}"
            h, w, c = pixels.shape
            if fmt.sample == "f32":
                pixels = (pixels / np.float32(255)).astype("<f4")
            body = {
                "save_path": save_path, "filename": stem, "prompt": prompt,
                "extra_pnginfo": {"workflow": workflow}, "metadata": metadata,
                "custom_metadata": {"artist": "Lüna"},
                "images": [{"pixels": base64.b64encode(pixels.tobytes()).decode(), "width": w,
                            "height": h, "channels": c, "sample": fmt.sample, "subdir": False,
                            **fmt.image}],
                **fmt.job,
            }
            status, answer = submit(daemon.url, body)
            if status != 202:
                out[fmt.name]["error"] = f"daemon answered {status}: {answer}"
                break
            pending[(fmt.name, stem)] = (answer["job_id"], workflow)
    base = daemon.output / save_path
    deadline = time.monotonic() + FILE_TIMEOUT
    while pending:
        for (name, stem), (job_id, workflow) in list(pending.items()):
            found = [p for p in base.glob(f"{stem}.*") if p.suffix != ".json"]
            if found:
                out[name]["files"].append({"path": found[0], "stem": stem, "job_id": job_id,
                                           "workflow": workflow})
                del pending[(name, stem)]
        if pending and time.monotonic() > deadline:
            for (name, stem), _ in pending.items():
                out[name]["error"] = f"{stem} not written after {FILE_TIMEOUT}s\n{daemon.logs()}"
            break
        time.sleep(0.1)
    for made in out.values():
        made["files"].sort(key=lambda f: f["stem"])
    return out


def riff_chunks(path):
    """(fourcc, length) of a WebP file's chunks, walked as the container spec says."""
    data = path.read_bytes()
    chunks, offset = [], 12
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset + 4:offset + 8], "little")
        chunks.append((data[offset:offset + 4].decode("latin-1"), length))
        offset += 8 + length + length % 2
    return chunks


# --- the frontends -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loads(tools, produced, luna, tmp_path_factory):
    """Runs every file through every (frontend, mode) once; per (version, mode) the driver's
    result per case id."""
    work = tmp_path_factory.mktemp("dragback")
    info = work / "object_info.json"
    info.write_text(json.dumps(object_info(luna)))
    web = (NODE_PACKAGE / luna.WEB_DIRECTORY).resolve()
    results = {}
    for version, static in tools["statics"].items():
        for mode in ("stock", "extension"):
            cases = []
            for fmt in FORMATS:
                if mode == "stock" and not fmt.stock:
                    continue
                for i, f in enumerate(produced[fmt.name]["files"]):
                    hows = ["drop", "open"] if mode == "extension" and i < 2 else ["drop"]
                    for how in hows:
                        cases.append({"id": f"{fmt.name}/{f['stem']}/{how}", "path": str(f["path"]),
                                      "name": f["path"].name, "mime": fmt.mime, "how": how})
            for fmt in PLAIN:
                for f in produced[fmt.name]["files"]:
                    cases.append({"id": f"{fmt.name}/{f['stem']}/drop", "path": str(f["path"]),
                                  "name": f["path"].name, "mime": fmt.mime, "how": "drop"})
            port = free_port()
            log_path = work / f"backend-{version}-{mode}.log"
            command = [sys.executable, str(HERE / "backend.py"), "--static", str(static),
                       "--object-info", str(info), "--port", str(port)]
            if mode == "extension":
                # ComfyUI serves a node's WEB_DIRECTORY at /extensions/<its folder name>/.
                command += ["--extension", f"luna_saver={web}"]
            with open(log_path, "wb") as log:
                backend = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_listening(port, backend, log_path)
                config = {"chromium": str(CHROMIUM), "url": f"http://127.0.0.1:{port}/",
                          "extension": mode == "extension", "wait_ms": WAIT_MS,
                          "cases": cases}
                config_path = work / f"config-{version}-{mode}.json"
                result_path = work / f"result-{version}-{mode}.json"
                config_path.write_text(json.dumps(config))
                run = subprocess.run([tools["node"], str(HERE / "drop.mjs"), str(config_path),
                                      str(result_path)], capture_output=True, text=True,
                                     timeout=600, check=False)
                result = json.loads(result_path.read_text()) if result_path.is_file() else {}
                if run.returncode != 0:
                    result["error"] = (f"drop.mjs exited {run.returncode}:\n{run.stderr[-3000:]}"
                                       f"\nbackend log:\n{log_path.read_text()[-3000:]}")
                result["backend_log"] = log_path
                result["by_id"] = {c["id"]: c for c in result.get("cases", [])}
                results[(version, mode)] = result
            finally:
                backend.terminate()
                backend.wait(timeout=10)
    return results


def wait_listening(port, proc, log_path):
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"stand-in backend exited {proc.returncode}:\n{log_path.read_text()}",
                        pytrace=False)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/system_stats", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                pytest.fail(f"stand-in backend not up:\n{log_path.read_text()}", pytrace=False)
            time.sleep(0.1)


# --- the checks --------------------------------------------------------------------------------

def rows():
    out = []
    for version in FRONTENDS:
        for mode in ("stock", "extension"):
            for fmt in FORMATS:
                if mode == "stock" and not fmt.stock:
                    continue
                out.append(pytest.param(version, mode, fmt, id=f"{version}-{mode}-{fmt.name}"))
    return out


@pytest.mark.parametrize("version,mode,fmt", rows())
def test_every_file_drags_back_with_its_workflow(loads, produced, version, mode, fmt):
    made = produced[fmt.name]
    assert made["error"] is None, f"{fmt.name}: {made['error']}"
    assert made["files"], f"{fmt.name}: no files"
    result = loads[(version, mode)]
    assert "error" not in result, result.get("error")
    if mode == "extension":
        assert result["boot"]["handleFile_wrapped"], result["boot"]
    failures = []
    for i, f in enumerate(made["files"]):
        expected = graph_summary(f["workflow"])
        for how in (["drop", "open"] if mode == "extension" and i < 2 else ["drop"]):
            got = result["by_id"].get(f"{fmt.name}/{f['stem']}/{how}")
            if got is None:
                failures.append(f"{f['path'].name} ({how}): not run")
                continue
            summary = graph_summary(got["graph"])
            if summary != expected:
                detail = {k: summary[k] for k in summary if summary[k] != expected[k]}
                chunks = riff_chunks(f["path"]) if f["path"].suffix == ".webp" else ""
                failures.append(
                    f"{f['path'].name} ({how}): loaded {len(got['graph'].get('nodes', []))} "
                    f"nodes; differs in {sorted(detail)}; toasts {got['toasts']}; "
                    f"{'chunks ' + str(chunks) + '; ' if chunks else ''}"
                    f"console tail {got['console'][-5:]}")
    assert not failures, (f"{len(failures)} of the {fmt.name} files did not drag back into "
                          f"frontend {version} ({mode}):\n" + "\n".join(failures))


def test_webp_files_cover_both_chunk_parities(produced):
    """The old frontends' WebP bug hits files with an odd-length image chunk (ALPH, VP8, VP8L)
    before EXIF: each WebP row must hold files with such a chunk and files without, wherever the
    encoder puts EXIF, or the row proves less than it claims."""
    for name in ("webp", "lossless_webp"):
        made = produced[name]
        assert made["error"] is None, made["error"]
        kinds = {}
        for f in made["files"]:
            chunks = riff_chunks(f["path"])
            odd = any(length % 2 for fourcc, length in chunks
                      if fourcc in ("ALPH", "VP8 ", "VP8L"))
            kinds.setdefault(odd, []).append(chunks)
        assert set(kinds) == {False, True}, (
            f"{name}: every file has {'an odd' if True in kinds else 'only even'} image chunks; "
            f"add an image that gives the other case: {kinds}")


@pytest.mark.parametrize("version", FRONTENDS)
def test_files_without_a_workflow_are_left_to_the_frontend(loads, produced, version):
    """The extension hands files it cannot load on: what the frontend does with them (a toast,
    or in newer releases a LoadImage node) is the same with and without it."""
    stock, extension = loads[(version, "stock")], loads[(version, "extension")]
    for result in (stock, extension):
        assert "error" not in result, result.get("error")
    for fmt in PLAIN:
        made = produced[fmt.name]
        assert made["error"] is None, made["error"]
        for f in made["files"]:
            case = f"{fmt.name}/{f['stem']}/drop"
            without, with_ = stock["by_id"][case], extension["by_id"][case]
            outcome = [sorted(n["type"] for n in without["graph"]["nodes"]), without["toasts"]]
            assert outcome[0] or outcome[1], f"{case}: the frontend did nothing at all"
            assert [sorted(n["type"] for n in with_["graph"]["nodes"]), with_["toasts"]] == \
                outcome, f"{case}: {with_['console'][-5:]}"
