"""Luna Daemon Image Saver: a ComfyUI output node that hands images to the Luna Saver daemon.

The node hands up to five IMAGE inputs (batches included) to the gateway's `POST /v1/jobs` in one
MessagePack request and returns at once with the job id; the daemon converts, encodes and writes
the files in the background. See README.md beside this file.

Two ways for the pixels:
- **Local hand-off** (the daemon on this machine, `GET /v1/handoff` answers with a directory this
  process can write): the tensor's float32 samples are copied once into a file in shared memory
  that this process keeps mapped (one per input, reused run after run), and the request carries
  only its name; the gateway reads and converts them before it answers.
- **Inline** (a remote daemon, another platform, or any hand-off problem): the node converts to
  the format's sample type (8-bit, 16-bit or float) and sends the bytes in the request.

Imports only the standard library and numpy at module import (msgpack, Pillow and ComfyUI's
`folder_paths` are imported when the node runs, so a missing package is reported in the node's
output instead of breaking ComfyUI's node loading). torch is never imported: tensors are
duck-typed (`.cpu().numpy()`, and `mul`/`add_`/`clamp_`/`byte` for the 8-bit conversion).
"""

import atexit
import http.client
import json
import logging
import mmap
import os
import secrets
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
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
FORMATS = ["png", "webp", "jpeg", "png16", "exr", "avif"]
# The sample type each format is encoded from (the gateway converts anything else to it).
FORMAT_SAMPLE = {"png": "u8", "webp": "u8", "jpeg": "u8", "avif": "u8", "png16": "u16",
                 "exr": "f32"}
EXR_PRECISIONS = ["32", "16"]
HANDOFF_UNAVAILABLE = "handoff_unavailable"
# How long "this gateway takes no hand-off" is believed before asking again.
HANDOFF_NEGATIVE_TTL_S = 60.0
# Previews: longest side, and where ComfyUI's /view serves them from.
PREVIEW_MAX_SIDE = 256
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


def _quantize(x, top, dtype):
    """trunc(clamp(x * top + 0.5, 0, top)) in float32 (float64 stays float64), NaN to 0: `fmax`
    and `fmin` drop NaN, and two in-place passes are about 4x faster than `nan_to_num` and
    `clip`."""
    x = x.astype(np.float32, copy=False) if x.dtype != np.float64 else x
    y = x * x.dtype.type(top)
    y += x.dtype.type(0.5)
    np.fmax(y, 0, out=y)
    np.fmin(y, top, out=y)
    return y.astype(dtype)


