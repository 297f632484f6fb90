#!/usr/bin/env python3
"""The performance table, from one run: Luna Saver against Pillow and RabbitMQ's own floor.

    cargo build --release --bin luna
    .venv/bin/python bench/table.py [--json table.json]

Measures, one after another on this machine (so run it idle), on the corpus pictures
(``../shared/corpus``; see ``bench/README.md``) with ComfyUI's metadata:

- the encoders, per core where Luna's is single-threaded: ``cargo bench -p luna-imaging
  --bench encode -- --json`` for png-1, png-4, jpeg-q90, webp-q90, webp-lossless, against
  Pillow's save of the same picture with the same metadata (PNG level 4, JPEG quality 90
  4:4:4, WebP quality 90, WebP lossless);
- the pipeline: ``cargo bench -p luna-e2e --bench pipeline`` (needs RabbitMQ at
  ``LUNA_AMQP_URL``): the caller's wait per 1024x1024 POST to ``luna up`` and to the
  distributed gateway, against Pillow's save; RabbitMQ's floor for the same message;
  images/s end to end against Pillow saving the same photograph on every core;
- one 3840x2160 PNG, POST to ``luna up`` until the file is on disk, against Pillow saving it;
- 256x256 tiles: files/s through ``luna up`` against Pillow (``bench/small_files.py``).

Prints one markdown table with each ratio beside its target, and writes every figure as JSON.
Needs Pillow, numpy and msgpack (the test venv) and ``target/release/luna``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from PIL import Image, PngImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parent))
import luna_daemon  # noqa: E402
import small_files  # noqa: E402
from pillow_png import dumps, load_images, measure, prompt, workflow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = "png-1,png-4,jpeg-q90,webp-q90,webp-lossless"


def png_info() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", dumps(prompt()))
    info.add_text("workflow", dumps(workflow()))
    return info


def exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[0x0110] = "prompt:" + dumps(prompt())
    exif[0x010F] = "workflow:" + dumps(workflow())
    return exif.tobytes()


def pillow_saves(im: Image.Image) -> dict[str, tuple[float, int]]:
    info, exif = png_info(), exif_bytes()
    options = {
        "png-4": {"format": "PNG", "compress_level": 4, "pnginfo": info},
        "jpeg-q90": {"format": "JPEG", "quality": 90, "subsampling": 0, "exif": exif},
        "webp-q90": {"format": "WEBP", "quality": 90, "exif": exif},
        "webp-lossless": {"format": "WEBP", "lossless": True, "exif": exif},
    }
    out = {}
    for case, kw in options.items():
        def save(kw=kw) -> int:
            buf = io.BytesIO()
            im.save(buf, **kw)
            return buf.tell()
        ms, _, size = measure(save)
        out[case] = (ms, size)
    return out


def luna_encodes() -> dict[tuple[str, str], dict]:
    env = dict(os.environ, LUNA_BENCH_CASES=CASES)
    done = subprocess.run(["cargo", "bench", "-p", "luna-imaging", "--bench", "encode", "--", "--json"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {(r["image"], r["case"]): r for r in rows}


def pipeline() -> dict[str, float]:
    done = subprocess.run(["cargo", "bench", "-p", "luna-e2e", "--bench", "pipeline"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True)
    text = done.stdout
    def grab(pattern: str) -> float:
        m = re.search(pattern, text)
        if not m:
            sys.exit(f"pipeline bench output lacks {pattern!r}:\n{text}")
        return float(m.group(1))
    return {
        "luna_up_post_ms": grab(r"luna up \(in process\) POST.*?median ([\d.]+) ms"),
        "gateway_post_ms": grab(r"gateway POST.*?median ([\d.]+) ms"),
        "rabbitmq_floor_ms": grab(r"RabbitMQ floor.*?median ([\d.]+) ms"),
        "end_to_end_images_s": grab(r"1 saver\(s\) x 2..4 slots: ([\d.]+) images/s"),
    }


def _save_one(args) -> None:
    path, raw, size = args
    Image.frombytes("RGB", size, raw).save(path, compress_level=4, pnginfo=png_info())


def pillow_all_cores(im: Image.Image, n: int) -> float:
    """Images/s saving `n` copies of `im` at level 4, one process per core."""
    raw = im.tobytes()
    with tempfile.TemporaryDirectory(dir=ROOT / "target") as tmp, \
            multiprocessing.Pool(os.cpu_count()) as pool:
        jobs = [(os.path.join(tmp, f"{i}.png"), raw, im.size) for i in range(n)]
        pool.map(_save_one, jobs[: os.cpu_count()])  # warm the workers
        started = time.perf_counter()
        pool.map(_save_one, jobs, chunksize=1)
        return n / (time.perf_counter() - started)


def post_to_file(binary: str, im: Image.Image, runs: int) -> tuple[float, float]:
    """Median ms from POSTing `im` (PNG level 4, workflow embedded) to `luna up` until its file
    is on disk, and Pillow's median ms saving it to a file on the same disk."""
    raw = im.tobytes()
    with tempfile.TemporaryDirectory(dir=ROOT / "target") as tmp:
        tmp = Path(tmp)
        pillow = []
        for i in range(runs):
            started = time.perf_counter()
            im.save(tmp / f"pillow_{i}.png", compress_level=4, pnginfo=png_info())
            pillow.append((time.perf_counter() - started) * 1e3)
        output = tmp / "luna"
        with luna_daemon.running(binary, output) as port:
            luna = []
            for i in range(runs + 1):
                body = msgpack.packb({
                    "save_path": "big", "filename": f"frame_{i}", "png_compression": 4,
                    "prompt": prompt(), "extra_pnginfo": {"workflow": workflow()},
                    "images": [{"width": im.width, "height": im.height, "channels": 3,
                                "format": "png", "pixels": raw, "affix": "", "subdir": False}],
                }, use_bin_type=True)
                target = output / "big" / f"frame_{i}.png"
                started = time.perf_counter()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                c.request("POST", "/v1/jobs", body=body,
                          headers={"Content-Type": "application/msgpack"})
                r = c.getresponse()
                r.read()
                c.close()
                if r.status != 202:
                    sys.exit(f"POST answered {r.status}")
                while not target.exists():
                    time.sleep(0.001)
                if i > 0:  # the first warms the daemon up
                    luna.append((time.perf_counter() - started) * 1e3)
    return statistics.median(luna), statistics.median(pillow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--luna", default=str(ROOT / "target" / "release" / "luna"))
    parser.add_argument("--json", metavar="FILE", help="write every figure here")
    args = parser.parse_args()
    (ROOT / "target").mkdir(exist_ok=True)
    images, note = load_images()
    by_name = dict(images)
    photo = by_name.get("bythewater_1024x1024.png") or images[0][1]
    big = by_name.get("canopee_3840x2160.png") or images[-1][1]

    print("measuring encoders (Luna, then Pillow) ...", file=sys.stderr, flush=True)
    luna = luna_encodes()
    pillow = {name: pillow_saves(im) for name, im in images}
    print("measuring the pipeline (needs RabbitMQ) ...", file=sys.stderr, flush=True)
    pipe = pipeline()
    pillow_rate = pillow_all_cores(photo, 48)
    print("measuring a 4K frame POST to file ...", file=sys.stderr, flush=True)
    big_luna_ms, big_pillow_ms = post_to_file(args.luna, big, 5)
    print("measuring small files ...", file=sys.stderr, flush=True)
    tiles = small_files.tiles(small_files.source_picture()[0], 512)
    with tempfile.TemporaryDirectory(dir=ROOT / "target") as tmp:
        tile_pillow = small_files.pillow(tiles, Path(tmp) / "pillow", durable=False)
        tile_luna = small_files.luna(tiles, Path(tmp), args.luna)

    photo_name = next(n for n, im in images if im is photo)
    pillow_photo_ms = pillow[photo_name]["png-4"][0]
    rows = [
        ("`luna up`: caller blocked per 1024x1024 POST (saves alongside)",
         f"{pipe['luna_up_post_ms']:.2f} ms", f"{pillow_photo_ms:.1f} ms save",
         pillow_photo_ms / pipe["luna_up_post_ms"], ">= 50x", None),
        ("distributed: gateway POST, durable confirmed publish",
         f"{pipe['gateway_post_ms']:.2f} ms", f"{pillow_photo_ms:.1f} ms save",
         pillow_photo_ms / pipe["gateway_post_ms"], ">= 15x",
         f"RabbitMQ floor {pipe['rabbitmq_floor_ms']:.2f} ms"),
        ("`luna up` end to end, 48 x 1024x1024 PNG level 4",
         f"{pipe['end_to_end_images_s']:.1f} img/s", f"{pillow_rate:.1f} img/s (all cores)",
         pipe["end_to_end_images_s"] / pillow_rate, ">= 4x", None),
        ("one 3840x2160 PNG level 4, POST to file on disk",
         f"{big_luna_ms:.0f} ms", f"{big_pillow_ms:.0f} ms", big_pillow_ms / big_luna_ms, ">= 8x", None),
    ]
    targets = {"png-4": (">= 6x", "<= +2%"), "png-1": (">= 20x", "<= +8%"),
               "jpeg-q90": (">= 1x", "<= +0%"), "webp-q90": (">= 1x", "<= +0%"),
               "webp-lossless": (">= 1x", "<= +0%")}
    for name, _ in images:
        for case, (speed_target, size_target) in targets.items():
            row = luna.get((name, case))
            peer_ms, peer_bytes = pillow[name]["png-4" if case == "png-1" else case]
            if not row:
                continue
            size = row["bytes"] / peer_bytes - 1
            rows.append((f"{case} encode, {name} (Luna {'1 core' if case.startswith('png') or case.startswith('webp') else 'all cores'})",
                         f"{row['ms']:.1f} ms", f"{peer_ms:.1f} ms" + (" (level 4)" if case == "png-1" else ""),
                         peer_ms / row["ms"], speed_target, f"size {size:+.2%} (target {size_target})"))
    rows.append(("256x256 PNG tiles, POST to durable file vs Pillow's save", f"{tile_luna:.0f} files/s",
                 f"{tile_pillow:.0f} files/s", tile_luna / tile_pillow, "(reported)", None))

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Pillow {Image.__version__}, Python {platform.python_version()}; {note}\n")
    print("| what | Luna | Pillow | ratio | target | note |\n|---|---|---|---|---|---|")
    for what, ours, theirs, ratio, target, extra in rows:
        print(f"| {what} | {ours} | {theirs} | {ratio:.2f}x | {target} | {extra or ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cores": os.cpu_count(), "pillow": Image.__version__, "pipeline": pipe,
            "pillow_all_cores_images_s": pillow_rate, "png_4k_post_to_file_ms": big_luna_ms,
            "pillow_4k_save_to_file_ms": big_pillow_ms, "tiles_luna_files_s": tile_luna,
            "tiles_pillow_files_s": tile_pillow,
            "encode": {f"{k[0]} {k[1]}": v for k, v in luna.items()},
            "pillow_encode": {n: {c: {"ms": ms, "bytes": b} for c, (ms, b) in v.items()}
                              for n, v in pillow.items()},
            "rows": [{"what": r[0], "luna": r[1], "pillow": r[2], "ratio": r[3], "target": r[4],
                      "note": r[5]} for r in rows],
        }, indent=1))


if __name__ == "__main__":
    main()
