#!/usr/bin/env python3
"""Pillow's PNG save against Luna's PNG encoder, on the same pictures and metadata.

Measures Pillow's ``Image.save(format="PNG", compress_level=4, pnginfo=...)`` with the text
chunks ComfyUI's SaveImage writes (``prompt`` then a ~20 KB ``workflow``, built byte for byte
like ``libs/imaging/benches/encode.rs`` builds them), then runs the Luna bench
(``cargo bench -p luna-imaging --bench encode -- --json``) and compares, per image, Luna's
png-4 with Pillow's level 4 (Luna png-1 and png-9 alongside).

    python3 bench/pillow_png.py                        # measure Pillow, run the Luna bench
    python3 bench/pillow_png.py --no-cargo --luna-json luna.jsonl

Images: ``../shared/corpus/`` next to the workspace, ``LUNA_BENCH_IMAGES`` (comma-separated
paths) to override, else ``tests/data/astronaut_256.png`` upscaled to 1024x1024. Needs Pillow.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

from PIL import Image, PngImagePlugin, features

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ["bythewater_1024x1024.png", "canopee_3840x2160.png"]
FALLBACK = "tests/data/astronaut_256.png"
FALLBACK_SIDE = 1024
FALLBACK_NAME = "astronaut_256-upscaled"
WARMUPS = 2
MIN_RUNS = 3
BUDGET_S = 1.5
LUNA_CMD = ["cargo", "bench", "-p", "luna-imaging", "--bench", "encode", "--", "--json"]

NODE_TYPES = [
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "LoraLoader",
    "SaveImage",
]


def dumps(value) -> str:
    # serde_json without `preserve_order`: sorted keys, compact, ASCII (Luna's `ascii_json`).
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def workflow() -> dict:
    """Same deterministic workflow as `workflow()` in libs/imaging/benches/encode.rs."""
    nodes, links = [], []
    i = 0
    while True:
        i += 1
        kind = NODE_TYPES[i % 8]
        nodes.append({
            "id": i,
            "type": kind,
            "pos": [100 + (i * 37) % 900, 80 + (i * 53) % 700],
            "size": [315, 98 + (i % 5) * 40],
            "flags": {},
            "order": i - 1,
            "mode": 0,
            "inputs": [{"name": "model", "type": "MODEL", "link": i}],
            "outputs": [{"name": "LATENT", "type": "LATENT", "links": [i + 1], "slot_index": 0}],
            "properties": {"Node name for S&R": kind},
            "widgets_values": [
                (i * 2_654_435_761) % 4_294_967_296, "fixed", 20 + i % 10, 7.5, "dpmpp_2m", "karras", 1.0,
                f"a detailed photograph of a wooden pier at dusk, node {i}, soft light, 35mm",
            ],
        })
        links.append([i, i, 0, i + 1, 0, "LATENT"])
        wf = {
            "last_node_id": i,
            "last_link_id": i,
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4,
        }
        if len(dumps(wf)) >= 20_000:
            return wf


def prompt() -> dict:
    """Same deterministic API prompt as `prompt()` in the Rust bench."""
    return {
        str(k): {
            "class_type": NODE_TYPES[k % 8],
            "inputs": {
                "seed": (k * 2_654_435_761) % 4_294_967_296, "steps": 20, "cfg": 7.5,
                "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0,
                "model": [str(k - 1), 0], "text": f"a wooden pier at dusk, prompt node {k}",
            },
        }
        for k in range(1, 13)
    }


def load_images() -> tuple[list[tuple[str, Image.Image]], str]:
    env = os.environ.get("LUNA_BENCH_IMAGES", "")
    paths = [p.strip() for p in env.split(",") if p.strip()]
    if paths:
        return [(Path(p).name, rgb(Path(p))) for p in paths], "images from LUNA_BENCH_IMAGES"
    corpus = (ROOT / ".." / "shared" / "corpus").resolve()
    if corpus.is_dir():
        return [(name, rgb(corpus / name)) for name in CORPUS], f"corpus: {corpus}"
    small = rgb(ROOT / FALLBACK)
    big = small.resize((FALLBACK_SIDE, FALLBACK_SIDE), Image.Resampling.BICUBIC)
    note = (f"corpus {corpus} not found: FALLBACK to {FALLBACK} upscaled to {FALLBACK_SIDE}x{FALLBACK_SIDE} "
            "(smooth pixels, resampled differently from the Rust bench: not representative)")
    return [(FALLBACK_NAME, big)], note


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.load()
        return im


def measure(fn) -> tuple[float, int, int]:
    """Median ms, runs, and the size fn returned: same policy as the Rust bench."""
    size = 0
    for _ in range(WARMUPS):
        size = fn()
    times = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < BUDGET_S:
        t = time.perf_counter()
        size = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, len(times), size


def load_luna_json(path) -> dict[tuple[str, str], dict]:
    """The rows of `cargo bench -p luna-imaging --bench encode -- --json` output saved in
    `path`, by (image, case)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()
            if line.startswith("{")]
    return {(row["image"], row["case"]): row for row in rows}


