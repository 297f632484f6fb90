#!/usr/bin/env python3
"""Pillow's 16-bit PNG writer against Luna's png16, on the same frames.

Builds the frames of ``libs/imaging/benches/png16.rs`` (each picture widened to 16 bits as
``v * 257 ^ noise``, gray = the green channel), times Pillow's ``Image.save(format="PNG",
compress_level=N)`` of the gray frame as mode ``I;16`` (Pillow writes no 16-bit RGB PNG), then
runs the Luna bench (``cargo bench -p luna-imaging --bench png16 -- --json``) and prints both.
No metadata on either side. Needs Pillow and numpy.

    python3 bench/pillow_png16.py
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ["bythewater_1024x1024.png", "canopee_3840x2160.png"]
FALLBACK = ROOT / "tests" / "data" / "astronaut_256.png"
BUDGET_S = 1.5


def pictures():
    listed = os.environ.get("LUNA_BENCH_IMAGES")
    paths = [Path(p) for p in listed.split(",")] if listed else [
        p for p in (ROOT.parent / "shared" / "corpus" / n for n in CORPUS) if p.exists()
    ]
    if not paths:
        # The Rust bench upscales with a triangle filter; Pillow's bilinear is close, not equal,
        # so figures on the fallback compare like for like only roughly.
        yield "astronaut_256-upscaled", Image.open(FALLBACK).convert("RGB").resize((1024, 1024), Image.BILINEAR)
        return
    for p in paths:
        yield p.stem, Image.open(p).convert("RGB")


def widen(src: np.ndarray) -> np.ndarray:
    flat = src.reshape(-1).astype(np.uint16)
    i = np.arange(flat.size, dtype=np.uint64)
    noise = ((i * np.uint64(2654435761)) >> np.uint64(24)) & np.uint64(63)
    return ((flat * 257) ^ noise.astype(np.uint16)).reshape(src.shape)


def measure(fn):
    times, size = [], 0
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < BUDGET_S:
        t = time.perf_counter()
        size = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, size, len(times)


def main() -> None:
    print("Pillow 16-bit gray (I;16) PNG:")
    for name, img in pictures():
        gray16 = widen(np.asarray(img)[:, :, 1])
        frame = Image.frombytes("I;16", (img.width, img.height), gray16.astype("<u2").tobytes())
        for level in (1, 4):
            def save(level=level):
                buf = io.BytesIO()
                frame.save(buf, format="PNG", compress_level=level)
                return buf.tell()
            ms, size, runs = measure(save)
            print(f"{name:<26} {img.width}x{img.height} gray pillow-{level} {runs:>3} runs {ms:>9.1f} ms {size:>11} bytes")
    print("Luna png16 (cargo bench -p luna-imaging --bench png16):")
    out = subprocess.run(["cargo", "bench", "-q", "-p", "luna-imaging", "--bench", "png16", "--", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            print(f"{r['image']:<26} {r['width']}x{r['height']} {r['layout']:<4} {r['case']} {r['runs']:>3} runs {r['ms']:>9.1f} ms {r['bytes']:>11} bytes")


if __name__ == "__main__":
    main()
