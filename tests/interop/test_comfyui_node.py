"""The ComfyUI node (`clients/comfyui`) against a real `luna up`, with numpy arrays standing in
for torch tensors (the node only duck-types tensors, so no torch is needed).

Starts `target/debug/luna up` on free ports with a temporary output root (no broker), imports
the node module by path, calls it as ComfyUI would, and checks what CONTRACT.md promises: where
files land, the returned text, embedded workflow and exact PNG pixels. A tiny in-process HTTP
server stands in for the gateway where the test needs to see the request itself.
"""

import http.server
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "clients" / "comfyui"
NODE_FILE = NODE_DIR / "luna_saver_node.py"
READY_TIMEOUT = 60.0
FILE_TIMEOUT = 10.0
PREFIX = "[Luna Daemon Image Saver]"
SUBMITTED = re.compile(
    r"^\[Luna Daemon Image Saver\] Submitted (\d+) images to daemon\. Job ID: ([0-9A-Za-z_-]+)$"
)

PROMPT = {"3": {"class_type": "KSampler",
                "inputs": {"seed": 1234, "steps": 20, "text": "café ☕"}}}
WORKFLOW = {"last_node_id": 9, "nodes": [{"id": 9, "type": "LunaDaemonImageSaver",
                                          "title": "Ünïcode ✓"}],
            "links": [[1, 3, 0, 9, 0, "IMAGE"]]}
EXTRA_PNGINFO = {"workflow": WORKFLOW}
METADATA = {"positive": "a lighthouse at dusk", "negative": "blurry", "steps": 20,
            "sampler_name": "euler", "cfg": 6.5, "seed": np.int64(1234)}