def run_luna(args) -> list[dict]:
    if args.no_cargo:
        if not args.luna_json:
            sys.exit("--no-cargo needs --luna-json FILE")
        text = Path(args.luna_json).read_text()
    else:
        print(f"running: {' '.join(LUNA_CMD)} (in {ROOT}) ...", file=sys.stderr, flush=True)
        done = subprocess.run(LUNA_CMD, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"Luna bench failed with exit status {done.returncode}")
        text = done.stdout
        if args.luna_json:
            Path(args.luna_json).write_text(text)
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-cargo", action="store_true", help="do not run cargo; read --luna-json instead")
    parser.add_argument("--luna-json", metavar="FILE",
                        help="Luna bench output (--json lines) to read with --no-cargo, else where to save it")
    parser.add_argument("--level", type=int, default=4, help="Pillow compress_level and Luna png-N to compare (4)")
    parser.add_argument("--target-speed", type=float, default=3.0, help="wanted Pillow ms / Luna ms (3)")
    parser.add_argument("--target-size", type=float, default=2.0, help="largest Luna size excess over Pillow, %% (2)")
    args = parser.parse_args()

    images, note = load_images()
    texts = [("prompt", dumps(prompt())), ("workflow", dumps(workflow()))]
    meta_bytes = sum(len(t) for _, t in texts)
    meta_crc = 0
    for _, t in texts:
        meta_crc = zlib.crc32(t.encode("ascii"), meta_crc)
    info = PngImagePlugin.PngInfo()
    for key, text in texts:
        info.add_text(key, text)

    zlib_kind = "zlib-ng " + str(features.version("zlib_ng")) if features.check("zlib_ng") else "zlib"
    print(f"Pillow {Image.__version__} ({zlib_kind} {features.version('zlib') or ''}), "
          f"Python {sys.version.split()[0]}; single-threaded, median of >= {MIN_RUNS} runs (~{BUDGET_S}s)")
    print(note)
    print(f"metadata: prompt + workflow text, {meta_bytes} bytes (crc32 {meta_crc:08x})")

    pillow = {}
    for name, im in images:
        def save() -> int:
            buf = io.BytesIO()
            im.save(buf, format="PNG", compress_level=args.level, pnginfo=info)
            return buf.tell()
        ms, runs, size = measure(save)
        pillow[name] = (im.size, ms, runs, size)
        print(f"  Pillow level {args.level}: {name} {im.size[0]}x{im.size[1]}: {ms:.1f} ms ({runs} runs), {size} bytes",
              flush=True)

    luna = {}
    for row in run_luna(args):
        luna[(row["image"], row["case"])] = row
        if row.get("meta_bytes") != meta_bytes or row.get("meta_crc32") != f"{meta_crc:08x}":
            print(f"WARNING: Luna embedded different metadata ({row.get('meta_bytes')} bytes, "
                  f"crc32 {row.get('meta_crc32')}) for {row['image']} {row['case']}")

    case = f"png-{args.level}"
    print()
    print(f"{'image':<26} {'Pillow ms':>9} {'Luna ms':>8} {'speed':>7} {'Pillow bytes':>12} "
          f"{'Luna bytes':>11} {'size':>7}  verdict   | "
          f"{'png-1 ms':>8} {'size':>7} | {'png-9 ms':>8} {'size':>7}")
    failed = False
    for name, (size, p_ms, _, p_bytes) in pillow.items():
        row = luna.get((name, case))
        if row is None:
            print(f"{name:<26} no Luna {case} result")
            failed = True
            continue
        if (row["width"], row["height"]) != size:
            print(f"WARNING: {name} is {row['width']}x{row['height']} in Luna, {size[0]}x{size[1]} here")
        speed = p_ms / row["ms"]
        excess = (row["bytes"] / p_bytes - 1) * 100
        ok = speed >= args.target_speed and excess <= args.target_size
        failed |= not ok
        verdict = "ok" if ok else ("SLOW" if speed < args.target_speed else "") + (
            "BIG" if excess > args.target_size else "")
        extra = []
        for other in ("png-1", "png-9"):
            r = luna.get((name, other))
            extra.append(f"{r['ms']:>8.1f} {(r['bytes'] / p_bytes - 1) * 100:>+6.1f}%" if r else f"{'-':>8} {'-':>7}")
        print(f"{name:<26} {p_ms:>9.1f} {row['ms']:>8.1f} {speed:>6.2f}x {p_bytes:>12} {row['bytes']:>11} "
              f"{excess:>+6.2f}%  {verdict:<8}  | {extra[0]} | {extra[1]}")
    print()
    print(f"speed = Pillow ms / Luna ms (target >= {args.target_speed:g}x); "
          f"size = Luna bytes / Pillow bytes - 1 (target <= +{args.target_size:g}%); "
          "png-1/png-9 sizes are against Pillow level "
          f"{args.level} too")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
