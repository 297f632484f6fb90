#!/usr/bin/env python3
"""Pillow's JPEG and WebP writers, the peers of Luna's jpeg and webp encoders.

Times, on the pictures of ``libs/imaging/benches/encode.rs`` and with its metadata (``prompt``
then a ~20 KB ``workflow`` as EXIF in ComfyUI's scheme, built byte for byte by
``bench/pillow_png.py``'s functions), one ``Image.save`` to memory per run:

- JPEG quality 90 with full chroma (``subsampling=0``, 4:4:4, as Luna from quality 90),
  Pillow's defaults otherwise (libjpeg-turbo, standard Huffman tables, baseline);
- WebP lossy quality 90 and WebP lossless, at Pillow's default ``method`` 4 (libwebp).

Luna's JPEG encodes a frame in strips on every core (restart intervals); Pillow's on one.
Prints one markdown table; with ``--luna-json`` (the ``--json`` output of
``cargo bench -p luna-imaging --bench encode``) Luna's matching case, the speed ratio
(Pillow ms / Luna ms) and the size difference are added. Same timing policy as the Rust bench.

    cargo bench -p luna-imaging --bench encode -- --json > luna.jsonl
    python3 bench/pillow_lossy.py --luna-json luna.jsonl
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

from PIL import Image, features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pillow_png import (  # noqa: E402
    BUDGET_S, MIN_RUNS, dumps, load_images, load_luna_json, measure, prompt, workflow)


def writer(im: Image.Image, **options):
    def save() -> int:
        buf = io.BytesIO()
        im.save(buf, **options)
        return buf.tell()

    return save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--luna-json", metavar="FILE", help="Luna encode bench --json output, to add its figures")
    args = parser.parse_args()

    images, note = load_images()
    exif = Image.Exif()
    exif[0x0110] = "prompt:" + dumps(prompt())
    exif[0x010F] = "workflow:" + dumps(workflow())
    exif_bytes = exif.tobytes()

    luna = load_luna_json(args.luna_json) if args.luna_json else {}

    print(f"Pillow {Image.__version__} (libjpeg-turbo {features.version('jpg')}, "
          f"libwebp {features.version('webp')}), Python {sys.version.split()[0]}; "
          f"{os.cpu_count()} cores; median of >= {MIN_RUNS} runs (~{BUDGET_S}s)")
    print(note)
    print(f"metadata: EXIF of {len(exif_bytes)} bytes in every file")
    print()
    columns = ["image", "case", "Pillow ms", "Pillow bytes"]
    if luna:
        columns += ["Luna ms", "Luna bytes", "speed", "size"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for name, im in images:
        rows = [
            ("jpeg-q90", writer(im, format="JPEG", quality=90, subsampling=0, exif=exif_bytes)),
            ("webp-q90", writer(im, format="WEBP", quality=90, exif=exif_bytes)),
            ("webp-lossless", writer(im, format="WEBP", lossless=True, exif=exif_bytes)),
        ]
        for case, save in rows:
            ms, _, size = measure(save)
            cells = [name, case, f"{ms:.1f}", str(size)]
            row = luna.get((name, case))
            if row:
                cells += [f"{row['ms']:.1f}", str(row["bytes"]), f"{ms / row['ms']:.2f}x",
                          f"{row['bytes'] / size - 1:+.1%}"]
            elif luna:
                cells += ["-"] * 4
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
