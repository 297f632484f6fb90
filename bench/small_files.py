#!/usr/bin/env python3
"""Many small saves: 256x256 PNG tiles through `luna up` against Pillow writing the same files.

    cargo build --release --bin luna
    .venv/bin/python bench/small_files.py [--luna target/release/luna] [--tiles 512]

Cuts `--tiles` 256x256 RGB tiles out of the corpus photograph (``../shared/corpus``, else the
test photo upscaled) and saves each as a PNG at compression 4 with a 2.5 KB ``prompt`` text
chunk, three ways, into folders on the same disk (a temporary folder beside the workspace's
``target``, not a RAM disk):

- Pillow ``Image.save`` one file after another, as ComfyUI's SaveImage does (nothing is
  fsynced: a crash can leave empty or partial files);
- the same with ``os.fsync`` of each file and its folder, the durability Luna promises;
- ``luna up``: the tiles POSTed as jobs of 16 (MessagePack, 8-bit pixels inline) one after
  another, timed from the first POST to the last file on disk (every file fsynced, linked
  under its final name, folder fsynced, before its event).

Prints files/s for each and the ratios. Needs Pillow, numpy and msgpack (the test venv).
"""

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
from PIL import Image, PngImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parent))
import luna_daemon  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TILE = 256
PER_JOB = 16


def source_picture():
    corpus = ROOT.parent / "shared" / "corpus" / "canopee_3840x2160.png"
    if corpus.is_file():
        return np.asarray(Image.open(corpus).convert("RGB")), f"tiles of {corpus.name}"
    small = Image.open(ROOT / "tests" / "data" / "astronaut_256.png").convert("RGB")
    return np.asarray(small.resize((2048, 2048))), "tiles of the test photo upscaled (not representative)"


def tiles(picture, count):
    h, w, _ = picture.shape
    out = []
    for y in range(0, h - TILE + 1, TILE):
        for x in range(0, w - TILE + 1, TILE):
            out.append(np.ascontiguousarray(picture[y:y + TILE, x:x + TILE]))
    return [out[i % len(out)] for i in range(count)]


def prompt_text():
    return json.dumps({str(i): {"class_type": "KSampler", "inputs": {"seed": i, "text": "x" * 40}}
                       for i in range(40)})


def pillow(tiles_, folder, durable):
    folder.mkdir(parents=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt_text())
    started = time.perf_counter()
    for i, tile in enumerate(tiles_):
        path = folder / f"tile_{i:05}.png"
        if durable:
            with open(path, "wb") as f:
                Image.fromarray(tile).save(f, format="PNG", compress_level=4, pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
            fd = os.open(folder, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        else:
            Image.fromarray(tile).save(path, compress_level=4, pnginfo=info)
    return len(tiles_) / (time.perf_counter() - started)


def luna(tiles_, tmp, binary):
    output = tmp / "luna-output"
    with luna_daemon.running(binary, output) as port:
        prompt = json.loads(prompt_text())
        bodies = []
        for j in range(0, len(tiles_), PER_JOB):
            images = [{"width": TILE, "height": TILE, "channels": 3, "format": "png",
                       "pixels": t.tobytes(), "affix": "", "subdir": False}
                      for t in tiles_[j:j + PER_JOB]]
            bodies.append(msgpack.packb({"save_path": "tiles", "filename": f"tile_{j:05}",
                                         "png_compression": 4, "prompt": prompt,
                                         "images": images}, use_bin_type=True))
        started = time.perf_counter()
        for body in bodies:
            while True:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("POST", "/v1/jobs", body=body, headers={"Content-Type": "application/msgpack"})
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 202:
                    break
                if r.status != 429:
                    sys.exit(f"POST answered {r.status}")
                time.sleep(float(r.getheader("Retry-After", "0.05")) / 10)
        folder = output / "tiles"
        deadline = time.monotonic() + 300
        while sum(1 for _ in folder.glob("*.png")) < len(tiles_):
            if time.monotonic() > deadline:
                sys.exit("not every tile was saved within 300 s")
            time.sleep(0.005)
        return len(tiles_) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--luna", default=str(ROOT / "target" / "release" / "luna"))
    parser.add_argument("--tiles", type=int, default=512)
    args = parser.parse_args()
    picture, note = source_picture()
    tiles_ = tiles(picture, args.tiles)
    (ROOT / "target").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "target", prefix="small-files-") as tmp:
        tmp = Path(tmp)
        rates = {
            "Pillow, no fsync (SaveImage)": pillow(tiles_, tmp / "pillow", durable=False),
            "Pillow + fsync of file and folder": pillow(tiles_, tmp / "pillow-fsync", durable=True),
            "luna up, POST to durable file": luna(tiles_, tmp, args.luna),
        }
    print(f"{len(tiles_)} PNG tiles of {TILE}x{TILE}, compression 4, 2.5 KB prompt; {note}; "
          f"{os.cpu_count()} cores")
    base = rates["Pillow, no fsync (SaveImage)"]
    print("| writer | files/s | vs Pillow |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
