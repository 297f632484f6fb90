"""Luna Daemon Image Saver: a ComfyUI output node that hands images to the Luna Saver daemon.

The node converts up to five IMAGE inputs (batches included) to 8-bit pixels, sends them in one
MessagePack request to the gateway's `POST /v1/jobs` and returns at once with the job id; the
daemon encodes and writes the files in the background. See README.md beside this file.

Imports only the standard library and numpy at module import (msgpack is imported when the node
runs, so a missing package is reported in the node's output instead of breaking ComfyUI's node
loading). torch is never imported: tensors are duck-typed through `.cpu().numpy()`.
"""

import json
import logging
import os
import secrets
import socket
import time
import urllib.error
import urllib.request

import numpy as np

log = logging.getLogger("luna_saver")

NODE_NAME = "Luna Daemon Image Saver"
PREFIX = f"[{NODE_NAME}]"
CONNECTION_REFUSED = f"{PREFIX} ERROR: Connection refused. Is daemon running?"

DEFAULT_GATEWAY_URL = "http://127.0.0.1:19283"
DEFAULT_FILENAME = "%time:YYYY_mm_dd.HH.MM.SS%_%model_name%"
DEFAULT_TIMEOUT_S = 10.0
# How long one submission is retried (no answer, 503, 429) with the same Idempotency-Key.
DEFAULT_RETRY_FOR_S = 30.0
MAX_RETRY_WAIT_S = 10.0
# The gateway's defaults (--max-images, --max-body-bytes). Bigger submissions are split.
DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
# Room for the MessagePack framing of one image entry (field names, sizes, affix...).
PER_IMAGE_OVERHEAD = 512

NUM_INPUTS = 5
DEFAULT_AFFIXES = ("RAW", "UPSCALED", "DETAILED", "FINAL", "IMAGE5")
FORMATS = ["png", "webp", "jpeg"]
QUALITY_GATES = ["disabled", "variance", "edge_density", "both"]
MAX_INDEX = 2**63 - 1

_MODEL_TOKENS = ("model_name", "model_path", "model_dir", "index")

# The clock that `%time:...%` is pinned to when a submission is split (a seam for tests).
_now = time.localtime


# --- pixels --------------------------------------------------------------------------------


def to_numpy(image):
    """A ComfyUI IMAGE (torch tensor or numpy array) as a numpy array, without importing torch."""
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "detach"):
        image = image.detach()
    if hasattr(image, "cpu"):
        image = image.cpu()
    if hasattr(image, "float") and hasattr(image, "dtype") and "bfloat16" in str(image.dtype):
        image = image.float()  # numpy has no bfloat16
    if hasattr(image, "numpy"):
        return image.numpy()
    return np.asarray(image)


