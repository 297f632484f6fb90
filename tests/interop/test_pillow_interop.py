"""Files written by Luna Saver, read back by an independent reader: Pillow.

Builds save requests from a real photograph, runs them through the image-saving core
(`cargo run -p luna-store --example save_request`), and checks what ComfyUI and other tools
rely on: PNG text chunks, WebP/JPEG EXIF in ComfyUI's scheme, exact pixels for lossless
formats and >= 35 dB PSNR for lossy ones at quality 90.
"""

import base64
import io
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT / "tests" / "data" / "astronaut_256.png"

PROMPT = {"3": {"class_type": "KSampler", "inputs": {"seed": 1234, "steps": 25, "text": "café ☕"}}}
WORKFLOW = {
    "last_node_id": 9,
    "nodes": [{"id": 9, "type": "LunaDaemonImageSaver", "title": "Ünïcode ✓"}],
    "links": [[1, 3, 0, 9, 0, "IMAGE"]],
}
METADATA = {
    "positive": "an astronaut in front of a flag",
    "negative": "blurry, lowres",
    "steps": 25,
    "sampler_name": "euler",
    "cfg": 6.5,
    "seed": 1234,
}
PARAMETERS = (
    "an astronaut in front of a flag\n"
    "Negative prompt: blurry, lowres\n"
    'Steps: 25, Sampler: euler, CFG scale: 6.5, Seed: 1234, Size: 256x256, Model: sdxl_base'
)


def photo(mode):
    return Image.open(PHOTO).convert(mode)


def image_field(img, fmt, affix):
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[img.mode]
    return {
        "pixels": base64.b64encode(img.tobytes()).decode(),
        "width": img.width,
        "height": img.height,
        "channels": channels,
        "format": fmt,
        "affix": affix,
    }


def save(tmp_path, request):
    req_file = tmp_path / "request.json"
    req_file.write_text(json.dumps(request))
    out = tmp_path / "out"
    cmd = ["cargo", "run", "--quiet", "-p", "luna-store", "--example", "save_request", "--", str(req_file), str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert all(line["outcome"] == "saved" for line in lines), lines
    return {line["index"]: out / line["path"] for line in lines}


def request(images, **extra):
    base = {
        "save_path": "interop/%model_name%",
        "filename": "%time:YYYY-mm-dd_%index%",
        "model_name": "checkpoints/sdxl_base.safetensors",
        "index": 7,
        "prompt": PROMPT,
        "extra_pnginfo": {"workflow": WORKFLOW},
        "metadata": METADATA,
        "custom_metadata": json.dumps({"artist": "Luna QA"}),
        "images": images,
    }
    base.update(extra)
    return base


def psnr(a, b):
    assert a.size == b.size and a.mode == b.mode
    pa, pb = a.tobytes(), b.tobytes()
    mse = sum((x - y) ** 2 for x, y in zip(pa, pb)) / len(pa)
    return 10 * math.log10(255 * 255 / mse)


def exif_json(exif, tag, key):
    value = exif[tag]
    prefix, _, payload = value.partition(":")
    assert prefix == key, value[:40]
    return json.loads(payload)


def test_png_text_chunks_and_exact_pixels(tmp_path):
    rgb, gray, rgba = photo("RGB"), photo("L"), photo("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    paths = save(tmp_path, request([image_field(rgb, "png", "RAW"), image_field(gray, "png", ""), image_field(rgba, "png", "A")]))

    png = Image.open(paths[0])
    assert paths[0].parent.name == "RAW" and paths[0].name.endswith("_7_RAW.png"), paths[0]
    assert json.loads(png.text["prompt"]) == PROMPT
    assert json.loads(png.text["workflow"]) == WORKFLOW
    assert png.text["parameters"] == PARAMETERS
    assert png.text["artist"] == "Luna QA"
    assert png.text["luna_job_id"]
    assert png.mode == "RGB" and png.tobytes() == rgb.tobytes()

    g = Image.open(paths[1])
    assert g.mode == "L" and g.tobytes() == gray.tobytes()
    a = Image.open(paths[2])
    assert a.mode == "RGBA" and a.tobytes() == rgba.tobytes()


def test_webp_lossless_exif_and_exact_pixels(tmp_path):
    rgb, rgba = photo("RGB"), photo("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    paths = save(tmp_path, request([image_field(rgb, "webp", ""), image_field(rgba, "webp", "ALPHA")], lossless_webp=True))
    for index, original in [(0, rgb), (1, rgba)]:
        img = Image.open(paths[index])
        exif = img.getexif()
        assert exif_json(exif, 0x0110, "prompt") == PROMPT
        assert exif_json(exif, 0x010F, "workflow") == WORKFLOW
        decoded = img.convert(original.mode)
        assert decoded.tobytes() == original.tobytes(), f"lossless WebP changed pixels of image {index}"


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_lossy_formats_exif_and_psnr(tmp_path, fmt):
    rgb = photo("RGB")
    paths = save(tmp_path, request([image_field(rgb, fmt, "FINAL")], lossy_quality=90))
    img = Image.open(paths[0])
    assert img.format == {"webp": "WEBP", "jpeg": "JPEG"}[fmt]
    assert paths[0].suffix == {"webp": ".webp", "jpeg": ".jpg"}[fmt]
    exif = img.getexif()
    assert exif_json(exif, 0x0110, "prompt") == PROMPT
    assert exif_json(exif, 0x010F, "workflow") == WORKFLOW
    db = psnr(rgb, img.convert("RGB"))
    assert db >= 35.0, f"{fmt} at quality 90 reached only {db:.2f} dB"


def test_jpeg_metadata_too_big_for_exif_goes_to_a_sidecar(tmp_path):
    big = {"nodes": [{"id": i, "widgets_values": ["x" * 100]} for i in range(1500)]}
    rgb = photo("RGB")
    paths = save(tmp_path, request([image_field(rgb, "jpeg", "")], extra_pnginfo={"workflow": big}))
    img = Image.open(paths[0])
    img.load()  # the image itself stays valid
    sidecar = json.loads(Path(str(paths[0]) + ".json").read_text())
    assert sidecar["workflow"] == big and sidecar["prompt"] == PROMPT
    assert 0x010F in img.getexif()  # what fits is still embedded
