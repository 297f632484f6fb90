"""The broker protocol, spoken by an independent producer: Python with pika and msgpack.

Starts the real `luna-status` and `luna-saver` binaries on a private topology prefix, publishes
tasks with `docs/examples/produce_task.py` (the example that docs/protocol.md documents) or by
hand with pika, and checks what the contract promises to anyone who follows docs/protocol.md:
the file lands where CONTRACT.md says and Pillow reads it, the WebSocket reports the job from
`save_job_queued` to `save_job_completed`, and a message that is not a task is parked with its
reason instead of being dropped or blocking the queue.

Needs a RabbitMQ broker (LUNA_AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f). Without
one these tests fail; they never skip.
"""

import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pika
import pika.exceptions
import pytest
from PIL import Image
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[2]
PRODUCER = ROOT / "docs" / "examples" / "produce_task.py"
AMQP_URL = os.environ.get("LUNA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
EVENT_TIMEOUT = 60.0
READY_TIMEOUT = 60.0
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")

HOW_TO_GET_A_BROKER = (
    "These tests need RabbitMQ. Start one with\n"
    "    docker run -d --rm --name luna-rabbit -p 5672:5672 rabbitmq:3.13-management\n"
    "(or `docker compose up -d rabbitmq` in the workspace root, or `apt-get install "
    "rabbitmq-server`), or point LUNA_AMQP_URL at an existing broker."
)


def load_producer():
    spec = importlib.util.spec_from_file_location("produce_task", PRODUCER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


producer = load_producer()


# --- broker --------------------------------------------------------------------------------


def amqp_connection():
    params = pika.URLParameters(AMQP_URL)
    params.socket_timeout = 5
    params.connection_attempts = 1
    return pika.BlockingConnection(params)


@pytest.fixture(scope="session")
def broker():
    error = None
    try:
        amqp_connection().close()
    except Exception as e:  # noqa: BLE001 - any failure means "no usable broker"
        error = e
    if error is not None:  # failed outside the handler, so the report is just this message
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL}: {error!r}\n{HOW_TO_GET_A_BROKER}",
                    pytrace=False)
    return AMQP_URL


def delete_topology(prefix):
    """Deletes every queue and exchange of `prefix`; a channel error only loses that step."""
    conn = amqp_connection()
    try:
        steps = [("queue", f"{prefix}.save"), ("queue", f"{prefix}.parked"),
                 ("queue", f"{prefix}.events.log")]
        steps += [("exchange", f"{prefix}.{n}") for n in ("tasks", "events", "parked")]
        for kind, name in steps:
            ch = conn.channel()
            try:
                (ch.queue_delete if kind == "queue" else ch.exchange_delete)(name)
                ch.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass
    finally:
        conn.close()


def publish_task_bytes(prefix, body, message_id):
    conn = amqp_connection()
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(
            exchange=f"{prefix}.tasks",
            routing_key="save",
            body=body,
            properties=pika.BasicProperties(
                content_type="application/msgpack", delivery_mode=2, message_id=message_id
            ),
            mandatory=True,
        )
    finally:
        conn.close()


def publish_queued_event(prefix, job_id, num_images):
    body = msgpack.packb(
        {"event": "save_job_queued", "job_id": job_id,
         "timestamp": "2025-12-09T10:00:00Z", "num_images": num_images},
        use_bin_type=True,
    )
    conn = amqp_connection()
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(f"{prefix}.events", "save_job_queued", body,
                         pika.BasicProperties(content_type="application/msgpack", delivery_mode=2))
    finally:
        conn.close()


def take_parked(prefix, message_id, timeout=EVENT_TIMEOUT):
    """Waits for the parked copy of `message_id`; returns (headers, body). Acks what it reads."""
    deadline = time.monotonic() + timeout
    conn = amqp_connection()
    try:
        ch = conn.channel()
        while time.monotonic() < deadline:
            method, props, body = ch.basic_get(f"{prefix}.parked", auto_ack=False)
            if method is None:
                time.sleep(0.2)
                continue
            ch.basic_ack(method.delivery_tag)
            if props.message_id == message_id:
                return dict(props.headers or {}), body
    finally:
        conn.close()
    return None


