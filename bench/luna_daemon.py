"""A `luna up` of the benchmarks' own: free ports, a given output root, stopped on exit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"luna up exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("luna up not ready")


@contextlib.contextmanager
def running(binary: str, output, handoff_dir="none"):
    """Starts `binary up` writing under `output` (hand-off directory `handoff_dir`, `none` for
    inline pixels only), with no `LUNA_*` variable of the caller's, waits until it is ready and
    yields its gateway port; stops it with SIGINT (as Ctrl-C) on the way out."""
    port, status = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNA_")}
    proc = subprocess.Popen(
        [binary, "up", "--gateway-listen", f"127.0.0.1:{port}", "--status-listen",
         f"127.0.0.1:{status}", "--output-root", str(output), "--handoff-dir", str(handoff_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
