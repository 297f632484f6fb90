"""png16, EXR and AVIF files, the iTXt and UserComment metadata and the WebP chunk placement,
read back by independent readers: Pillow, pypng (16-bit RGB), OpenEXR and libwebp (Pillow's
WebP decoder).

Pixels go in as float samples (`"sample": "f32"`, as a ComfyUI tensor holds them) through the
image-saving core (`cargo run -p luna-store --example save_request`).
"""

import base64
import io
import json
import math

import numpy as np
import png as pypng
import pytest
from PIL import Image

from test_pillow_interop import PARAMETERS, PROMPT, WORKFLOW, photo, request, save


def float_field(values, fmt, affix=""):
    """An image field with float samples: values is an (h, w, c) float32 array."""
    h, w, c = values.shape
    return {
        "pixels": base64.b64encode(values.astype("<f4").tobytes()).decode(),
        "sample": "f32",
        "width": w,
        "height": h,
        "channels": c,
        "format": fmt,
        "affix": affix,
    }


def float_frame(h, w, c, seed=0):
    """Floats covering the range, with values just below/above 0 and 1 and rounding halves."""
    rng = np.random.default_rng(seed)
    v = rng.random((h, w, c), dtype=np.float32)
    flat = v.reshape(-1)
    flat[::17] = -0.25
    flat[1::17] = 1.5
    flat[2::17] = np.float32(0.5 / 65535)
    return v


def photo_floats(mode):
    arr = np.asarray(photo(mode), dtype=np.float32) / np.float32(255)
    return arr if arr.ndim == 3 else arr[:, :, None]


def to_u16(v):
    """The contract's rounding, as numpy computes it on a float32 tensor."""
    return np.clip(v * np.float32(65535) + np.float32(0.5), 0, 65535).astype(np.uint16)


def psnr(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 10 * math.log10(255 * 255 / np.mean((a - b) ** 2))


def test_png16_reads_back_as_round_x_times_65535(tmp_path):
    gray, rgb, rgba = float_frame(31, 45, 1, 1), float_frame(31, 45, 3, 2), float_frame(31, 45, 4, 3)
    paths = save(
        tmp_path,
        request([float_field(gray, "png16", "G"), float_field(rgb, "png16", "RGB"), float_field(rgba, "png16", "A")]),
    )
    for p in paths.values():
        assert p.suffix == ".png", p

    # Pillow reads 16-bit gray as mode I;16.
    g = Image.open(paths[0])
    assert g.mode == "I;16", g.mode
    assert np.array_equal(np.asarray(g, dtype=np.uint16), to_u16(gray[:, :, 0]))
    assert json.loads(g.text["workflow"]) == WORKFLOW
    assert g.text["parameters"] == PARAMETERS.replace("256x256", "45x31")

    # Pillow narrows 16-bit RGB(A) to 8 bits; pypng reads every bit.
    for index, original, planes in [(1, rgb, 3), (2, rgba, 4)]:
        w, h, rows, info = pypng.Reader(filename=str(paths[index])).read()
        assert info["bitdepth"] == 16 and info["planes"] == planes, info
        got = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, planes)
        assert np.array_equal(got, to_u16(original)), f"image {index}"


def test_png16_keeps_u16_samples_from_the_wire(tmp_path):
    rng = np.random.default_rng(7)
    u16 = rng.integers(0, 65536, size=(20, 30, 3), dtype=np.uint16)
    field = {
        "pixels": base64.b64encode(u16.astype("<u2").tobytes()).decode(),
        "sample": "u16",
        "width": 30,
        "height": 20,
        "channels": 3,
        "format": "png16",
    }
    paths = save(tmp_path, request([field]))
    w, h, rows, info = pypng.Reader(filename=str(paths[0])).read()
    got = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, 3)
    assert np.array_equal(got, u16)


@pytest.mark.parametrize("precision", [16, 32])
def test_exr_within_its_precision_with_metadata_attributes(tmp_path, precision):
    import OpenEXR

    values = float_frame(17, 23, 3, 4) * np.float32(4) - np.float32(1)  # beyond 0..1: kept as is
    rgba = float_frame(17, 23, 4, 5)
    paths = save(
        tmp_path,
        request([float_field(values, "exr"), float_field(rgba, "exr", "A")], exr_precision=precision),
    )
    assert paths[0].suffix == ".exr"
    for index, original in [(0, values), (1, rgba)]:
        with OpenEXR.File(str(paths[index])) as f:
            header = dict(f.header())  # copied: the view ends with the file
            channels = f.channels()
            names = "RGBA"[: original.shape[2]]
            if "RGB" in channels or "RGBA" in channels:
                stacked = channels.get("RGBA", channels.get("RGB")).pixels
            else:
                stacked = np.stack([channels[n].pixels for n in names], axis=-1)
            got = np.asarray(stacked, dtype=np.float32).reshape(original.shape)
            dtype = {16: np.float16, 32: np.float32}[precision]
            assert np.asarray(stacked).dtype == dtype, np.asarray(stacked).dtype
            assert np.array_equal(got, original.astype(dtype).astype(np.float32)), f"image {index}"
        text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in header.items()}
        assert json.loads(text["prompt"]) == PROMPT
        assert json.loads(text["workflow"]) == WORKFLOW
        assert text["parameters"].startswith("an astronaut in front of a flag\n")
        assert text["artist"] == "Luna QA" and text["luna_job_id"]


