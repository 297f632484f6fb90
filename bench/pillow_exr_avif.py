#!/usr/bin/env python3
"""OpenEXR's and Pillow's EXR and AVIF writers, the peers of Luna's exr and avif encoders.

Times, on the pictures of ``libs/imaging/benches/encode.rs`` and with its metadata (``prompt``
then a ~20 KB ``workflow``, built byte for byte by ``bench/pillow_png.py``'s functions):

- EXR with the ``OpenEXR`` Python bindings: float32 and half, ZIP (what Luna writes) and
  uncompressed, the metadata as ``string`` header attributes (Luna's scheme). The input is the
  8-bit picture as float32 ``v / 255`` (Luna's ``samples::convert``), converted before timing;
  half includes the float32 -> float16 cast, as Luna's ``exr-half`` includes its own.
  ``--exr-threads`` (default: every core, as Luna compresses) is the File's ``num_threads``.
- AVIF with Pillow's plugin (libavif; the wheels bundle aom as the encoder): quality 90 at
  Pillow's default speed and at ``--avif-fast-speed``, 4:4:4 like Luna unless
  ``--subsampling``, the metadata as EXIF in ComfyUI's scheme (``prompt:`` in 0x0110,
  ``workflow:`` in 0x010F), Pillow's default thread count.

16-bit PNG is ``bench/pillow_png16.py``'s. Prints one markdown table; with ``--luna-json``
(the ``--json`` output of ``cargo bench -p luna-imaging --bench encode``) Luna's matching case
is added to each row. Same timing policy as the Rust bench. Needs Pillow >= 11.3, numpy and
OpenEXR.

    python3 bench/pillow_exr_avif.py
    cargo bench -p luna-imaging --bench encode -- --json > luna.jsonl
    python3 bench/pillow_exr_avif.py --luna-json luna.jsonl
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import OpenEXR
from PIL import Image, features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pillow_png import (  # noqa: E402
    BUDGET_S, MIN_RUNS, dumps, load_images, load_luna_json, measure, prompt, workflow)

PILLOW_DEFAULT_SPEED = 6  # AvifImagePlugin's default `speed`


def exr_writer(rgb32: np.ndarray, half: bool, compression, texts, threads: int):
    header = {"compression": compression, "type": OpenEXR.scanlineimage}
    header.update(texts)

    def save() -> int:
        pixels = rgb32.astype(np.float16) if half else rgb32
        buf = io.BytesIO()
        OpenEXR.File(header, {"RGB": pixels}, num_threads=threads).write(buf)
        return buf.tell()

    return save


def avif_writer(im: Image.Image, speed: int, subsampling: str, exif: bytes):
    def save() -> int:
        buf = io.BytesIO()
        im.save(buf, format="AVIF", quality=90, speed=speed, subsampling=subsampling, exif=exif)
        return buf.tell()

    return save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--luna-json", metavar="FILE", help="Luna encode bench --json output, to add its figures")
    parser.add_argument("--exr-threads", type=int, default=os.cpu_count() or 1,
                        help="OpenEXR num_threads (default: every core)")
    parser.add_argument("--avif-fast-speed", type=int, default=9, help="the fast Pillow AVIF speed (9)")
    parser.add_argument("--subsampling", default="4:4:4", help="Pillow AVIF subsampling (4:4:4, as Luna)")
    args = parser.parse_args()

    images, note = load_images()
    texts = {"prompt": dumps(prompt()), "workflow": dumps(workflow())}
    meta_bytes = sum(len(t) for t in texts.values())
    meta_crc = 0
    for t in texts.values():
        meta_crc = zlib.crc32(t.encode("ascii"), meta_crc)
    exif = Image.Exif()
    exif[0x0110] = "prompt:" + texts["prompt"]
    exif[0x010F] = "workflow:" + texts["workflow"]
    exif_bytes = exif.tobytes()

    luna = load_luna_json(args.luna_json) if args.luna_json else {}
    for row in luna.values():
        if row.get("meta_bytes") != meta_bytes or row.get("meta_crc32") != f"{meta_crc:08x}":
            print(f"WARNING: Luna embedded different metadata in {row['image']} {row['case']}")

    print(f"Pillow {Image.__version__} (libavif {features.version('avif')}, aom encoder), "
          f"OpenEXR {OpenEXR.__version__} (num_threads {args.exr_threads}), numpy {np.__version__}, "
          f"Python {sys.version.split()[0]}; {os.cpu_count()} cores; median of >= {MIN_RUNS} runs (~{BUDGET_S}s)")
    print(note)
    print(f"metadata: prompt + workflow, {meta_bytes} bytes (crc32 {meta_crc:08x}): EXR string attributes, "
          f"AVIF EXIF ({len(exif_bytes)} bytes)")
    print()

    fast = args.avif_fast_speed
    ss = args.subsampling
    columns = ["image", "format", "size", "peer ms", "peer bytes"]
    if luna:
        columns += ["Luna case", "Luna ms", "Luna bytes"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for name, im in images:
        rgb32 = np.asarray(im, dtype=np.float32) / np.float32(255)
        zip_c, none_c = OpenEXR.ZIP_COMPRESSION, OpenEXR.NO_COMPRESSION
        t = args.exr_threads
        rows = [
            ("EXR float32 ZIP (OpenEXR)", "exr-float", exr_writer(rgb32, False, zip_c, texts, t)),
            ("EXR half ZIP (OpenEXR)", "exr-half", exr_writer(rgb32, True, zip_c, texts, t)),
            ("EXR float32 uncompressed (OpenEXR)", None, exr_writer(rgb32, False, none_c, texts, t)),
            ("EXR half uncompressed (OpenEXR)", None, exr_writer(rgb32, True, none_c, texts, t)),
            (f"AVIF q90 speed {PILLOW_DEFAULT_SPEED} (default) {ss} (Pillow)", "avif-q90",
             avif_writer(im, PILLOW_DEFAULT_SPEED, ss, exif_bytes)),
            (f"AVIF q90 speed {fast} {ss} (Pillow)", "avif-q90", avif_writer(im, fast, ss, exif_bytes)),
        ]
        for label, case, save in rows:
            ms, _, size = measure(save)
            cells = [name, label, f"{im.width}x{im.height}", f"{ms:.1f}", str(size)]
            if luna:
                row = luna.get((name, case)) if case else None
                cells += [case, f"{row['ms']:.1f}", str(row["bytes"])] if row else ["-", "-", "-"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
