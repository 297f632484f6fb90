"""How long the ComfyUI node blocks, per frame size and transport, against a real `luna up`.

    cargo build --release --bin luna
    .venv/bin/python bench/comfyui_node.py [--luna target/release/luna] [--runs 15]

Starts `luna up` (release build) on free ports with a temporary output root, then times the
node's `save()` as ComfyUI calls it, with float32 numpy frames standing in for tensors:
- `shm`: the local hand-off (the default when the daemon is on this machine);
- `http`: pixels inline (`LUNA_HANDOFF=off`, what a remote daemon gets);
each without and with previews (a stand-in `folder_paths` pointing at a temp folder), and the
preview alone. Between runs it waits until the daemon has saved the previous frame, so every
run starts with an idle saver, as a prompt that ends in the node does. Prints one markdown row
per case: median and 90th percentile in ms.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import luna_daemon  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NODE_FILE = ROOT / "clients" / "comfyui" / "luna_saver_node.py"
SIZES = [(1024, 1024), (3840, 2160)]


def load_node():
    spec = importlib.util.spec_from_file_location("luna_saver_node_bench", NODE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_saved(output, count, timeout=60):
    deadline = time.monotonic() + timeout
    while sum(1 for _ in output.rglob("*.png")) < count:
        if time.monotonic() > deadline:
            sys.exit(f"{count} files not saved within {timeout} s")
        time.sleep(0.02)


def row(name, size, times):
    ms = sorted(t * 1000 for t in times)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    print(f"| {name} | {size[0]}x{size[1]} | {statistics.median(ms):.1f} | {p90:.1f} |",
          flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--luna", default=str(ROOT / "target" / "release" / "luna"))
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        output = tmp / "output"
        temp = tmp / "comfy-temp"
        with luna_daemon.running(args.luna, output, tmp / "handoff") as port:
            url = f"http://127.0.0.1:{port}"
            os.environ["LUNA_GATEWAY_URL"] = url
            node = load_node()
            saver = node.LunaDaemonImageSaver()
            folder_paths = types.ModuleType("folder_paths")
            folder_paths.get_temp_directory = lambda: str(temp)
            saved = 0
            print("| case | size | median ms | p90 ms |\n|---|---|---|---|")
            for size in SIZES:
                w, h = size
                frame = np.random.default_rng(1).random((1, h, w, 3), dtype=np.float32)
                for name, handoff, previews in [("shm", True, False), ("http", False, False),
                                                ("shm + preview", True, True),
                                                ("http + preview", False, True)]:
                    os.environ["LUNA_HANDOFF"] = "on" if handoff else "off"
                    if previews:
                        sys.modules["folder_paths"] = folder_paths
                    else:
                        sys.modules.pop("folder_paths", None)
                    times = []
                    for i in range(args.runs + 1):
                        started = time.perf_counter()
                        out = saver.save(save_path="bench", filename=f"{name}_{w}_{i}",
                                         png_compression=1, image_1=frame)
                        elapsed = time.perf_counter() - started
                        text = out["result"][0]
                        if "Submitted" not in text:
                            sys.exit(text)
                        if previews and not out["ui"].get("images"):
                            sys.exit("no previews")
                        saved += 1
                        wait_saved(output, saved)
                        if i:  # the first run creates and faults in the segment
                            times.append(elapsed)
                    row(name, size, times)
                times = []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    node.write_previews([frame[0]], str(temp))
                    times.append(time.perf_counter() - started)
                row("preview alone", size, times)


if __name__ == "__main__":
    main()