def test_avif_quality_and_exif(tmp_path):
    rgb = photo("RGB")
    paths = save(tmp_path, request([float_field(photo_floats("RGB"), "avif", "")], lossy_quality=90))
    assert paths[0].suffix == ".avif"
    img = Image.open(paths[0])
    assert img.format == "AVIF"
    db = psnr(np.asarray(rgb), np.asarray(img.convert("RGB")))
    assert db >= 35.0, f"AVIF at quality 90 reached only {db:.2f} dB"
    exif = img.getexif()
    prefix, _, payload = exif[0x0110].partition(":")
    assert prefix == "prompt" and json.loads(payload) == PROMPT
    prefix, _, payload = exif[0x010F].partition(":")
    assert prefix == "workflow" and json.loads(payload) == WORKFLOW
    assert exif.get_ifd(0x8769)[0x9286] == b"ASCII\0\0\0" + PARAMETERS.encode()


def test_non_ascii_text_reads_back_from_itxt(tmp_path):
    rgb = photo("RGB")
    meta = {"positive": "月の光, naïve", "steps": 4}
    paths = save(
        tmp_path,
        request(
            [{"pixels": base64.b64encode(rgb.tobytes()).decode(), "width": 256, "height": 256, "channels": 3, "format": "png"}],
            metadata=meta,
            custom_metadata=json.dumps({"artist": "Zoë", "plain": "ascii"}),
        ),
    )
    img = Image.open(paths[0])
    img.load()
    assert img.text["artist"] == "Zoë"
    assert img.text["parameters"].startswith("月の光, naïve\n")
    # Which chunk each went into: iTXt for non-ASCII, tEXt for the rest (the JSON included).
    kinds = {}
    data = paths[0].read_bytes()
    at = 8
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8].decode()
        if kind in ("tEXt", "iTXt"):
            body = data[at + 8 : at + 8 + n]
            kinds[body[: body.index(b"\0")].decode("latin-1")] = kind
        at += 12 + n
    assert kinds["artist"] == kinds["parameters"] == "iTXt"
    assert kinds["plain"] == kinds["workflow"] == kinds["prompt"] == "tEXt"


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif"])
@pytest.mark.parametrize("text", ["an astronaut, Steps: 4", "月の光, naïve"])
def test_user_comment_carries_a1111_parameters(tmp_path, fmt, text):
    rgb = photo("RGB")
    paths = save(
        tmp_path,
        request(
            [{"pixels": base64.b64encode(rgb.tobytes()).decode(), "width": 256, "height": 256, "channels": 3, "format": fmt}],
            metadata={"positive": text},
        ),
    )
    exif = Image.open(paths[0]).getexif()
    comment = exif.get_ifd(0x8769)[0x9286]
    expected = f"{text}\nSize: 256x256, Model: sdxl_base"
    if text.isascii():
        assert comment == b"ASCII\0\0\0" + expected.encode()
    else:
        # piexif's convention (A1111 writes and reads it so): UTF-16 big-endian.
        assert comment[:8] == b"UNICODE\0"
        assert comment[8:].decode("utf-16-be") == expected


def old_frontend_exif(data):
    """The EXIF chunk as ComfyUI's frontend before the padding fix finds it: walking by 8 + size
    with no pad byte, stopping at the first EXIF."""
    at = 12
    while at + 8 <= len(data):
        kind, n = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        if kind == b"EXIF":
            return data[at + 8 : at + 8 + n] if at + 8 + n <= len(data) else None
        at += 8 + n
    return None


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_exif_is_found_by_every_reader_whatever_the_image_chunk_length(tmp_path, lossless):
    # Sizes chosen so the image chunks come out both odd and even in length.
    images = []
    for i, side in enumerate(range(16, 64, 3)):
        img = photo("RGBA").resize((side, side + 1))
        if i % 2:
            img.putalpha(photo("L").resize((side, side + 1)))  # a varied alpha plane
        images.append({"pixels": base64.b64encode(img.tobytes()).decode(), "width": side, "height": side + 1,
                       "channels": 4, "format": "webp"})
    paths = save(tmp_path, request(images[:16], lossless_webp=lossless))
    parities = set()
    for index, p in paths.items():
        data = p.read_bytes()
        # The image chunk's own length, walked as the spec says (with pad bytes).
        at, chunks = 12, []
        while at + 8 <= len(data):
            n = int.from_bytes(data[at + 4 : at + 8], "little")
            chunks.append((data[at : at + 4], n))
            at += 8 + n + n % 2
        assert [c[0] for c in chunks][:2] == [b"VP8X", b"EXIF"], chunks
        parities.update(n % 2 for _, n in chunks[2:])  # ALPH, VP8 , VP8L
        assert old_frontend_exif(data) is not None, f"image {index}: {chunks}"
        img = Image.open(p)
        exif = img.getexif()  # Pillow (libwebp's demuxer)
        assert exif[0x010F].startswith("workflow:"), index
        img.load()  # libwebp decodes the frame
        assert img.size == (images[index]["width"], images[index]["height"])
        if lossless:
            src = np.frombuffer(base64.b64decode(images[index]["pixels"]), dtype=np.uint8)
            assert np.array_equal(np.asarray(img.convert("RGBA")).reshape(-1), src)
    assert parities == {0, 1}, "both odd and even image chunks were covered"