def text(value):
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


# --- services ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def binaries():
    build = subprocess.run(
        ["cargo", "build", "-q", "-p", "luna-saver", "-p", "luna-status"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, f"cargo build failed:\n{build.stderr[-4000:]}"
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    bins = SimpleNamespace(saver=target / "debug" / "luna-saver",
                           status=target / "debug" / "luna-status")
    for path in vars(bins).values():
        assert path.is_file(), f"{path} was not built"
    return bins


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, name, argv, log_path):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, NO_COLOR="1", RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)

    def tail(self, lines=40):
        try:
            data = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        clean = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in data[-lines:]]
        return f"--- {self.name} log ({self.log_path}) ---\n" + "\n".join(clean)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


def wait_ready(service, port):
    url = f"http://127.0.0.1:{port}/readyz"
    deadline = time.monotonic() + READY_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            pytest.fail(f"{service.name} exited with {service.proc.returncode}\n{service.tail()}",
                        pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.2)
    pytest.fail(f"{service.name} not ready at {url} after {READY_TIMEOUT}s ({last!r})\n"
                f"{service.tail()}", pytrace=False)


@pytest.fixture(scope="module")
def stack(broker, binaries, tmp_path_factory):
    prefix = f"t{uuid.uuid4().hex}"
    base = tmp_path_factory.mktemp("protocol")
    output = base / "output"
    output.mkdir()
    status_port, saver_port = free_port(), free_port()
    common = ["--amqp-url", broker, "--amqp-prefix", prefix]
    services = []
    try:
        # Status first: it declares the topology, so the saver can consume at once.
        status = Service("luna-status", [binaries.status, "--listen", f"127.0.0.1:{status_port}",
                                         *common], base / "status.log")
        services.append(status)
        wait_ready(status, status_port)
        saver = Service("luna-saver", [binaries.saver, "--listen", f"127.0.0.1:{saver_port}",
                                       *common, "--output-root", output,
                                       "--min-workers", "2", "--max-workers", "2",
                                       "--shutdown-grace", "5s"], base / "saver.log")
        services.append(saver)
        wait_ready(saver, saver_port)
        yield SimpleNamespace(prefix=prefix, output=output, status_port=status_port,
                              logs=lambda: "\n".join(s.tail() for s in services))
    finally:
        for service in reversed(services):
            service.stop()
        delete_topology(prefix)


# --- helpers -------------------------------------------------------------------------------


def subscribe(stack, job_id):
    return ws_connect(f"ws://127.0.0.1:{stack.status_port}/ws?job_id={job_id}",
                      open_timeout=10, close_timeout=2)


def events_until_completed(stack, ws, timeout=EVENT_TIMEOUT):
    events = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no save_job_completed within {timeout}s; got {events}\n{stack.logs()}",
                        pytrace=False)
        try:
            message = ws.recv(timeout=remaining)
        except TimeoutError:
            continue
        event = json.loads(message)
        events.append(event)
        if event["event"] == "save_job_completed":
            return events