def reference_uint8(x):
    """The specified conversion, written independently of the node (float32 stays float32)."""
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def load_node():
    spec = importlib.util.spec_from_file_location("luna_saver_node_under_test", NODE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the daemon ----------------------------------------------------------------------------


def _build_luna():
    given = os.environ.get("LUNA_TEST_BINARY")  # a `luna` built elsewhere (shared target dirs)
    if given:
        return Path(given)
    build = subprocess.run(["nice", "cargo", "build", "-q", "--bin", "luna"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"cargo build failed:\n{build.stderr[-4000:]}"
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = (target if target.is_absolute() else ROOT / target) / "debug" / "luna"
    assert binary.is_file(), f"{binary} was not built"
    return binary


def _run_daemon(base, extra_args):
    """`luna up` on free ports under `base` until the generator is closed."""
    binary = _build_luna()
    output = base / "output"
    output.mkdir()
    gateway_port, status_port = free_port(), free_port()
    log_path = base / "luna-up.log"
    # No LUNA_* from the caller's environment (a LUNA_TOKEN would lock the node out).
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNA_")}
    env.update(NO_COLOR="1", RUST_LOG=os.environ.get("RUST_LOG", "info"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "up", "--gateway-listen", f"127.0.0.1:{gateway_port}",
             "--status-listen", f"127.0.0.1:{status_port}", "--output-root", str(output),
             "--shutdown-grace", "5s", *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env)

    def tail():
        text = log_path.read_text(errors="replace").splitlines()[-40:]
        return f"--- luna up log ({log_path}) ---\n" + "\n".join(text)

    try:
        url = f"http://127.0.0.1:{gateway_port}"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"luna up exited with {proc.returncode}\n{tail()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"luna up not ready at {url}/readyz\n{tail()}", pytrace=False)
            time.sleep(0.2)
        yield SimpleNamespace(url=url, output=output, logs=tail,
                              status=f"http://127.0.0.1:{status_port}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # drains accepted work, then exits
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    """`luna up` with a hand-off directory of its own (the node finds it: same machine)."""
    base = tmp_path_factory.mktemp("comfyui")
    handoff = base / "handoff"
    for d in _run_daemon(base, ["--handoff-dir", str(handoff)]):
        d.handoff = handoff
        yield d


@pytest.fixture(scope="session")
def daemon_without_handoff(tmp_path_factory):
    """`luna up --handoff-dir none`: every node falls back to inline pixels."""
    base = tmp_path_factory.mktemp("comfyui-inline")
    yield from _run_daemon(base, ["--handoff-dir", "none"])


def _clean_env(monkeypatch, url):
    monkeypatch.setenv("LUNA_GATEWAY_URL", url)
    for name in ("LUNA_TOKEN", "LUNA_MAX_IMAGES", "LUNA_MAX_BODY_BYTES", "LUNA_SUBMIT_TIMEOUT",
                 "LUNA_HANDOFF"):
        monkeypatch.delenv(name, raising=False)


def spy_requests(node, monkeypatch):
    """Records every request body the node posts (decoded), and passes it on."""
    sent = []
    real = node.post_job

    def post_job(url, body, *args, **kwargs):
        sent.append(msgpack.unpackb(body, raw=False))
        return real(url, body, *args, **kwargs)

    monkeypatch.setattr(node, "post_job", post_job)
    return sent


@pytest.fixture
def node(daemon, monkeypatch):
    _clean_env(monkeypatch, daemon.url)
    module = load_node()
    yield module
    module._remove_segments()


def wait_for_files(daemon, paths):
    deadline = time.monotonic() + FILE_TIMEOUT
    while not all(p.is_file() for p in paths):
        if time.monotonic() > deadline:
            found = sorted(str(p.relative_to(daemon.output)) for p in daemon.output.rglob("*"))
            missing = [str(p) for p in paths if not p.is_file()]
            pytest.fail(f"missing after {FILE_TIMEOUT}s: {missing}\nfound: {found}\n"
                        f"{daemon.logs()}", pytrace=False)
        time.sleep(0.1)


def gradient(b, h, w, c, seed):
    rng = np.random.default_rng(seed)
    return rng.random((b, h, w, c), dtype=np.float32)


def exif_json(exif, tag, key):
    value = exif[tag]
    assert value.startswith(f"{key}:"), value[:80]
    return json.loads(value[len(key) + 1:])


# --- with the daemon -----------------------------------------------------------------------


def test_inputs_land_with_names_folders_and_workflow(daemon, node):
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    rgb = gradient(1, 23, 37, 3, 1)
    rgba = gradient(1, 16, 20, 4, 2)
    jpg = gradient(1, 24, 24, 3, 3)
    out = node.LunaDaemonImageSaver().save(
        save_path=save_path, filename="t1_%model_name%", quality_gate="disabled",
        min_quality_threshold=0.3, png_compression=4, lossy_quality=90, lossless_webp=False,
        embed_workflow=True,
        image_1=rgb, affix_1="RAW", format_1="png", subdir_1=True,
        image_2=rgba, affix_2="FINAL", format_2="webp", subdir_2=False,
        image_3=jpg, affix_3="DETAILED", format_3="jpeg", subdir_3=True,
        custom_metadata='{"artist": "me"}', metadata=METADATA,
        model_name="checkpoints\\SDXL\\sdxl_base.safetensors", filename_index=0,
        prompt=PROMPT, extra_pnginfo=EXTRA_PNGINFO,
    )
    text = out["result"][0]
    assert out["ui"] == {"text": [text]}, "outside ComfyUI (no folder_paths): no previews"
    match = SUBMITTED.match(text)
    assert match, text
    assert match.group(1) == "3"
    job_id = match.group(2)

    base = daemon.output / save_path
    png, webp, jpeg = (base / "RAW" / "t1_sdxl_base_RAW.png", base / "t1_sdxl_base_FINAL.webp",
                       base / "DETAILED" / "t1_sdxl_base_DETAILED.jpg")
    wait_for_files(daemon, [png, webp, jpeg])

    with Image.open(png) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (37, 23))
        assert np.array_equal(np.asarray(img), reference_uint8(rgb[0]))
        assert json.loads(img.text["prompt"]) == PROMPT
        assert json.loads(img.text["workflow"]) == WORKFLOW
        assert "Steps: 20" in img.text["parameters"] and "Seed: 1234" in img.text["parameters"]
        assert img.text["artist"] == "me"
        assert img.text["luna_job_id"] == job_id
    for path, fmt, size in ((webp, "WEBP", (20, 16)), (jpeg, "JPEG", (24, 24))):
        with Image.open(path) as img:
            assert (img.format, img.size) == (fmt, size)
            exif = img.getexif()
            assert exif_json(exif, 0x0110, "prompt") == PROMPT
            assert exif_json(exif, 0x010F, "workflow") == WORKFLOW


def test_a_batch_becomes_one_file_per_element(daemon, node):
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    batch = gradient(3, 9, 13, 3, 4)
    batch[1, 0, 0] = [-0.2, 0.5, 1.7]  # out of range values are clipped, 0.5 rounds up
    text = node.LunaDaemonImageSaver().save(
        save_path=save_path, filename="batch", image_1=batch)["result"][0]
    match = SUBMITTED.match(text)
    assert match and match.group(1) == "3", text

    # Defaults: affix_1 "RAW" with subdir, so <save_path>/RAW/batch_RAW_<i>.png.
    paths = [daemon.output / save_path / "RAW" / f"batch_RAW_{i}.png" for i in range(3)]
    wait_for_files(daemon, paths)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            pixels = np.asarray(img)
            assert np.array_equal(pixels, reference_uint8(batch[i])), f"{path.name} pixels"
    with Image.open(paths[1]) as img:
        assert img.getpixel((0, 0)) == (0, 128, 255)
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [p.name for p in paths]


def test_more_images_than_the_gateway_takes_are_split_with_one_pinned_time(
        daemon, node, monkeypatch):
    """20 images > the gateway's 16: two jobs, and `%time:...%` rendered once by the node so
    every part gets the same stem (the daemon would render each job's own submission time)."""
    monkeypatch.setattr(node, "_now", lambda: time.struct_time((2001, 2, 3, 4, 5, 6, 0, 0, 0)))
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    batch = gradient(10, 4, 5, 3, 5)
    text = node.LunaDaemonImageSaver().save(
        save_path=save_path + "/%time:YYYY%", filename="%time:YYYYmmdd-HHMMSS%_%index%",
        filename_index=7, image_1=batch, image_2=batch, format_2="webp",
        lossless_webp=True)["result"][0]
    match = re.match(r"^\[Luna Daemon Image Saver\] Submitted 20 images to daemon in 2 jobs\. "
                     r"Job IDs: ([\w-]+), ([\w-]+)$", text)
    assert match and match.group(1) != match.group(2), text
    base = daemon.output / save_path / "2001"
    paths = [base / "RAW" / f"20010203-040506_7_RAW_{i}.png" for i in range(10)]
    paths += [base / "UPSCALED" / f"20010203-040506_7_UPSCALED_{i}.webp" for i in range(10)]
    wait_for_files(daemon, paths)
    with Image.open(paths[-1]) as img:  # lossless WebP: exact too
        assert np.array_equal(np.asarray(img), reference_uint8(batch[9]))


def test_free_text_metadata_is_left_out_with_a_warning_and_images_still_saved(daemon, node):
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    text = node.LunaDaemonImageSaver().save(
        save_path=save_path, filename="warned", metadata="seed 5, steps 20",
        custom_metadata="   ", image_4=gradient(1, 5, 6, 1, 6))["result"][0]
    first, *rest = text.split("\n")
    assert SUBMITTED.match(first), text
    assert len(rest) == 1 and rest[0].startswith(f"{PREFIX} WARNING: metadata ignored: "), text
    path = daemon.output / save_path / "FINAL" / "warned_FINAL.png"
    wait_for_files(daemon, [path])
    with Image.open(path) as img:
        assert img.mode == "L" and "parameters" not in img.text


def test_gateway_errors_are_passed_through(daemon, node):
    text = node.LunaDaemonImageSaver().save(
        save_path="../outside", image_1=gradient(1, 2, 2, 3, 7))["result"][0]
    assert text.startswith(f"{PREFIX} ERROR: ") and "\n" not in text, text
    assert ".." in text, text  # the gateway's reason, not a generic one


# --- without the daemon --------------------------------------------------------------------


def test_daemon_down_gives_the_exact_error(monkeypatch):
    monkeypatch.setenv("LUNA_GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    node = load_node()
    out = node.LunaDaemonImageSaver().save(image_1=gradient(1, 2, 2, 3, 8))
    assert out["result"] == (
        "[Luna Daemon Image Saver] ERROR: Connection refused. Is daemon running?",)


@pytest.mark.parametrize("value,expected", [
    (-1.0, 0), (-0.001, 0), (0.0, 0), (0.51 / 255, 1), (0.49 / 255, 0), (1 / 255, 1),
    (0.5, 128), (0.998, 254), (254.51 / 255, 255), (1.0, 255), (1.5, 255), (1e9, 255),
    (float("nan"), 0), (float("inf"), 255), (float("-inf"), 0),
])
def test_float_to_uint8_rounds_and_clips(value, expected):
    node = load_node()
    for dtype in (np.float32, np.float64):
        got = node.float_to_uint8(np.array([value], dtype=dtype))
        assert got.dtype == np.uint8 and got.tolist() == [expected], (value, dtype, got)


def test_conversion_matches_the_reference_on_a_whole_image():
    node = load_node()
    x = np.random.default_rng(9).uniform(-0.5, 1.5, size=(2, 7, 11, 4)).astype(np.float32)
    x[0, 0, :, 0] = np.arange(11) / 255  # exact steps
    for element, got in zip(x, (node.image_entry(e, "A", "png", True, i, 2)
                                for i, e in enumerate(node.split_batch(x)))):
        assert (got["width"], got["height"], got["channels"]) == (11, 7, 4)
        assert got["pixels"] == reference_uint8(element).tobytes()


class FakeTensor:
    """Duck-types a torch tensor: `.detach().cpu().numpy()`."""

    def __init__(self, array):
        self.array = array
        self.dtype = "torch.float32"

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


def test_shapes_and_tensor_duck_typing():
    node = load_node()
    arr = np.full((2, 3, 4, 1), 0.25, dtype=np.float32)
    elements = node.split_batch(FakeTensor(arr))
    assert [e.shape for e in elements] == [(3, 4, 1)] * 2
    assert [e.shape for e in node.split_batch(np.zeros((3, 4, 3)))] == [(3, 4, 3)]
    for bad in (np.zeros((1, 3, 4, 2)), np.zeros((0, 3, 4, 3)), np.zeros((1, 1, 3, 4, 3))):
        with pytest.raises(ValueError):
            node.split_batch(bad)
    text = node.submit(image_2=np.zeros((1, 3, 4, 2)))
    assert text.startswith(f"{PREFIX} ERROR: image_2: "), text
    assert node.submit() == \
        f"{PREFIX} ERROR: no image connected; connect at least one of image_1..image_5"


@pytest.mark.parametrize("template,pinned", [
    ("%time:YYYY_mm_dd.HH.MM.SS%_%model_name%", "2025_12_09.10.11.12_%model_name%"),
    ("%time:YYYY-mm-dd_%index%", "2025-12-09_%index%"),
    ("%index%time:SS%", "%index%12"),
    ("%index%model_name%", "%index%%model_name%"),  # same rendering, see the next test
    ("%model_name%%time:HH%%%", "%model_name%10%%"),
    ("100% %foo% %time:x%", "100% %foo% x"),
])
def test_pin_time_renders_only_time_tokens(template, pinned):
    node = load_node()
    t = time.struct_time((2025, 12, 9, 10, 11, 12, 0, 0, 0))
    assert node.pin_time(template, t) == pinned


@pytest.mark.parametrize("template", [
    "%index%model_name%", "%model_name%%%index%x%", "a%b%index%c%", "%index%%model_dir%_%%",
])
def test_pinned_templates_render_as_the_originals_do(daemon, node, template):
    """`pin_time` keeps non-time tokens in a form the daemon renders exactly like the original."""
    t = time.struct_time((2025, 12, 9, 10, 11, 12, 0, 0, 0))
    stems = []
    for filename in (template, node.pin_time(template, t)):
        save_path = f"comfy/{uuid.uuid4().hex[:12]}"
        text = node.submit(save_path=save_path, filename=filename, model_name="dir/m.gguf",
                           filename_index=3, image_1=gradient(1, 2, 2, 3, 10), affix_1="")
        assert SUBMITTED.match(text), text
        folder = daemon.output / save_path
        deadline = time.monotonic() + FILE_TIMEOUT
        while not (folder.is_dir() and any(folder.rglob("*.png"))):
            assert time.monotonic() < deadline, f"nothing under {folder}\n{daemon.logs()}"
            time.sleep(0.1)
        stems.append([str(p.relative_to(folder)) for p in folder.rglob("*.png")])
    assert stems[0] == stems[1], (template, node.pin_time(template, t), stems)


def test_chunks_respect_count_and_body_size():
    node = load_node()
    images = [{"pixels": b"x" * 1000} for _ in range(40)]
    assert [len(g) for g in node.chunk_images(images, 100, 16, 10**9)] == [16, 16, 8]
    groups = node.chunk_images(images, 100, 16, 100 + 3 * (1000 + node.PER_IMAGE_OVERHEAD))
    assert {len(g) for g in groups} == {3, 1} and sum(map(len, groups)) == 40
    big = [{"pixels": b"x" * 5000}, {"pixels": b"x"}]
    assert [len(g) for g in node.chunk_images(big, 100, 16, 1000)] == [1, 1]


class FakeGateway(http.server.BaseHTTPRequestHandler):
    requests = []
    answer = (202, {"job_id": "fake-1", "num_images": 1,
                    "message": f"{PREFIX} Submitted 1 images to daemon. Job ID: fake-1"})

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        FakeGateway.requests.append((self.path, dict(self.headers), body))
        status, payload = FakeGateway.answers.pop(0) if FakeGateway.answers \
            else FakeGateway.answer
        data = json.dumps(payload).encode()
        self.send_response(status)
        if status in (429, 503):
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_gateway(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeGateway.requests = []
    FakeGateway.answers = []
    monkeypatch.setenv("LUNA_GATEWAY_URL", f"http://127.0.0.1:{server.server_port}/")
    try:
        yield FakeGateway
    finally:
        server.shutdown()
        server.server_close()


def test_the_request_on_the_wire(fake_gateway, monkeypatch):
    monkeypatch.setenv("LUNA_TOKEN", "s3cret")
    node = load_node()
    img = np.full((1, 2, 3, 3), 0.5, dtype=np.float32)
    text = node.LunaDaemonImageSaver().save(
        save_path="a", filename="b", quality_gate="both", min_quality_threshold=0.5,
        png_compression=9, lossy_quality=75, lossless_webp=True, embed_workflow=False,
        image_5=img, format_5="jpeg", subdir_5=False, custom_metadata='{"k": 1}',
        metadata='{"seed": 3}', model_name="m.ckpt", filename_index=42,
        prompt=PROMPT, extra_pnginfo=EXTRA_PNGINFO)["result"][0]
    assert text == f"{PREFIX} Submitted 1 images to daemon. Job ID: fake-1"
    (path, headers, body), = fake_gateway.requests
    headers = {k.lower(): v for k, v in headers.items()}
    assert path == "/v1/jobs"
    assert headers["content-type"] == "application/msgpack"
    assert headers["authorization"] == "Bearer s3cret"
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", headers["traceparent"])
    request = msgpack.unpackb(body, raw=False)
    image, = request.pop("images")
    assert request == {
        "save_path": "a", "filename": "b", "model_name": "m.ckpt", "index": 42,
        "quality_gate": "both", "min_quality_threshold": 0.5, "png_compression": 9,
        "lossy_quality": 75, "lossless_webp": True, "embed_workflow": False,
        "prompt": PROMPT, "extra_pnginfo": EXTRA_PNGINFO, "metadata": {"seed": 3},
        "custom_metadata": {"k": 1}, "exr_precision": 32,
    }
    assert isinstance(image["pixels"], bytes) and image["pixels"] == bytes([128]) * 18
    del image["pixels"]
    assert image == {"width": 3, "height": 2, "channels": 3, "affix": "IMAGE5",
                     "format": "jpeg", "subdir": False, "batch_index": 0, "batch_size": 1}

    monkeypatch.setattr(fake_gateway, "answer",
                        (400, {"error": "png_compression is 12; allowed 0 to 9"}))
    text = node.submit(image_1=img)
    assert text == f"{PREFIX} ERROR: png_compression is 12; allowed 0 to 9"


def test_503_and_429_are_retried_with_one_idempotency_key(fake_gateway):
    node = load_node()
    img = np.full((1, 2, 3, 3), 0.5, dtype=np.float32)
    fake_gateway.answers = [
        (503, {"error": "the message broker is unavailable"}),
        (429, {"error": "the save queue is full"}),
    ]
    text = node.submit(image_1=img)
    assert text == f"{PREFIX} Submitted 1 images to daemon. Job ID: fake-1"
    keys = [{k.lower(): v for k, v in h.items()}.get("idempotency-key")
            for _, h, _ in fake_gateway.requests]
    assert len(keys) == 3 and keys[0] and len(set(keys)) == 1, keys
    bodies = {b for _, _, b in fake_gateway.requests}
    assert len(bodies) == 1, "every attempt sends the same request"

    # A second submission is a new job: a new key.
    fake_gateway.requests.clear()
    node.submit(image_1=img)
    (_, h, _), = fake_gateway.requests
    assert {k.lower(): v for k, v in h.items()}["idempotency-key"] != keys[0]

    # A refusal that retrying cannot fix is not retried.
    fake_gateway.requests.clear()
    fake_gateway.answers = [(400, {"error": "bad"})]
    assert node.submit(image_1=img) == f"{PREFIX} ERROR: bad"
    assert len(fake_gateway.requests) == 1


def test_previews_are_written_while_the_gateway_works_once_across_retries(
        fake_gateway, comfy_temp, monkeypatch):
    """The node sends the request, writes the previews, then reads the answer: the fake
    gateway holds its first answer (a 503) until the previews exist, which only happens if the
    node writes them while it waits; they are written once for all attempts."""
    node = load_node()
    seen = []
    real = FakeGateway.do_POST

    def do_post(self):
        deadline = time.monotonic() + 10
        while len(list(comfy_temp.glob("*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(sorted(p.name for p in comfy_temp.glob("*")))
        real(self)

    monkeypatch.setattr(FakeGateway, "do_POST", do_post)
    calls = []
    real_write = node.write_previews
    monkeypatch.setattr(node, "write_previews",
                        lambda *a, **k: calls.append(1) or real_write(*a, **k))
    fake_gateway.answers = [(503, {"error": "the message broker is unavailable"})]
    img = np.full((2, 8, 8, 3), 0.25, dtype=np.float32)
    out = node.LunaDaemonImageSaver().save(image_1=img)
    assert out["result"][0] == f"{PREFIX} Submitted 1 images to daemon. Job ID: fake-1"
    assert len(seen) == 2 and len(seen[0]) == 2, f"no previews before the first answer: {seen}"
    assert seen[1] == seen[0] and calls == [1], "written once, however many attempts"
    assert sorted(e["filename"] for e in out["ui"]["images"]) == seen[0]


def test_retries_stop_after_the_retry_window(fake_gateway, monkeypatch):
    monkeypatch.setenv("LUNA_SUBMIT_RETRY_FOR", "0.2")
    node = load_node()
    img = np.full((1, 2, 3, 3), 0.5, dtype=np.float32)
    monkeypatch.setattr(fake_gateway, "answer", (503, {"error": "broker down"}))
    started = time.monotonic()
    text = node.submit(image_1=img)
    assert text == f"{PREFIX} ERROR: broker down"
    assert len(fake_gateway.requests) >= 2
    assert time.monotonic() - started < 5


def test_package_exports_and_inputs():
    spec = importlib.util.spec_from_file_location(
        "luna_saver", NODE_DIR / "__init__.py", submodule_search_locations=[str(NODE_DIR)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["luna_saver"] = package
    try:
        spec.loader.exec_module(package)
    finally:
        del sys.modules["luna_saver"]
    cls = package.NODE_CLASS_MAPPINGS["LunaDaemonImageSaver"]
    assert package.NODE_DISPLAY_NAME_MAPPINGS == {"LunaDaemonImageSaver":
                                                  "Luna Daemon Image Saver"}
    assert cls.OUTPUT_NODE is True and cls.RETURN_TYPES == ("STRING",)
    types = cls.INPUT_TYPES()
    assert list(types["required"]) == [
        "save_path", "filename", "quality_gate", "min_quality_threshold", "png_compression",
        "lossy_quality", "lossless_webp", "embed_workflow"]
    assert types["required"]["filename"][1]["default"] == "%time:YYYY_mm_dd.HH.MM.SS%_%model_name%"
    assert types["required"]["quality_gate"][0] == ["disabled", "variance", "edge_density", "both"]
    expected_optional = {f"{k}_{i}" for k in ("image", "affix", "format", "subdir")
                         for i in range(1, 6)}
    expected_optional |= {"custom_metadata", "metadata", "model_name", "filename_index",
                          "exr_precision"}
    assert set(types["optional"]) == expected_optional
    assert [types["optional"][f"affix_{i}"][1]["default"] for i in range(1, 6)] == \
        ["RAW", "UPSCALED", "DETAILED", "FINAL", "IMAGE5"]
    assert types["optional"]["format_1"][0] == ["png", "webp", "jpeg", "png16", "exr", "avif"]
    assert list(types["optional"])[-1] == "exr_precision", "new inputs go last"
    assert types["optional"]["exr_precision"][0] == ["32", "16"]
    assert types["optional"]["exr_precision"][1]["default"] == "32"
    assert types["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def test_import_is_light():
    """Importing the node pulls in neither torch nor msgpack (msgpack only when it runs)."""
    code = (f"import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('n', {str(NODE_FILE)!r})\n"
            f"m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"print(sorted(k for k in ('torch', 'msgpack', 'PIL', 'folder_paths') "
            f"if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --- the local hand-off, the HTTP fallback, previews -----------------------------------------


def decoded(path):
    with Image.open(path) as img:
        return np.asarray(img)


def test_shared_memory_path_sends_no_pixels_and_saves_the_same_pixels(daemon, node, monkeypatch):
    sent = spy_requests(node, monkeypatch)
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    batch = gradient(2, 19, 23, 3, 11)
    batch[0, 0, 0] = [np.nan, -1.0, 2.0]
    rgba = gradient(1, 8, 9, 4, 12)
    text = node.submit(save_path=save_path, filename="shm", image_1=batch, image_2=rgba,
                       format_2="webp", lossless_webp=True)
    assert SUBMITTED.match(text), text
    (request,) = sent
    for image in request["images"]:
        assert "pixels" not in image, "pixels travel through shared memory"
        assert image["sample"] == "f32"
        assert set(image["handoff"]) == {"name", "offset"}
    first, second = request["images"][:2]
    assert first["handoff"]["name"] == second["handoff"]["name"], "one segment per input"
    assert second["handoff"]["offset"] == 19 * 23 * 3 * 4
    segments = sorted(p.name for p in daemon.handoff.iterdir())
    assert first["handoff"]["name"] in segments

    paths = [daemon.output / save_path / "RAW" / f"shm_RAW_{i}.png" for i in range(2)]
    webp = daemon.output / save_path / "UPSCALED" / "shm_UPSCALED.webp"
    wait_for_files(daemon, paths + [webp])
    for i, path in enumerate(paths):
        assert np.array_equal(decoded(path), reference_uint8(np.nan_to_num(batch[i])))
    assert decoded(paths[0])[0, 0].tolist() == [0, 0, 255]
    assert np.array_equal(decoded(webp), reference_uint8(rgba[0]))

    # The next run reuses the segment (no new file), and removing it at exit leaves nothing.
    assert SUBMITTED.match(node.submit(save_path=save_path, filename="again", image_1=batch))
    assert sorted(p.name for p in daemon.handoff.iterdir()) == segments
    node._remove_segments()
    assert not any(daemon.handoff.iterdir())


def test_pixels_via_shared_memory_and_via_http_are_identical(daemon, node, monkeypatch):
    x = np.random.default_rng(13).uniform(-0.2, 1.2, size=(1, 31, 29, 3)).astype(np.float32)
    x[0, 0, :5, 0] = np.array([0.5, 1.5, 254.5, 127.5, 0.0]) / 255  # halfway cases
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    sent = spy_requests(node, monkeypatch)
    node.submit(save_path=save_path, filename="shm", image_1=x, affix_1="")
    monkeypatch.setenv("LUNA_HANDOFF", "off")
    node.submit(save_path=save_path, filename="http", image_1=x, affix_1="")
    assert "handoff" in sent[0]["images"][0] and "pixels" in sent[1]["images"][0]
    shm, http = daemon.output / save_path / "shm.png", daemon.output / save_path / "http.png"
    wait_for_files(daemon, [shm, http])
    assert np.array_equal(decoded(shm), decoded(http))
    assert np.array_equal(decoded(shm), reference_uint8(x[0]))


def test_a_daemon_without_handoff_gets_pixels_inline(daemon_without_handoff, monkeypatch):
    d = daemon_without_handoff
    _clean_env(monkeypatch, d.url)
    node = load_node()
    sent = spy_requests(node, monkeypatch)
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    x = gradient(1, 12, 10, 3, 14)
    assert SUBMITTED.match(node.submit(save_path=save_path, filename="inline", image_1=x))
    assert node._handoff_dirs[d.url][0] is None, "GET /v1/handoff answered 404"
    (request,) = sent
    image = request["images"][0]
    assert "handoff" not in image and "sample" not in image, "8-bit formats travel as u8"
    assert len(image["pixels"]) == 12 * 10 * 3
    path = d.output / save_path / "RAW" / "inline_RAW.png"
    wait_for_files(d, [path])
    assert np.array_equal(decoded(path), reference_uint8(x[0]))


def test_a_handoff_file_the_gateway_cannot_see_falls_back_to_inline(
        daemon, node, monkeypatch, tmp_path):
    """The gateway is elsewhere (another container, say) but a folder of the same name exists
    here: the gateway answers 422 handoff_unavailable and the node sends the pixels inline."""
    elsewhere = tmp_path / "not-the-gateways"
    elsewhere.mkdir()
    monkeypatch.setattr(node, "handoff_dir", lambda *a, **k: str(elsewhere))
    forgotten = []
    real_forget = node.forget_handoff
    monkeypatch.setattr(node, "forget_handoff", lambda url: (forgotten.append(url),
                                                              real_forget(url)))
    sent = spy_requests(node, monkeypatch)
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    x = gradient(2, 6, 7, 3, 15)
    text = node.submit(save_path=save_path, filename="fallback", image_1=x)
    assert SUBMITTED.match(text) and SUBMITTED.match(text).group(1) == "2", text
    assert "\n" not in text, "the status text is unchanged"
    assert [("handoff" in i) for r in sent for i in r["images"]] == [True, True, False, False]
    assert forgotten == [daemon.url]
    paths = [daemon.output / save_path / "RAW" / f"fallback_RAW_{i}.png" for i in range(2)]
    wait_for_files(daemon, paths)
    for i, path in enumerate(paths):
        assert np.array_equal(decoded(path), reference_uint8(x[i]))


def test_a_request_without_an_answer_never_reuses_its_segment(tmp_path, monkeypatch):
    """A timed-out request may still be read by the gateway: its segment is dropped."""
    node = load_node()
    directory = tmp_path / "handoff"
    directory.mkdir()
    monkeypatch.setenv("LUNA_GATEWAY_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LUNA_SUBMIT_RETRY_FOR", "0.01")
    monkeypatch.setattr(node, "handoff_dir", lambda *a, **k: str(directory))

    def no_answer(*args, **kwargs):
        raise node.SubmitError("no answer", retryable=True, answered=False)

    monkeypatch.setattr(node, "post_job", no_answer)
    text = node.submit(image_1=gradient(1, 4, 4, 3, 16))
    assert text == f"{PREFIX} ERROR: no answer", text
    assert node._segments == {} and not any(directory.iterdir())


def test_segments_of_killed_processes_are_swept_and_live_ones_kept(tmp_path):
    """A ComfyUI stopped by SIGKILL (or SIGTERM, which it does not handle) leaves its segments;
    the next node to use the directory removes them, and never one a live process holds."""
    node = load_node()
    directory = tmp_path / "handoff"
    directory.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import importlib.util, sys, time\n"
         f"spec = importlib.util.spec_from_file_location('n', {str(NODE_FILE)!r})\n"
         "n = importlib.util.module_from_spec(spec); spec.loader.exec_module(n)\n"
         f"s = n.Segment({str(directory)!r}, 1); s.view((64, 64, 3))\n"
         "print(s.name, flush=True); time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        held = holder.stdout.readline().strip()
        assert held and (directory / held).is_file(), held
        (directory / "luna-1-1-0123456789ab.f32").write_bytes(b"\0" * 4096)  # nobody's
        (directory / "notes.txt").write_text("not a segment")
        (directory / "luna-2-1-0123456789ab.f32").symlink_to(tmp_path / "elsewhere")
        (tmp_path / "elsewhere").write_bytes(b"kept")
        mine = node.Segment(str(directory), 3)
        young = node.sweep_stale_segments(str(directory))  # the default minimum age
        assert young == [], young
        removed = node.sweep_stale_segments(str(directory), min_age_s=0)
        assert removed == ["luna-1-1-0123456789ab.f32"], removed
        assert (directory / held).is_file() and (directory / mine.name).is_file()
        holder.kill()
        holder.wait(timeout=10)
        removed = node.sweep_stale_segments(str(directory), min_age_s=0)
        assert removed == [held], removed
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            ["notes.txt", "luna-2-1-0123456789ab.f32", mine.name])
        assert (tmp_path / "elsewhere").read_bytes() == b"kept"
        mine.close()
    finally:
        holder.kill()
        holder.wait(timeout=10)


@pytest.fixture
def comfy_temp(tmp_path, monkeypatch):
    """ComfyUI's `folder_paths` as far as the node uses it: the temp folder `/view` serves."""
    temp = tmp_path / "comfy-temp"
    module = types.ModuleType("folder_paths")
    module.get_temp_directory = lambda: str(temp)
    monkeypatch.setitem(sys.modules, "folder_paths", module)
    return temp


def test_previews_are_listed_as_saveimage_lists_them_and_decode(daemon, node, comfy_temp):
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    ys, xs = np.mgrid[0:600, 0:1000].astype(np.float32)
    smooth = np.stack([xs / 999, ys / 599, (xs + ys) / 1598], axis=-1)  # JPEG-friendly
    big = np.stack([smooth, 1 - smooth])
    rgba = gradient(1, 40, 30, 4, 18)
    gray = gradient(1, 300, 200, 1, 19)
    out = node.LunaDaemonImageSaver().save(save_path=save_path, filename="p", image_1=big,
                                           image_2=rgba, format_2="webp", image_3=gray)
    text = out["result"][0]
    assert SUBMITTED.match(text), text
    assert out["ui"]["text"] == [text], "the status text is unchanged"
    images = out["ui"]["images"]
    assert len(images) == 4, images
    sizes, modes = [], []
    for entry in images:
        assert set(entry) == {"filename", "subfolder", "type"} and entry["type"] == "temp"
        path = comfy_temp / entry["subfolder"] / entry["filename"]
        with Image.open(path) as img:
            img.load()
            sizes.append(img.size)
            modes.append(img.mode)
    assert sizes == [(250, 150), (250, 150), (30, 40), (100, 150)], sizes
    assert modes == ["RGB", "RGB", "RGBA", "L"], modes
    # Close to the saved pixels (every 4th pixel of the frame, JPEG at quality 85).
    with Image.open(comfy_temp / images[0]["filename"]) as img:
        want = reference_uint8(big[0][::4, ::4]).astype(float)
        assert np.abs(np.asarray(img).astype(float) - want).mean() < 3


def test_no_previews_for_a_failed_submission(daemon, node, comfy_temp):
    out = node.LunaDaemonImageSaver().save(save_path="../outside",
                                           image_1=gradient(1, 2, 2, 3, 20))
    assert out["result"][0].startswith(f"{PREFIX} ERROR: ")
    assert "images" not in out["ui"]


class FakeTorch:
    """Duck-types the torch ops the node's 8-bit conversion uses, with numpy in float32."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.dtype = f"torch.{self.array.dtype}"
        self.shape = self.array.shape
        self.ops = []

    def _next(self, array, op):
        t = FakeTorch(array)
        t.ops = self.ops + [op]
        return t

    def mul(self, k):
        return self._next(self.array * np.float32(k), "mul")

    def add_(self, k):
        self.array += np.float32(k)
        self.ops.append("add_")
        return self

    def nan_to_num_(self, v):
        np.nan_to_num(self.array, copy=False, nan=v)
        self.ops.append("nan_to_num_")
        return self

    def clamp_(self, lo, hi):
        np.clip(self.array, lo, hi, out=self.array)
        self.ops.append("clamp_")
        return self

    def byte(self):
        return self._next(self.array.astype(np.uint8), "byte")

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


def test_inline_8bit_conversion_uses_the_tensors_own_ops_with_the_same_rounding():
    node = load_node()
    x = np.random.default_rng(21).uniform(-0.5, 1.5, size=(2, 5, 6, 3)).astype(np.float32)
    x[0, 0, 0] = [np.nan, np.inf, -np.inf]
    tensor = FakeTorch(x)
    got = node.uint8_batch(tensor)
    assert np.array_equal(got, node.float_to_uint8(x))
    assert np.array_equal(got, reference_uint8(np.nan_to_num(x)))
    slot = node.ImageInputSlot(1, tensor, "A", "jpeg", True)
    entry = slot.inline_entry(1)
    assert entry["pixels"] == reference_uint8(x[1]).tobytes() and "sample" not in entry


@pytest.mark.parametrize("fmt,sample,itemsize", [("png16", "u16", 2), ("exr", "f32", 4)])
def test_deep_formats_travel_inline_in_their_own_sample_type(fmt, sample, itemsize):
    node = load_node()
    x = np.random.default_rng(22).uniform(-0.1, 1.1, size=(3, 4, 3)).astype(np.float32)
    entry = node.image_entry(x, "A", fmt, True, 0, 1)
    assert entry["sample"] == sample and len(entry["pixels"]) == x.size * itemsize
    if fmt == "png16":
        want = np.clip(np.floor(x.astype(np.float64) * 65535 + 0.5), 0, 65535).astype("<u2")
        assert entry["pixels"] == want.tobytes()
    else:
        assert entry["pixels"] == x.astype("<f4").tobytes()


# --- deep formats end to end: they wait for the png16/exr encoders (branch `formats`) --------

# What a saver without the deep formats answers: no encoder, or (for 16-bit and float samples,
# which it reads as 8-bit) a shape mismatch. Once the formats land neither appears.
NO_ENCODER = re.compile(r"has no (png16|exr|avif) encoder|(pixel bytes do not fit)")


def wait_for_file_or_missing_encoder(daemon, job_id, path):
    """Waits for `path`; skips (saying why) while the saver has no encoder for the format."""
    deadline = time.monotonic() + FILE_TIMEOUT
    while not path.is_file():
        try:
            with urllib.request.urlopen(f"{daemon.status}/v1/jobs/{job_id}", timeout=2) as r:
                status = r.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError):
            status = ""
        missing = NO_ENCODER.search(status)
        if missing:
            what = missing.group(1) or "16-bit/float sample"
            pytest.skip(f"waits for the {what} support of the saver (branch formats): {status}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} missing; job status: {status}\n{daemon.logs()}", pytrace=False)
        time.sleep(0.1)


@pytest.mark.parametrize("handoff", [True, False], ids=["shm", "http"])
def test_png16_is_round_x_times_65535(daemon, node, monkeypatch, handoff):
    if not handoff:
        monkeypatch.setenv("LUNA_HANDOFF", "off")
    x = np.random.default_rng(23).uniform(-0.1, 1.1, size=(1, 9, 11, 3)).astype(np.float32)
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    text = node.submit(save_path=save_path, filename="deep", image_1=x, format_1="png16",
                       affix_1="")
    match = SUBMITTED.match(text)
    assert match, text
    path = daemon.output / save_path / "deep.png"
    wait_for_file_or_missing_encoder(daemon, match.group(2), path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I;16B", "RGB", "I"), img.mode
    import zlib  # Pillow flattens 16-bit RGB; read the samples from the PNG itself
    data = path.read_bytes()
    idat, pos = b"", 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"IHDR":
            ihdr = data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    assert ihdr[8] == 16 and ihdr[9] == 2, "16-bit RGB"
    raw = zlib.decompress(idat)
    stride = 11 * 3 * 2
    rows, prev = [], bytearray(stride)
    for r in range(9):
        f, line = raw[r * (stride + 1)], bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):  # undo the PNG filters (bpp = 6)
            a = line[i - 6] if i >= 6 else 0
            b = prev[i]
            c = prev[i - 6] if i >= 6 else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    got = np.frombuffer(b"".join(rows), dtype=">u2").reshape(9, 11, 3)
    want = np.clip(np.round(x[0].astype(np.float64) * 65535), 0, 65535).astype(np.uint16)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("precision", ["32", "16"])
def test_exr_keeps_the_tensor_within_its_precision(daemon, node, precision):
    x = np.random.default_rng(24).uniform(-0.1, 1.1, size=(1, 7, 5, 3)).astype(np.float32)
    save_path = f"comfy/{uuid.uuid4().hex[:12]}"
    text = node.submit(save_path=save_path, filename="deep", image_1=x, format_1="exr",
                       affix_1="", exr_precision=precision)
    match = SUBMITTED.match(text)
    assert match, text
    path = daemon.output / save_path / "deep.exr"
    wait_for_file_or_missing_encoder(daemon, match.group(2), path)
    import OpenEXR  # tests/interop/requirements.txt
    with OpenEXR.File(str(path)) as f:
        channels = f.channels()
        if "RGB" in channels:
            got = np.asarray(channels["RGB"].pixels, dtype=np.float32)
        else:
            got = np.stack([np.asarray(channels[c].pixels, dtype=np.float32) for c in "RGB"],
                           axis=-1)
    assert got.shape == (7, 5, 3), got.shape
    if precision == "32":
        assert np.array_equal(got, x[0])
    else:
        assert np.allclose(got, x[0].astype(np.float16).astype(np.float32), atol=0, rtol=0)
