"""The OpenEXR and AVIF encoders of `luna-imaging`, read back by independent readers.

Runs the encoders on raw samples (`cargo run -p luna-imaging --example encode_raw`) and reads
the files with the OpenEXR project's own Python bindings (PyPI `OpenEXR`) and with Pillow
(libavif with dav1d): float samples bit for bit, half samples as IEEE half rounds them, the
`string` attributes, AVIF pixels at >= 35 dB PSNR at quality 90, and the EXIF in ComfyUI's
scheme through `Image.getexif()`.
"""

import io
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
from PIL import Image, features

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT / "tests" / "data" / "astronaut_256.png"

PROMPT = {"3": {"class_type": "KSampler", "inputs": {"seed": 1234, "text": "caf\u00e9"}}}
WORKFLOW = {"last_node_id": 9, "nodes": [{"id": i, "type": "KSampler"} for i in range(9000)]}


def encode(tmp_path, fmt, raw, width, height, channels, setting, meta):
    src, meta_file, out = tmp_path / "in.raw", tmp_path / "meta.json", tmp_path / f"out.{fmt}"
    src.write_bytes(raw)
    meta_file.write_text(json.dumps(meta))
    cmd = [
        "cargo", "run", "--quiet", "-p", "luna-imaging", "--example", "encode_raw", "--",
        fmt, str(src), str(width), str(height), str(channels), str(setting), str(meta_file), str(out),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    return out


def comfy_meta():
    # What ComfyUI embeds (json.dumps, ASCII), plus A1111 text with non-ASCII characters.
    return [
        ["prompt", json.dumps(PROMPT)],
        ["workflow", json.dumps(WORKFLOW)],
        ["parameters", "a caf\u00e9 at dusk \u2615\nSteps: 20, Seed: 1234"],
        ["luna_job_id", "job-42"],
    ]


def tensor(channels):
    """The test photo as a float tensor (x / 255), plus values a render can hold."""
    rgb = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float32) / 255.0
    h, w, _ = rgb.shape
    alpha = np.linspace(0.0, 1.0, w * h, dtype=np.float32).reshape(h, w, 1)
    t = {1: rgb[:, :, 1:2], 3: rgb, 4: np.concatenate([rgb, alpha], axis=2)}[channels].copy()
    t[0, :8, 0] = [np.nan, np.inf, -np.inf, -0.5, 3.75, 70000.0, 1e-9, -0.0]
    return t


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("bits", [16, 32])
def test_exr_samples_and_attributes_read_back_with_openexr(tmp_path, channels, bits):
    t = tensor(channels)
    h, w, _ = t.shape
    meta = comfy_meta()
    out = encode(tmp_path, "exr", t.astype("<f4").tobytes(), w, h, channels, bits, meta)

    f = OpenEXR.File(str(out), separate_channels=True)
    header = f.header()
    names = {1: ["Y"], 3: ["R", "G", "B"], 4: ["R", "G", "B", "A"]}[channels]
    assert sorted(f.channels()) == sorted(names)
    assert header["compression"] == OpenEXR.ZIP_COMPRESSION
    assert [int(v) for v in header["dataWindow"][1]] == [w - 1, h - 1]
    for key, value in meta:
        assert header[key] == value, key
    assert json.loads(header["workflow"]) == WORKFLOW

    for i, name in enumerate(names):
        got = f.channels()[name].pixels
        want = t[:, :, i]
        if bits == 32:
            assert got.dtype == np.float32
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
        else:
            assert got.dtype == np.float16
            # numpy's float16 rounds to nearest even, as IEEE and OpenEXR's half do.
            with np.errstate(over="ignore"):  # 70000 is past half's range: infinity
                expected = want.astype(np.float16)
            assert np.array_equal(got.view(np.uint16), expected.view(np.uint16)), name
            finite = np.isfinite(want) & (np.abs(want) < 65504)
            rel = np.abs(got[finite].astype(np.float64) - want[finite]) / np.maximum(np.abs(want[finite]), 2**-14)
            assert rel.max() <= 2**-11, name


def psnr(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255 * 255 / mse)


def exif_json(exif, tag, key):
    prefix, _, payload = exif[tag].partition(":")
    assert prefix == key
    return json.loads(payload)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF support")
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_avif_decodes_in_pillow_with_exif_and_quality(tmp_path, mode):
    img = Image.open(PHOTO).convert("RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize(img.size))
    elif mode == "L":
        img = img.convert("L")
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    out = encode(tmp_path, "avif", img.tobytes(), img.width, img.height, channels, 90, comfy_meta())

    back = Image.open(io.BytesIO(out.read_bytes()))
    assert back.format == "AVIF" and back.size == img.size
    assert back.mode == ("RGBA" if mode == "RGBA" else "RGB")
    back.load()
    exif = back.getexif()
    assert exif_json(exif, 0x0110, "prompt") == PROMPT
    assert exif_json(exif, 0x010F, "workflow") == WORKFLOW

    if mode == "L":
        # Gray is stored as RGB: every channel carries the gray image.
        for band in back.split():
            assert psnr(img, band) >= 35
    elif mode == "RGBA":
        assert psnr(img.getchannel("A"), back.getchannel("A")) >= 35
        assert psnr(img.convert("RGB"), back.convert("RGB")) >= 35
    else:
        assert psnr(img, back) >= 35