def produce(stack, job_id, *extra):
    result = subprocess.run(
        [sys.executable, str(PRODUCER), "--amqp-url", AMQP_URL, "--prefix", stack.prefix,
         "--job-id", job_id, *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"produce_task.py failed:\n{result.stderr}\n{stack.logs()}"
    assert result.stdout.strip() == job_id, result.stdout
    return result


def only(events, name):
    found = [e for e in events if e["event"] == name]
    assert len(found) == 1, f"expected one {name}, got {events}"
    return found[0]


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,ext", [("png", "png"), ("webp", "webp"), ("jpeg", "jpg")])
def test_task_from_python_is_saved_and_reported(stack, fmt, ext):
    job_id = f"py-{fmt}-{uuid.uuid4().hex[:12]}"
    width, height = 37, 23  # odd sizes catch stride mistakes
    with subscribe(stack, job_id) as ws:
        produce(stack, job_id, "--width", str(width), "--height", str(height), "--format", fmt,
                "--save-path", f"interop/{job_id}", "--filename", "%model_name%_%index%",
                "--model-name", "checkpoints/sdxl_base.safetensors")
        events = events_until_completed(stack, ws)

    names = [e["event"] for e in events]
    assert sorted(names) == ["image_saved", "save_job_completed", "save_job_queued"], events
    for e in events:
        assert e["job_id"] == job_id and RFC3339.match(e["timestamp"]), e
    assert only(events, "save_job_queued")["num_images"] == 1
    saved = only(events, "image_saved")
    # CONTRACT: <root>/<save_path>/<stem>.<ext> (no affix, no batch suffix for batch_size 1).
    expected = f"interop/{job_id}/sdxl_base_0.{ext}"
    assert saved["path"] == expected, saved
    assert isinstance(saved["worker"], str) and saved["worker"], saved
    assert (saved["index"], saved["format"], saved["width"], saved["height"]) == \
        (0, fmt, width, height), saved
    assert saved["quality_score"] is None and saved["bytes"] > 0, saved
    done = events[-1]
    assert (done["saved"], done["rejected"], done["failed"]) == (1, 0, 0), done

    path = stack.output / expected
    assert path.is_file(), f"{path} missing; output has {sorted(stack.output.rglob('*'))}"
    assert path.stat().st_size == saved["bytes"]
    with Image.open(path) as img:
        assert img.size == (width, height)
        assert img.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
        if fmt == "png":
            assert img.mode == "RGB"
            assert img.tobytes() == producer.gradient_rgb(width, height), "PNG must be lossless"
            assert img.text.get("luna_job_id") == job_id
            assert img.text.get("producer") == "docs/examples/produce_task.py"  # custom_metadata


def test_malformed_task_is_parked_and_the_next_is_still_saved(stack):
    garbage = random.Random(20251209).randbytes(512)
    message_id = f"garbage-{uuid.uuid4().hex}"
    publish_task_bytes(stack.prefix, garbage, message_id)

    parked = take_parked(stack.prefix, message_id)
    assert parked is not None, f"{message_id} never reached {stack.prefix}.parked\n{stack.logs()}"
    headers, body = parked
    assert body == garbage, "the parked message is the original, byte for byte"
    reason = text(headers.get("x-luna-park-reason", ""))
    assert reason.startswith("undecodable task"), headers

    job_id = f"after-garbage-{uuid.uuid4().hex[:12]}"
    with subscribe(stack, job_id) as ws:
        produce(stack, job_id, "--save-path", f"interop/{job_id}", "--filename", "good")
        events = events_until_completed(stack, ws)
    saved = only(events, "image_saved")
    assert saved["path"] == f"interop/{job_id}/good.png"
    assert (events[-1]["saved"], events[-1]["failed"]) == (1, 0), events
    with Image.open(stack.output / saved["path"]) as img:
        assert img.size == (64, 48)


def test_invalid_task_fails_for_good_and_completes_its_job(stack):
    """A task that decodes but breaks a rule is reported (`image_failed`, `final: true`),
    parked with the rule it broke, and still ends its job with `save_job_completed`."""
    job_id = f"invalid-{uuid.uuid4().hex[:12]}"
    args = producer.parse_args(["--job-id", job_id, "--width", "8", "--height", "8"])
    task = producer.build_task(args, 0, "2025-12-09T10:00:00+01:00")
    task["image"]["pixels"] = task["image"]["pixels"][:-1]  # one byte short of 8 x 8 x 3
    message_id = f"{job_id}/0"
    with subscribe(stack, job_id) as ws:
        publish_task_bytes(stack.prefix, msgpack.packb(task, use_bin_type=True), message_id)
        publish_queued_event(stack.prefix, job_id, 1)
        events = events_until_completed(stack, ws)

    failed = only(events, "image_failed")
    assert failed["final"] is True and failed["index"] == 0 and failed["attempt"] >= 1, failed
    assert "image.pixels" in failed["error"], failed
    assert (events[-1]["saved"], events[-1]["failed"]) == (0, 1), events
    parked = take_parked(stack.prefix, message_id)
    assert parked is not None, f"{message_id} was not parked\n{stack.logs()}"
    assert "image.pixels" in text(parked[0].get("x-luna-park-reason", ""))
    assert not (stack.output / "python_producer").exists(), "an invalid task writes nothing"