def float_to_uint8(x):
    """0..1 floats to 0..255: `clip(x * 255 + 0.5, 0, 255)` truncated, i.e. rounded half up and
    clipped; NaN becomes 0. Integer input is taken as already 8-bit and only clipped."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        return np.clip(x, 0, 255).astype(np.uint8)
    return _quantize(x, 255, np.uint8)


def float_to_uint16(x):
    """0..1 floats to 0..65535 little-endian: `clip(x * 65535 + 0.5, 0, 65535)` truncated, NaN
    to 0 (the gateway's rule for png16). Integer input is taken as 8-bit and widened (x * 257)."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        return (np.clip(x, 0, 255).astype("<u2") * 257).astype("<u2")
    return _quantize(x, 65535, "<u2")


def _is_torch_like(image):
    return all(hasattr(image, a) for a in ("mul", "add_", "clamp_", "nan_to_num_", "byte"))


def uint8_batch(image):
    """A whole IMAGE input as uint8 in the fastest place: a torch tensor converts itself with
    its own multi-threaded ops (no torch import), numpy arrays through `float_to_uint8`. Both
    compute trunc(clamp(x * 255 + 0.5, 0, 255)) in float32 with NaN to 0."""
    dtype = str(getattr(image, "dtype", ""))
    if _is_torch_like(image) and "float32" in dtype:
        return to_numpy(image.mul(255).add_(0.5).nan_to_num_(0.0).clamp_(0, 255).byte())
    return float_to_uint8(to_numpy(image))


def as_batch(image):
    """One IMAGE input as a [B, H, W, C] numpy array (a view where possible).

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
    return arr


def split_batch(image):
    """The elements of one IMAGE input as a list of [H, W, C] arrays."""
    arr = as_batch(image)
    return [arr[i] for i in range(arr.shape[0])]


def inline_pixels(element, fmt):
    """(bytes, sample) of one [H, W, C] element in the sample type of `fmt`."""
    sample = FORMAT_SAMPLE.get(fmt, "u8")
    if sample == "u16":
        data = float_to_uint16(element)
    elif sample == "f32":
        data = np.asarray(element).astype("<f4", copy=False)
    else:
        data = float_to_uint8(element)
    return np.ascontiguousarray(data).tobytes(), sample


def image_entry(element, affix, fmt, subdir, batch_index, batch_size, pixels=None):
    """One entry of the request's `images` from one [H, W, C] array, with inline pixels in the
    format's sample type (or `pixels`, already converted 8-bit bytes)."""
    h, w, c = element.shape
    if pixels is None:
        pixels, sample = inline_pixels(element, fmt)
    else:
        sample = "u8"
    entry = {
        "pixels": pixels,
        "width": int(w),
        "height": int(h),
        "channels": int(c),
        "affix": str(affix),
        "format": str(fmt),
        "subdir": bool(subdir),
        "batch_index": int(batch_index),
        "batch_size": int(batch_size),
    }
    if sample != "u8":
        entry["sample"] = sample
    return entry


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
    and, estimated, at most `max_body_bytes` per request (hand-off bytes count as body bytes:
    the gateway holds them in the same budget). An image too large on its own still gets its
    own group (the gateway then answers 413 with its reason)."""
    groups, current, size = [], [], options_bytes
    for entry in images:
        cost = _entry_bytes(entry) + PER_IMAGE_OVERHEAD
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
    gateway's `Retry-After` in seconds when it gave one. `code` is the gateway's machine-readable
    `code` (e.g. `handoff_unavailable`); `answered` is false when the request may have reached
    the gateway without an answer coming back (a timeout, a connection lost mid-way)."""

    def __init__(self, message, refused=False, retryable=False, retry_after=None, code=None,
                 answered=True):
        super().__init__(message)
        self.refused = refused
        self.retryable = retryable
        self.retry_after = retry_after
        self.code = code
        self.answered = answered


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


def _open(url, timeout):
    """(connection, path) for one request to `url` (http or https), not yet connected."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"LUNA_GATEWAY_URL must be an http:// or https:// URL; got {url!r}")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return cls(parts.hostname, parts.port, timeout=timeout), path


def post_job(url, body, token=None, timeout=DEFAULT_TIMEOUT_S, traceparent=None,
             idempotency_key=None, while_waiting=None):
    """POSTs one MessagePack body; returns the gateway's JSON answer or raises SubmitError.

    `while_waiting()` runs once the request is sent and before the answer is read, so the
    node's own work (previews) overlaps the gateway's on this thread, with no second thread
    to compete with for the GIL."""
    headers = {"Content-Type": "application/msgpack", "Accept": "application/json",
               "User-Agent": "luna-comfyui-node/1"}
    if traceparent:
        headers["traceparent"] = traceparent
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection, path = _open(url, timeout)
    try:
        try:
            connection.request("POST", path, body=body, headers=headers)
        except OSError as e:
            if _is_refused(e):
                raise SubmitError("Connection refused. Is daemon running?", refused=True,
                                  retryable=True) from None
            # Nothing or part of the body was sent: the gateway cannot have taken the job,
            # but a short write may still have reached it; treat it as unanswered.
            raise SubmitError(f"could not reach daemon at {url}: {e}",
                              retryable=True, answered=False) from None
        if while_waiting is not None:
            while_waiting()
        try:
            response = connection.getresponse()
            raw = response.read()
        except (socket.timeout, TimeoutError):
            raise SubmitError(f"no answer from daemon at {url} within {timeout:g} s",
                              retryable=True, answered=False) from None
        except (OSError, http.client.HTTPException) as e:
            raise SubmitError(f"could not reach daemon at {url}: {e}",
                              retryable=True, answered=False) from None
    finally:
        connection.close()
    if response.status >= 400:
        detail, code = None, None
        try:
            answer = json.loads(raw.decode("utf-8", "replace"))
            detail, code = answer.get("error"), answer.get("code")
        except Exception:  # noqa: BLE001 - not the gateway's JSON error body
            pass
        raise SubmitError(detail or f"HTTP {response.status} {response.reason} from {url}",
                          retryable=response.status in (429, 503),
                          retry_after=_retry_after(response.headers), code=code)
    try:
        answer = json.loads(raw.decode("utf-8"))
        answer["job_id"]  # noqa: B018 - must be present
        return answer
    except Exception:  # noqa: BLE001
        raise SubmitError(f"unexpected answer from {url}: {raw[:200]!r}") from None


def post_with_retry(url, body, token=None, timeout=DEFAULT_TIMEOUT_S, traceparent=None,
                    retry_for=DEFAULT_RETRY_FOR_S, sleep=time.sleep, clock=time.monotonic,
                    on_unanswered=None, while_waiting=None):
    """`post_job` with one Idempotency-Key per submission, retried on no answer, 503 and 429
    (waiting `Retry-After` when given) for at most `retry_for` seconds. A retry with the key
    names the same job and never saves an image twice. A refused connection on the first try
    is not retried: the daemon is not running. `on_unanswered()` is called for every attempt
    that may have reached the gateway without an answer; `while_waiting()` (which must be
    idempotent) during every attempt that reached the gateway."""
    key = secrets.token_hex(16)
    started = clock()
    backoff = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            return post_job(url, body, token, timeout, traceparent, idempotency_key=key,
                            while_waiting=while_waiting)
        except SubmitError as e:
            if not e.answered and on_unanswered is not None:
                on_unanswered()
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


# --- local hand-off ------------------------------------------------------------------------


def _boot_id():
    """This machine's boot id (Linux), or None where there is none to read."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


# gateway base URL -> (hand-off directory or None, when it was learnt)
_handoff_dirs = {}
# Segments and the requests that use them are never shared between threads.
_handoff_lock = threading.Lock()


def handoff_dir(base_url, token=None, timeout=2.0, clock=time.monotonic):
    """The gateway's hand-off directory when this process can use it, else None.

    Asked once per gateway URL (`GET /v1/handoff`) and remembered: a directory until a
    hand-off fails (`forget_handoff`), "none" for `HANDOFF_NEGATIVE_TTL_S`. Usable only when
    the directory exists here and is writable, and the gateway's boot id is this machine's
    (when both are known): a remote gateway may name a folder that happens to exist here too.
    """
    known = _handoff_dirs.get(base_url)
    if known is not None:
        directory, learnt = known
        if directory is not None or clock() - learnt < HANDOFF_NEGATIVE_TTL_S:
            return directory
    headers = {"Accept": "application/json", "User-Agent": "luna-comfyui-node/1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base_url + "/v1/handoff", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            info = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError:
        info = None  # 404: disabled; an older gateway without the route; a wrong token
    except (urllib.error.URLError, OSError, ValueError):
        return None  # not reachable now: ask again next time
    directory = None
    if isinstance(info, dict) and isinstance(info.get("dir"), str) \
            and "f32" in (info.get("sample_types") or []):
        theirs, ours = info.get("boot_id"), _boot_id()
        same_machine = theirs is None or ours is None or theirs == ours
        candidate = info["dir"]
        if same_machine and os.path.isdir(candidate) \
                and os.access(candidate, os.W_OK | os.X_OK):
            directory = candidate
    _handoff_dirs[base_url] = (directory, clock())
    return directory


def forget_handoff(base_url):
    """Ask the gateway again next time (after a hand-off failed)."""
    _handoff_dirs.pop(base_url, None)


try:
    import fcntl  # POSIX; the hand-off directory is only ever used where it exists
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# A segment younger than this is never swept: its process may not have locked it yet.
STALE_SEGMENT_MIN_AGE_S = 60.0


class Segment:
    """One file in the hand-off directory, opened once, mapped, grown when needed, reused.

    Its pages stay mapped (and so already faulted in) between runs, so writing a frame is one
    copy at memory speed. Removed at interpreter exit, or when a request that used it got no
    answer (the gateway may still be reading it, so it is never written again). The process
    holds a shared `flock` on it for as long as it lives, which the kernel drops however the
    process ends, so `sweep_stale_segments` can tell a segment left by a killed ComfyUI from
    one in use.
    """

    def __init__(self, directory, slot):
        self.name = f"luna-{os.getpid()}-{slot}-{secrets.token_hex(6)}.f32"
        self.path = os.path.join(directory, self.name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        for extra in ("O_NOFOLLOW", "O_CLOEXEC", "O_BINARY"):
            flags |= getattr(os, extra, 0)
        self.fd = os.open(self.path, flags, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                pass  # a file system without locks: only never swept
        self.size = 0
        self.map = None

    def view(self, shape):
        """A float32 array of `shape` over the start of the segment, grown to fit."""
        nbytes = int(np.prod(shape)) * 4
        if nbytes > self.size:
            self._grow(nbytes)
        return np.ndarray(shape, dtype="<f4", buffer=self.map, offset=0)

    def _grow(self, nbytes):
        size = -(-nbytes // (1 << 20)) * (1 << 20)  # whole MiB
        if self.map is not None:
            self.map.close()
            self.map = None
        os.ftruncate(self.fd, size)
        populate = getattr(mmap, "MAP_POPULATE", 0)
        if populate and hasattr(mmap, "MAP_SHARED"):
            self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | populate)
        else:
            self.map = mmap.mmap(self.fd, size)
            np.frombuffer(self.map, dtype=np.uint8)[::mmap.PAGESIZE] = 0  # fault pages in now
        self.size = size

    def close(self):
        try:
            if self.map is not None:
                self.map.close()
        except (BufferError, ValueError):
            pass  # a view still exists; the mapping goes with the process
        self.map = None
        try:
            os.close(self.fd)
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


# (directory, input slot) -> Segment
_segments = {}
# Directories swept of other processes' stale segments by this process.
_swept = set()


def segment_for(directory, slot):
    segment = _segments.get((directory, slot))
    if segment is None:
        if directory not in _swept:
            _swept.add(directory)
            sweep_stale_segments(directory)
        segment = Segment(directory, slot)
        _segments[(directory, slot)] = segment
    return segment


def sweep_stale_segments(directory, min_age_s=STALE_SEGMENT_MIN_AGE_S, now=time.time):
    """Removes the segments in `directory` that no live process holds; returns their names.

    A ComfyUI stopped by SIGTERM (what service managers and `docker stop` send; ComfyUI does not
    handle it, so exit handlers never run) or SIGKILL leaves its segments behind, up to a
    100 MB 4K frame each. Every live node holds a lock on its own (see `Segment`); a segment
    that can be locked exclusively, and is older than `min_age_s` (so not one being created
    right now), belongs to nobody. Nothing but the node's own regular files is touched."""
    if fcntl is None:
        return []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    removed = []
    for name in names:
        if not (name.startswith("luna-") and name.endswith(".f32")):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, flags)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or now() - info.st_ctime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: its process is alive
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("%s removed %d hand-off segments left by stopped processes: %s", PREFIX,
                 len(removed), ", ".join(removed))
    return removed


def drop_segments(keys):
    """Never writes these segments again: the gateway may still read them."""
    for key in keys:
        segment = _segments.pop(key, None)
        if segment is not None:
            segment.close()


@atexit.register
def _remove_segments():
    drop_segments(list(_segments))


def write_handoff(directory, slot, batch):
    """Copies a [B, H, W, C] input into its slot's segment as float32; returns the segment.

    numpy's copy on this thread, not torch's multi-threaded one: torch's worker threads spin
    for a while after the copy and take the cores the gateway then needs (measured in ComfyUI
    at 1024x1024: 0.2 ms saved on the copy, 1.5 ms lost waiting for the gateway)."""
    segment = segment_for(directory, slot)
    view = segment.view(batch.shape)
    try:
        np.copyto(view, batch, casting="unsafe")
    finally:
        del view
    return segment


# --- previews ------------------------------------------------------------------------------


def _temp_directory():
    """ComfyUI's temp folder (what `/view?type=temp` serves), or None outside ComfyUI."""
    try:
        import folder_paths  # ComfyUI's module; absent when the node runs elsewhere
        return folder_paths.get_temp_directory()
    except Exception:  # noqa: BLE001 - no ComfyUI, no previews
        return None


def write_previews(elements, directory, max_side=PREVIEW_MAX_SIDE):
    """Small previews of [H, W, C] float elements in `directory`, as SaveImage lists them.

    Downscaled by strided slicing (every n-th pixel, no filtering: it costs nothing at 4K),
    8-bit with the daemon's rounding, JPEG (PNG with alpha) at fast settings. Returns the
    `ui.images` entries, or [] when Pillow is missing or the folder is not writable.
    """
    try:
        from PIL import Image
    except ImportError:
        return []
    out = []
    stem = f"luna_preview_{secrets.token_hex(5)}"
    try:
        os.makedirs(directory, exist_ok=True)
        for i, element in enumerate(elements):
            h, w = element.shape[:2]
            step = max(1, -(-max(h, w) // max_side))
            small = float_to_uint8(np.ascontiguousarray(element[::step, ::step]))
            channels = small.shape[2]
            if channels == 1:
                img, ext = Image.fromarray(small[:, :, 0], "L"), "jpg"
            elif channels == 4:
                img, ext = Image.fromarray(np.ascontiguousarray(small), "RGBA"), "png"
            else:
                img, ext = Image.fromarray(np.ascontiguousarray(small), "RGB"), "jpg"
            name = f"{stem}_{i:05}.{ext}"
            if ext == "png":
                img.save(os.path.join(directory, name), compress_level=1)
            else:
                img.save(os.path.join(directory, name), quality=85)
            out.append({"filename": name, "subfolder": "", "type": "temp"})
    except OSError as e:
        log.warning("%s previews not written: %s", PREFIX, e)
    return out


class _Previews:
    """Previews written on demand, once: `run()` is the hook that overlaps them with the
    gateway's work on the request, `images()` writes them if that never ran."""

    def __init__(self, elements):
        self.elements = elements
        self.result = None

    def run(self):
        if self.result is not None:
            return
        directory = _temp_directory()
        self.result = []
        if directory and self.elements:
            try:
                self.result = write_previews(self.elements, directory)
            except Exception as e:  # noqa: BLE001 - a preview never fails a save
                log.warning("%s previews not written: %s", PREFIX, e)
        self.elements = None

    def images(self):
        self.run()
        return self.result


# --- the node ------------------------------------------------------------------------------


class LunaDaemonImageSaver:
    """Sends images to the Luna Saver daemon, which writes them in the background."""

    CATEGORY = "Luna/image"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("status",)
    DESCRIPTION = ("Submits images to the Luna Saver daemon (luna up) and returns at once; "
                   "the daemon writes PNG (8 or 16-bit), WebP, JPEG, AVIF or EXR files with "
                   "the workflow embedded.")

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
            # Last, so workflows saved before it keep their widget values.
            "exr_precision": (EXR_PRECISIONS, {"default": "32",
                                               "tooltip": "bits per EXR sample: 32 (float) or "
                                                          "16 (half)"}),
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
        text, previews = run(
            save_path=save_path, filename=filename, quality_gate=quality_gate,
            min_quality_threshold=min_quality_threshold, png_compression=png_compression,
            lossy_quality=lossy_quality, lossless_webp=lossless_webp,
            embed_workflow=embed_workflow, custom_metadata=custom_metadata, metadata=metadata,
            model_name=model_name, filename_index=filename_index, prompt=prompt,
            extra_pnginfo=extra_pnginfo, **kwargs,
        )
        ui = {"text": [text]}
        if previews:
            ui["images"] = previews
        return {"ui": ui, "result": (text,)}


class ImageInputSlot:
    """One connected IMAGE input: the original (tensor or array), its [B, H, W, C] numpy view,
    and where its images go."""

    def __init__(self, slot, image, affix, fmt, subdir):
        self.slot = slot
        self.image = image
        self.batch = as_batch(image)
        self.affix = "" if affix is None else affix
        self.fmt = fmt
        self.subdir = subdir
        self._u8 = None

    def elements(self):
        return [self.batch[b] for b in range(self.batch.shape[0])]

    def inline_entry(self, b):
        """Image `b` with its pixels inline, converted for its format in the cheapest place."""
        size = self.batch.shape[0]
        element = self.batch[b]
        if FORMAT_SAMPLE.get(self.fmt, "u8") == "u8":
            if self._u8 is None:
                self._u8 = as_batch(uint8_batch(self.image))
            pixels = np.ascontiguousarray(self._u8[b]).tobytes()
            return image_entry(element, self.affix, self.fmt, self.subdir, b, size, pixels)
        return image_entry(element, self.affix, self.fmt, self.subdir, b, size)

    def handoff_entry(self, b, segment):
        """Image `b` as a reference to its float32 samples in `segment`."""
        _, h, w, c = self.batch.shape
        nbytes = h * w * c * 4
        return {
            "width": int(w), "height": int(h), "channels": int(c), "sample": "f32",
            "handoff": {"name": segment.name, "offset": b * nbytes},
            "affix": str(self.affix), "format": str(self.fmt), "subdir": bool(self.subdir),
            "batch_index": b, "batch_size": int(self.batch.shape[0]),
            "_bytes": nbytes, "_input": self, "_b": b,
        }


def collect_inputs(kwargs):
    """The connected `image_i` inputs with their `affix_i`, `format_i`, `subdir_i`, in order."""
    inputs = []
    for i in range(1, NUM_INPUTS + 1):
        image = kwargs.get(f"image_{i}")
        if image is None:
            continue
        fmt = kwargs.get(f"format_{i}", "png")
        if fmt not in FORMAT_SAMPLE:
            raise ValueError(f"format_{i}: {fmt!r} is not one of {', '.join(FORMATS)}")
        try:
            inputs.append(ImageInputSlot(i, image, kwargs.get(f"affix_{i}", DEFAULT_AFFIXES[i - 1]),
                                         fmt, kwargs.get(f"subdir_{i}", True)))
        except ValueError as e:
            raise ValueError(f"image_{i}: {e}") from None
    return inputs


def collect_images(kwargs):
    """The request's `images` with inline pixels, in input order, each batch element one image."""
    return [inp.inline_entry(b) for inp in collect_inputs(kwargs)
            for b in range(inp.batch.shape[0])]


def _entry_bytes(entry):
    return entry.get("_bytes", len(entry.get("pixels", b"")))


def _wire(entry):
    return {k: v for k, v in entry.items() if not k.startswith("_")}


def submit(**kwargs):
    """Does the node's work and returns the text it shows; never raises for expected failures."""
    return run(**kwargs)[0]


def run(save_path="", filename=DEFAULT_FILENAME, quality_gate="disabled",
        min_quality_threshold=0.3, png_compression=4, lossy_quality=90, lossless_webp=False,
        embed_workflow=True, custom_metadata="", metadata="", model_name="",
        filename_index=0, prompt=None, extra_pnginfo=None, exr_precision="32", **kwargs):
    """(text the node shows, `ui.images` previews); never raises for expected failures."""
    try:
        import msgpack
    except ImportError:
        return f"{PREFIX} ERROR: the Python package msgpack is missing; run `pip install msgpack` " \
               "in ComfyUI's Python environment", []
    try:
        inputs = collect_inputs(kwargs)
    except ValueError as e:
        return f"{PREFIX} ERROR: {e}", []
    if not inputs:
        return f"{PREFIX} ERROR: no image connected; connect at least one of image_1..image_5", []

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
            "exr_precision": int(exr_precision),
            "embed_workflow": bool(embed_workflow),
            "prompt": prompt if prompt else None,
            "extra_pnginfo": extra_pnginfo if extra_pnginfo else None,
            "metadata": metadata_obj,
            "custom_metadata": custom_obj,
        }
    except (TypeError, ValueError) as e:
        return f"{PREFIX} ERROR: bad input value: {e}", []
    options = {k: v for k, v in options.items() if v is not None}

    base = (os.environ.get("LUNA_GATEWAY_URL", "").strip() or DEFAULT_GATEWAY_URL).rstrip("/")
    settings = {
        "base": base,
        "url": base + "/v1/jobs",
        "token": os.environ.get("LUNA_TOKEN", "").strip() or None,
        "timeout": _env_number("LUNA_SUBMIT_TIMEOUT", DEFAULT_TIMEOUT_S, float),
        "retry_for": _env_number("LUNA_SUBMIT_RETRY_FOR", DEFAULT_RETRY_FOR_S, float),
        "max_images": _env_number("LUNA_MAX_IMAGES", DEFAULT_MAX_IMAGES, int),
        "max_body": _env_number("LUNA_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, int),
        "handoff": os.environ.get("LUNA_HANDOFF", "").strip().lower() not in ("0", "off", "no"),
    }
    with _handoff_lock:
        text, previews, accepted = _submit(msgpack, options, inputs, settings)
    if accepted:
        for w in warnings:
            log.warning("%s %s", PREFIX, w)
    text = "\n".join([text] + [f"{PREFIX} WARNING: {w}" for w in warnings])
    # Previews only for images the daemon took: a preview promises a file.
    return text, previews.images() if accepted and previews is not None else []


def _submit(msgpack, options, inputs, cfg):
    """Sends every image; returns (text, the previews being written, all accepted)."""
    def pack(opts, group):
        return msgpack.packb({**opts, "images": [_wire(e) for e in group]}, use_bin_type=True,
                             default=_msgpack_default)

    try:
        options_bytes = len(pack(options, []))
    except Exception as e:  # noqa: BLE001 - a value msgpack cannot take even as text
        return f"{PREFIX} ERROR: could not encode the request: {e}", None, False

    # Written while the gateway reads the first request (see `post_job`).
    previews = _Previews([e for inp in inputs for e in inp.elements()])

    base = cfg["base"]
    directory = handoff_dir(base, cfg["token"], min(cfg["timeout"], 2.0)) \
        if cfg["handoff"] else None
    used = []
    entries = None
    if directory is not None:
        try:
            entries = []
            for inp in inputs:
                segment = write_handoff(directory, inp.slot, inp.batch)
                used.append((directory, inp.slot))
                entries += [inp.handoff_entry(b, segment) for b in range(inp.batch.shape[0])]
        except (OSError, ValueError, BufferError) as e:
            log.warning("%s local hand-off not possible (%s); sending pixels inline", PREFIX, e)
            drop_segments(used)
            forget_handoff(base)
            entries, used = None, []
    if entries is None:
        entries = [inp.inline_entry(b) for inp in inputs for b in range(inp.batch.shape[0])]

    groups = chunk_images(entries, options_bytes, cfg["max_images"], cfg["max_body"])
    if len(groups) > 1:
        # Several jobs: render %time:...% here, once, so every part gets the same names.
        now = _now()
        options["save_path"] = pin_time(options["save_path"], now)
        options["filename"] = pin_time(options["filename"], now)

    traceparent = new_traceparent()
    unanswered = []
    accepted = []

    def send(group):
        body = pack(options, group)
        for entry in group:  # the pixels now live in `body`; free them as we go
            if "pixels" in entry:
                entry["pixels"] = b""
        return post_with_retry(cfg["url"], body, cfg["token"], cfg["timeout"], traceparent,
                               retry_for=cfg["retry_for"],
                               on_unanswered=lambda: unanswered.append(True),
                               while_waiting=previews.run)

    try:
        for n, group in enumerate(groups):
            try:
                try:
                    accepted.append(send(group))
                except SubmitError as e:
                    if e.code != HANDOFF_UNAVAILABLE or not any("handoff" in x for x in group):
                        raise
                    # Not on the gateway's machine after all (or hand-off off): inline, for
                    # this and every later part.
                    log.info("%s gateway cannot read the hand-off (%s); sending inline",
                             PREFIX, e)
                    forget_handoff(base)
                    for later in groups[n:]:
                        later[:] = [x["_input"].inline_entry(x["_b"]) if "handoff" in x else x
                                    for x in later]
                    accepted.append(send(group))
            except SubmitError as e:
                if e.refused and not accepted:
                    text = CONNECTION_REFUSED
                else:
                    text = f"{PREFIX} ERROR: {e}"
                if accepted:
                    done = sum(int(a.get("num_images", 0)) for a in accepted)
                    ids = ", ".join(a["job_id"] for a in accepted)
                    text += f" (part {n + 1} of {len(groups)} failed; {done} of " \
                            f"{len(entries)} images were already submitted as job {ids})"
                log.error("%s", text)
                if not e.answered:
                    forget_handoff(base)
                return text, previews, False
    finally:
        if unanswered:
            # The gateway may still be reading these: never write them again.
            drop_segments(used)

    if len(accepted) == 1:
        text = accepted[0].get("message") or \
            f"{PREFIX} Submitted {accepted[0].get('num_images', len(entries))} images to " \
            f"daemon. Job ID: {accepted[0]['job_id']}"
    else:
        total = sum(int(a.get("num_images", 0)) for a in accepted)
        ids = ", ".join(a["job_id"] for a in accepted)
        text = f"{PREFIX} Submitted {total} images to daemon in {len(accepted)} jobs. " \
               f"Job IDs: {ids}"
    log.info("%s (traceparent %s)", text, traceparent)
    return text, previews, True


NODE_CLASS_MAPPINGS = {"LunaDaemonImageSaver": LunaDaemonImageSaver}
NODE_DISPLAY_NAME_MAPPINGS = {"LunaDaemonImageSaver": NODE_NAME}
