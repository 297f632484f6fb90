#!/usr/bin/env python3
"""Publish a Luna Saver job straight to RabbitMQ, without the gateway.

Builds a small RGB test image in pure Python, publishes the job's `save_job_queued`
event to `<prefix>.events` (so the status service can tell when the job is complete), then one
task per image to `<prefix>.tasks` (routing key `save`). Prints the job id
on stdout; everything else goes to stderr.

Depends only on pika and msgpack (`pip install pika msgpack`). The schema is described in
docs/protocol.md. Example:

    python3 docs/examples/produce_task.py --width 64 --height 48 --format png
    # then watch:  ws://127.0.0.1:19284/ws?job_id=<printed id>

Exit status: 0 when every message was confirmed by the broker, 2 when the topology does not
exist yet (start a saver, the status service or the gateway once: they declare it), 1 on any
other broker error.
"""

import argparse
import datetime as dt
import re
import sys
import time
import uuid

import msgpack
import pika
import pika.exceptions

SCHEMA_VERSION = 1
TASK_ROUTING_KEY = "save"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FORMATS = ("png", "webp", "jpeg", "jpg")


def job_id_arg(value):
    if not JOB_ID_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: a job id is 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'"
        )
    return value


def side_arg(value):
    n = int(value)
    if not 1 <= n <= 4096:
        raise argparse.ArgumentTypeError(f"{n}: use 1 to 4096 pixels for this example")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--prefix", default="luna", help="the services' --amqp-prefix")
    p.add_argument("--job-id", type=job_id_arg, default=None, help="default: a fresh uuid4 hex")
    p.add_argument("--width", type=side_arg, default=64)
    p.add_argument("--height", type=side_arg, default=48)
    p.add_argument("--format", choices=FORMATS, default="png")
    p.add_argument("--images", type=int, default=1, help="images in the job (one task each)")
    p.add_argument("--save-path", default="python_producer", help="directory template")
    p.add_argument("--filename", default="%time:YYYY-mm-dd_HH.MM.SS%_%model_name%",
                   help="file-stem template")
    p.add_argument("--model-name", default="example/demo_model.safetensors")
    p.add_argument("--affix", default="", help="stem suffix and, with subdir, a sub-folder")
    args = p.parse_args(argv)
    if not 1 <= args.images <= 16:
        p.error("--images must be 1 to 16")
    if args.job_id is None:
        args.job_id = uuid.uuid4().hex  # 32 hex digits: matches [A-Za-z0-9_-]{1,64}
    return args


def gradient_rgb(width, height, shift=0):
    """Row-major RGB bytes: red grows left to right, green top to bottom, blue is a checkerboard."""
    out = bytearray(width * height * 3)
    i = 0
    for y in range(height):
        g = y * 255 // max(height - 1, 1)
        for x in range(width):
            out[i] = (x * 255 // max(width - 1, 1) + shift) % 256
            out[i + 1] = g
            out[i + 2] = 224 if ((x // 8) + (y // 8)) % 2 else 32
            i += 3
    return bytes(out)


def build_task(args, image_index, submitted_at):
    """One task: a MessagePack map with named fields. Every field is spelled out here; any
    option left out takes the default shown in docs/protocol.md."""
    return {
        "schema_version": SCHEMA_VERSION,
        "job_id": args.job_id,
        "image_index": image_index,
        "num_images": args.images,
        "submitted_at": submitted_at,  # RFC 3339 with offset; feeds %time:...%
        "options": {
            "save_path": args.save_path,
            "filename": args.filename,
            "model_name": args.model_name,
            "index": 0,
            "quality_gate": "disabled",
            "min_quality_threshold": 0.3,
            "keep_rejected": True,
            "png_compression": 4,
            "lossy_quality": 90,
            "lossless_webp": False,
            "embed_workflow": True,
            "prompt": None,
            "extra_pnginfo": None,
            "metadata": {"positive": "a gradient", "steps": 1, "seed": image_index},
            "custom_metadata": {"producer": "docs/examples/produce_task.py"},
        },
        "image": {
            # bytes -> MessagePack bin (packb(use_bin_type=True)); len = width*height*channels
            "pixels": gradient_rgb(args.width, args.height, shift=image_index * 40),
            "width": args.width,
            "height": args.height,
            "channels": 3,
            "affix": args.affix,
            "format": args.format,
            "subdir": True,
            "batch_index": image_index,
            "batch_size": args.images,
            # "blob" is set only by the gateway (claim check); never send it with pixels.
        },
    }


def main(argv=None):
    args = parse_args(argv)
    tasks_exchange = f"{args.prefix}.tasks"
    events_exchange = f"{args.prefix}.events"
    submitted_at = dt.datetime.now().astimezone().isoformat(timespec="milliseconds")

    params = pika.URLParameters(args.amqp_url)
    params.socket_timeout = 5
    params.blocked_connection_timeout = 30
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPConnectionError as e:
        print(f"cannot connect to {args.amqp_url}: {e!r}", file=sys.stderr)
        return 1
    try:
        channel = connection.channel()
        # The exchanges belong to the services, which declare them with their arguments; we
        # only check they exist (passive) instead of declaring them ourselves.
        try:
            channel.exchange_declare(tasks_exchange, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            print(f"exchange {tasks_exchange!r} does not exist ({e.reply_text}); start a saver, "
                  "the status service or the gateway with this --amqp-prefix first",
                  file=sys.stderr)
            return 2
        channel.confirm_delivery()  # every basic_publish below waits for the broker's ack

        # First the queued event, so subscribers see it before any outcome of the job.
        queued = {
            "event": "save_job_queued",
            "job_id": args.job_id,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            "num_images": args.images,
        }
        channel.basic_publish(
            exchange=events_exchange,
            routing_key="save_job_queued",
            body=msgpack.packb(queued, use_bin_type=True),
            properties=pika.BasicProperties(
                content_type="application/msgpack",
                delivery_mode=2,
                message_id=f"{args.job_id}/save_job_queued",
            ),
        )

        for index in range(args.images):
            body = msgpack.packb(build_task(args, index, submitted_at), use_bin_type=True)
            channel.basic_publish(
                exchange=tasks_exchange,
                routing_key=TASK_ROUTING_KEY,
                body=body,
                properties=pika.BasicProperties(
                    content_type="application/msgpack",
                    delivery_mode=2,  # persistent
                    message_id=f"{args.job_id}/{index}",
                    timestamp=int(time.time()),
                ),
                mandatory=True,  # unroutable (no bound queue) raises instead of vanishing
            )
            print(f"task {args.job_id}/{index} confirmed ({len(body)} bytes)", file=sys.stderr)
    except pika.exceptions.UnroutableError:
        print(f"no queue is bound to {tasks_exchange!r} with key {TASK_ROUTING_KEY!r}; "
              "is the topology declared?", file=sys.stderr)
        return 2
    except pika.exceptions.NackError:
        print("the broker refused a message (nack; the task queue may be full)", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPError as e:
        print(f"broker error: {e!r}", file=sys.stderr)
        return 1
    finally:
        if connection.is_open:
            connection.close()

    print(args.job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