def float_to_uint8(x):
    """0..1 floats to 0..255: `clip(x * 255 + 0.5, 0, 255)` truncated, i.e. rounded half up and
    clipped; NaN becomes 0. Integer input is taken as already 8-bit and only clipped."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        return np.clip(x, 0, 255).astype(np.uint8)
    x = x.astype(np.float32, copy=False) if x.dtype != np.float64 else x
    y = x * 255 + 0.5
    np.nan_to_num(y, copy=False, nan=0.0)
    np.clip(y, 0, 255, out=y)
    return y.astype(np.uint8)


def split_batch(image):
    """The elements of one IMAGE input as a list of [H, W, C] arrays.

    Accepts [B, H, W, C] (ComfyUI's layout), [H, W, C] and [H, W] (one image), C in 1, 3, 4.
    """
    arr = to_numpy(image)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"an IMAGE must have shape [B, H, W, C]; got {list(arr.shape)}")
    b, h, w, c = arr.shape
    if c not in (1, 3, 4):
        raise ValueError(f"an IMAGE must have 1, 3 or 4 channels; got shape {[b, h, w, c]}")
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"an IMAGE must not be empty; got shape {[b, h, w, c]}")
    return [arr[i] for i in range(b)]


def image_entry(element, affix, fmt, subdir, batch_index, batch_size):
    """One entry of the request's `images` from one [H, W, C] float array."""
    pixels = np.ascontiguousarray(float_to_uint8(element))
    h, w, c = pixels.shape
    return {
        "pixels": pixels.tobytes(),
        "width": int(w),
        "height": int(h),
        "channels": int(c),
        "affix": str(affix),
        "format": str(fmt),
        "subdir": bool(subdir),
        "batch_index": int(batch_index),
        "batch_size": int(batch_size),
    }


# --- metadata ------------------------------------------------------------------------------


def json_object_or_warning(name, value):
    """(object or None, warning or None) for `metadata` / `custom_metadata`.

    A dict (from another node) is sent as is; a blank string means none; a string holding a JSON
    object is sent as that object. Anything else is left out with a warning, so a typo in a
    metadata box never costs the images.
    """
    if value is None:
        return None, None
    if isinstance(value, dict):
        return value, None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if not value.strip():
            return None, None
        try:
            parsed = json.loads(value)
        except ValueError as e:
            return None, f"{name} ignored: not valid JSON ({e}); give an object such as " \
                         '{"artist": "me"}'
        if isinstance(parsed, dict):
            return parsed, None
        return None, f"{name} ignored: it holds JSON {type(parsed).__name__}, not an object"
    return None, f"{name} ignored: a {type(value).__name__} is not an object"


def _msgpack_default(obj):
    """Makes values from other nodes (numpy scalars and arrays, tuples, sets...) packable."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if hasattr(obj, "tolist"):  # torch tensors and friends, without importing them
        try:
            return obj.tolist()
        except Exception:  # noqa: BLE001 - fall back to text
            pass
    return str(obj)


# --- templates -----------------------------------------------------------------------------


def _format_time(fmt, t):
    out = []
    i = 0
    codes = {"YYYY": f"{t.tm_year:04d}", "mm": f"{t.tm_mon:02d}", "dd": f"{t.tm_mday:02d}",
             "HH": f"{t.tm_hour:02d}", "MM": f"{t.tm_min:02d}", "SS": f"{t.tm_sec:02d}"}
    while i < len(fmt):
        for code, value in codes.items():
            if fmt.startswith(code, i):
                out.append(value)
                i += len(code)
                break
        else:
            out.append(fmt[i])
            i += 1
    return "".join(out)


def _token_at(s, pos):
    """(name, index of the closing %) if `s[pos]` ('%') opens a token the daemon knows."""
    close = s.find("%", pos + 1)
    if close < 0:
        return None
    name = s[pos + 1:close]
    if name in _MODEL_TOKENS or name.startswith("time:"):
        return name, close
    return None


def pin_time(template, t):
    """Renders the `%time:FMT%` tokens of `template` at time `t` (a `time.struct_time`) and leaves
    everything else for the daemon, parsing exactly as the daemon does (a token's closing `%` may
    open the next token). Used when one submission is split into several jobs, so that every
    part renders the same names."""
    out = []
    i = 0
    while True:
        start = template.find("%", i)
        if start < 0:
            out.append(template[i:])
            return "".join(out)
        out.append(template[i:start])
        token = _token_at(template, start)
        if token is None:
            out.append("%")
            i = start + 1
            continue
        name, close = token
        shared = _token_at(template, close) is not None
        if name.startswith("time:"):
            out.append(_format_time(name[len("time:"):], t))
        else:
            # Kept whole, closing `%` included: if it was shared, the next token gets its own
            # opening `%` below, and `%a%%b%` parses as `%a%` then `%b%`, as `%a%b%` did.
            out.append(template[start:close + 1])
        i = close if shared else close + 1


# --- transport -----------------------------------------------------------------------------


def _env_number(name, default, cast):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        log.warning("%s ignored: %r is not a number", name, raw)
        return default
    return value if value > 0 else default


def chunk_images(images, options_bytes, max_images, max_body_bytes):
    """Splits `images` into consecutive groups the gateway accepts: at most `max_images` each
    and, estimated, at most `max_body_bytes` per request. An image too large on its own still
    gets its own group (the gateway then answers 413 with its reason)."""
    groups, current, size = [], [], options_bytes
    for entry in images:
        cost = len(entry["pixels"]) + PER_IMAGE_OVERHEAD
        if current and (len(current) >= max_images or size + cost > max_body_bytes):
            groups.append(current)
            current, size = [], options_bytes
        current.append(entry)
        size += cost
    if current:
        groups.append(current)
    return groups


def new_traceparent():
    """A W3C trace context for a new trace, sampled."""
    trace_id = secrets.token_hex(16)
    while trace_id == "0" * 32:
        trace_id = secrets.token_hex(16)
    span_id = secrets.token_hex(8)
    while span_id == "0" * 16:
        span_id = secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01"


class SubmitError(Exception):
    """A submission the gateway did not accept; `str()` is the text to show after `ERROR: `.
    `retryable` when the same request may be sent again (no answer, 503, 429), with the
    gateway's `Retry-After` in seconds when it gave one."""

    def __init__(self, message, refused=False, retryable=False, retry_after=None):
        super().__init__(message)
        self.refused = refused
        self.retryable = retryable
        self.retry_after = retry_after


def _retry_after(headers):
    try:
        return max(0.0, float(headers.get("Retry-After", "").strip()))
    except (AttributeError, ValueError):
        return None


def _is_refused(exc):
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = getattr(exc, "reason", None) if isinstance(exc, urllib.error.URLError) \
            else exc.__cause__
    return False


def post_job(url, body, token=None, timeout=DEFAULT_TIMEOUT_S, traceparent=None,
             idempotency_key=None):
    """POSTs one MessagePack body; returns the gateway's JSON answer or raises SubmitError."""
    headers = {"Content-Type": "application/msgpack", "Accept": "application/json",
               "User-Agent": "luna-comfyui-node/1"}
    if traceparent:
        headers["traceparent"] = traceparent
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read().decode("utf-8", "replace")).get("error")
        except Exception:  # noqa: BLE001 - not the gateway's JSON error body
            detail = None
        raise SubmitError(detail or f"HTTP {e.code} {e.reason} from {url}",
                          retryable=e.code in (429, 503),
                          retry_after=_retry_after(e.headers)) from None
    except (urllib.error.URLError, OSError) as e:
        if _is_refused(e):
            raise SubmitError("Connection refused. Is daemon running?", refused=True,
                              retryable=True) from None
        reason = getattr(e, "reason", e)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise SubmitError(f"no answer from daemon at {url} within {timeout:g} s",
                              retryable=True) from None
        raise SubmitError(f"could not reach daemon at {url}: {reason}",
                          retryable=True) from None
    try:
        answer = json.loads(raw.decode("utf-8"))
        answer["job_id"]  # noqa: B018 - must be present
        return answer
    except Exception:  # noqa: BLE001
        raise SubmitError(f"unexpected answer from {url}: {raw[:200]!r}") from None


def post_with_retry(url, body, token=None, timeout=DEFAULT_TIMEOUT_S, traceparent=None,
                    retry_for=DEFAULT_RETRY_FOR_S, sleep=time.sleep, clock=time.monotonic):
    """`post_job` with one Idempotency-Key per submission, retried on no answer, 503 and 429
    (waiting `Retry-After` when given) for at most `retry_for` seconds. A retry with the key
    names the same job and never saves an image twice. A refused connection on the first try
    is not retried: the daemon is not running."""
    key = secrets.token_hex(16)
    started = clock()
    backoff = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            return post_job(url, body, token, timeout, traceparent, idempotency_key=key)
        except SubmitError as e:
            if not e.retryable or (e.refused and attempt == 1):
                raise
            wait = min(e.retry_after if e.retry_after is not None else backoff,
                       MAX_RETRY_WAIT_S)
            backoff = min(backoff * 2, MAX_RETRY_WAIT_S)
            if clock() - started + wait > retry_for:
                raise
            log.warning("%s attempt %d: %s; retrying in %.1f s with the same Idempotency-Key",
                        PREFIX, attempt, e, wait)
            sleep(wait)


# --- the node ------------------------------------------------------------------------------


class LunaDaemonImageSaver:
    """Sends images to the Luna Saver daemon, which writes them in the background."""

    CATEGORY = "Luna/image"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("status",)
    DESCRIPTION = ("Submits images to the Luna Saver daemon (luna up) and returns at once; "
                   "the daemon writes PNG/WebP/JPEG files with the workflow embedded.")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        optional = {}
        for i in range(1, NUM_INPUTS + 1):
            optional[f"image_{i}"] = ("IMAGE",)
        for i in range(1, NUM_INPUTS + 1):
            optional[f"affix_{i}"] = ("STRING", {"default": DEFAULT_AFFIXES[i - 1]})
        for i in range(1, NUM_INPUTS + 1):
            optional[f"format_{i}"] = (FORMATS, {"default": "png"})
        for i in range(1, NUM_INPUTS + 1):
            optional[f"subdir_{i}"] = ("BOOLEAN", {"default": True})
        optional.update({
            "custom_metadata": ("STRING", {"default": "", "multiline": True,
                                           "tooltip": "JSON object of extra keys to embed"}),
            "metadata": ("STRING", {"default": "", "multiline": True,
                                    "tooltip": "Generation parameters: a JSON object, or a "
                                               "dict from another node"}),
            "model_name": ("STRING", {"default": ""}),
            "filename_index": ("INT", {"default": 0, "min": 0, "max": MAX_INDEX,
                                       "tooltip": "value of %index%"}),
        })
        return {
            "required": {
                "save_path": ("STRING", {"default": "",
                                         "tooltip": "folder template, relative to the daemon's "
                                                    "output root"}),
                "filename": ("STRING", {"default": DEFAULT_FILENAME}),
                "quality_gate": (QUALITY_GATES, {"default": "disabled"}),
                "min_quality_threshold": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0,
                                                    "step": 0.01}),
                "png_compression": ("INT", {"default": 4, "min": 0, "max": 9}),
                "lossy_quality": ("INT", {"default": 90, "min": 70, "max": 100}),
                "lossless_webp": ("BOOLEAN", {"default": False}),
                "embed_workflow": ("BOOLEAN", {"default": True}),
            },
            "optional": optional,
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, save_path="", filename=DEFAULT_FILENAME, quality_gate="disabled",
             min_quality_threshold=0.3, png_compression=4, lossy_quality=90,
             lossless_webp=False, embed_workflow=True, custom_metadata="", metadata="",
             model_name="", filename_index=0, prompt=None, extra_pnginfo=None, **kwargs):
        text = submit(
            save_path=save_path, filename=filename, quality_gate=quality_gate,
            min_quality_threshold=min_quality_threshold, png_compression=png_compression,
            lossy_quality=lossy_quality, lossless_webp=lossless_webp,
            embed_workflow=embed_workflow, custom_metadata=custom_metadata, metadata=metadata,
            model_name=model_name, filename_index=filename_index, prompt=prompt,
            extra_pnginfo=extra_pnginfo, **kwargs,
        )
        return {"ui": {"text": [text]}, "result": (text,)}


def collect_images(kwargs):
    """The request's `images` from `image_i`, `affix_i`, `format_i`, `subdir_i`, in input order,
    each batch element one image."""
    entries = []
    for i in range(1, NUM_INPUTS + 1):
        image = kwargs.get(f"image_{i}")
        if image is None:
            continue
        affix = kwargs.get(f"affix_{i}", DEFAULT_AFFIXES[i - 1])
        fmt = kwargs.get(f"format_{i}", "png")
        subdir = kwargs.get(f"subdir_{i}", True)
        try:
            elements = split_batch(image)
        except ValueError as e:
            raise ValueError(f"image_{i}: {e}") from None
        for b, element in enumerate(elements):
            entries.append(image_entry(element, "" if affix is None else affix, fmt, subdir,
                                       b, len(elements)))
    return entries


def submit(save_path="", filename=DEFAULT_FILENAME, quality_gate="disabled",
           min_quality_threshold=0.3, png_compression=4, lossy_quality=90, lossless_webp=False,
           embed_workflow=True, custom_metadata="", metadata="", model_name="",
           filename_index=0, prompt=None, extra_pnginfo=None, **kwargs):
    """Does the node's work and returns the text it shows; never raises for expected failures."""
    try:
        import msgpack
    except ImportError:
        return f"{PREFIX} ERROR: the Python package msgpack is missing; run `pip install msgpack` " \
               "in ComfyUI's Python environment"
    try:
        images = collect_images(kwargs)
    except ValueError as e:
        return f"{PREFIX} ERROR: {e}"
    if not images:
        return f"{PREFIX} ERROR: no image connected; connect at least one of image_1..image_5"

    warnings = []
    metadata_obj, warning = json_object_or_warning("metadata", metadata)
    warnings += [warning] if warning else []
    custom_obj, warning = json_object_or_warning("custom_metadata", custom_metadata)
    warnings += [warning] if warning else []

    try:
        options = {
            "save_path": "" if save_path is None else str(save_path),
            "filename": DEFAULT_FILENAME if filename is None else str(filename),
            "model_name": "" if model_name is None else str(model_name),
            "index": int(filename_index or 0),
            "quality_gate": str(quality_gate),
            "min_quality_threshold": float(min_quality_threshold),
            "png_compression": int(png_compression),
            "lossy_quality": int(lossy_quality),
            "lossless_webp": bool(lossless_webp),
            "embed_workflow": bool(embed_workflow),
            "prompt": prompt if prompt else None,
            "extra_pnginfo": extra_pnginfo if extra_pnginfo else None,
            "metadata": metadata_obj,
            "custom_metadata": custom_obj,
        }
    except (TypeError, ValueError) as e:
        return f"{PREFIX} ERROR: bad input value: {e}"
    options = {k: v for k, v in options.items() if v is not None}

    url = os.environ.get("LUNA_GATEWAY_URL", "").strip() or DEFAULT_GATEWAY_URL
    url = url.rstrip("/") + "/v1/jobs"
    token = os.environ.get("LUNA_TOKEN", "").strip() or None
    timeout = _env_number("LUNA_SUBMIT_TIMEOUT", DEFAULT_TIMEOUT_S, float)
    retry_for = _env_number("LUNA_SUBMIT_RETRY_FOR", DEFAULT_RETRY_FOR_S, float)
    max_images = _env_number("LUNA_MAX_IMAGES", DEFAULT_MAX_IMAGES, int)
    max_body = _env_number("LUNA_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, int)

    def pack(opts, group):
        return msgpack.packb({**opts, "images": group}, use_bin_type=True,
                             default=_msgpack_default)

    try:
        options_bytes = len(pack(options, []))
    except Exception as e:  # noqa: BLE001 - a value msgpack cannot take even as text
        return f"{PREFIX} ERROR: could not encode the request: {e}"
    groups = chunk_images(images, options_bytes, max_images, max_body)
    if len(groups) > 1:
        # Several jobs: render %time:...% here, once, so every part gets the same names.
        now = _now()
        options["save_path"] = pin_time(options["save_path"], now)
        options["filename"] = pin_time(options["filename"], now)

    traceparent = new_traceparent()
    accepted = []
    for n, group in enumerate(groups):
        body = pack(options, group)
        for entry in group:  # the pixels now live in `body`; free them as we go
            entry["pixels"] = b""
        try:
            accepted.append(post_with_retry(url, body, token, timeout, traceparent,
                                            retry_for=retry_for))
        except SubmitError as e:
            if e.refused and not accepted:
                text = CONNECTION_REFUSED
            else:
                text = f"{PREFIX} ERROR: {e}"
            if accepted:
                done = sum(int(a.get("num_images", 0)) for a in accepted)
                ids = ", ".join(a["job_id"] for a in accepted)
                text += f" (part {n + 1} of {len(groups)} failed; {done} of {len(images)} " \
                        f"images were already submitted as job {ids})"
            log.error("%s", text)
            return "\n".join([text] + [f"{PREFIX} WARNING: {w}" for w in warnings])
        del body

    if len(accepted) == 1:
        text = accepted[0].get("message") or \
            f"{PREFIX} Submitted {accepted[0].get('num_images', len(images))} images to " \
            f"daemon. Job ID: {accepted[0]['job_id']}"
    else:
        total = sum(int(a.get("num_images", 0)) for a in accepted)
        ids = ", ".join(a["job_id"] for a in accepted)
        text = f"{PREFIX} Submitted {total} images to daemon in {len(accepted)} jobs. " \
               f"Job IDs: {ids}"
    for w in warnings:
        log.warning("%s %s", PREFIX, w)
    log.info("%s (traceparent %s)", text, traceparent)
    return "\n".join([text] + [f"{PREFIX} WARNING: {w}" for w in warnings])


NODE_CLASS_MAPPINGS = {"LunaDaemonImageSaver": LunaDaemonImageSaver}
NODE_DISPLAY_NAME_MAPPINGS = {"LunaDaemonImageSaver": NODE_NAME}
