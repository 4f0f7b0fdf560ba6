"""Turning image references from requests into checked PIL images.

Accepted: `data:image/<type>;base64,<data>` URLs always; `http(s)://` URLs only when the server
was started with `--allow-remote-images` and the host is on the allow-list; `file://` URLs only
under a folder given with `--allowed-image-dir`. Everything else is refused with a `RequestError`
that says what to send instead. The byte limit is checked before decoding, the pixel and
aspect-ratio limits from the header before the pixels are decoded (no decompression bombs, no
65536x256 strips), and the whole file is then decoded so that truncated data fails here, with a
message, rather than inside the model. An image whose longer side exceeds `max_image_side` is
downscaled right after decoding (JPEGs already while decoding, via Pillow's draft mode), so the
square canvas the model pads it to stays within `max_image_side`^2.

Only raster formats with plain decoders are opened (`IMAGE_FORMATS`; no EPS, which would start
Ghostscript), and PNG text/ICC chunks are capped at 256 KiB each, 1 MiB per image (Pillow's
defaults, 1 MiB and 64 MiB, are process-wide settings this module lowers on import).
Remote fetches do not follow redirects (a redirect could leave the allow-list) and read at most
`max_image_bytes + 1` bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

from .engine import Limits, RequestError, check_image_shape, clip_text, fit_image, fitted_size

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM")
"""Formats the server decodes; others are refused as unreadable."""
Image.init()  # register every plugin now: `Image.open(formats=...)` looks the names up
PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, 256 * 2**10)
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 2**20)


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from besides inline data URLs."""

    allow_remote: bool = False
    """Fetch http(s):// URLs (only from `allowed_hosts`)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names allowed for remote fetches ('*' = any host)."""
    allowed_dirs: tuple[Path, ...] = ()
    """Folders whose files may be named by file:// URLs."""
    timeout_s: float = 10.0
    """Timeout of one remote fetch."""


def decode_image(data: bytes, limits: Limits, where: str) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, within the limits (longer side <= max_image_side)."""
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            f"{where} is {len(data)} bytes, above this server's limit of {limits.max_image_bytes} bytes; "
            f"send a smaller (downscaled or JPEG) image",
            param=where,
            code="image_too_large",
        )
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        w, h = image.size
    except Image.DecompressionBombError as exc:
        raise RequestError(
            f"{where} declares too many pixels ({exc}); this server's limit is {limits.max_image_pixels}",
            param=where,
            code="image_too_large",
        ) from exc
    except Exception as exc:  # PIL raises many exception types on foreign or damaged data
        raise RequestError(
            f"{where} is not a readable image ({type(exc).__name__}: {clip_text(str(exc), 120)}); send "
            f"PNG, JPEG, BMP, GIF, TIFF or WebP",
            param=where,
            code="invalid_image",
        ) from exc
    check_image_shape(w, h, limits, where)
    try:
        target = fitted_size(w, h, limits)
        if target != (w, h) and image.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEG
            image.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale, never below target
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
        return fit_image(image, limits)
    except Exception as exc:
        raise RequestError(
            f"{where} could not be decoded ({type(exc).__name__}: {clip_text(str(exc), 120)}); the file "
            f"is damaged or truncated - send the complete image",
            param=where,
            code="invalid_image",
        ) from exc


def decode_data_url(url: str, limits: Limits, where: str) -> Image.Image:
    """`data:image/png;base64,...` -> image."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise RequestError(
            f"{where} is a data URL without a ',' before its data; use data:image/png;base64,<data>",
            param=where,
            code="invalid_image_url",
        )
    fields = header[len("data:") :].split(";")
    mime = fields[0].strip().lower()
    if not mime.startswith("image/"):
        raise RequestError(
            f"{where} is a data URL of type '{clip_text(mime or 'text/plain')}', not an image; send an image "
            f"(data:image/png;base64,... or data:image/jpeg;base64,...)",
            param=where,
            code="invalid_image_url",
        )
    if "base64" not in [f.strip().lower() for f in fields[1:]]:
        raise RequestError(
            f"{where} is not base64-encoded; use data:{clip_text(mime)};base64,<data>",
            param=where,
            code="invalid_image_url",
        )
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(
            f"{where} holds about {len(payload) * 3 // 4} bytes, above this server's limit of "
            f"{limits.max_image_bytes} bytes; send a smaller image",
            param=where,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            f"{where} has invalid or truncated base64 data ({clip_text(str(exc), 120)}); send the whole "
            f"file base64-encoded",
            param=where,
            code="invalid_image_url",
        ) from exc
    return decode_image(data, limits, where)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


def _fetch(url: str, limits: Limits, policy: ImagePolicy, where: str) -> bytes:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    allowed = {h.lower() for h in policy.allowed_hosts}
    if not policy.allow_remote or not ("*" in allowed or host in allowed):
        hint = (
            f"add '{clip_text(host)}' with --allowed-hosts"
            if policy.allow_remote
            else "send the image inline as a data: URL (base64), or start the server with "
            "--allow-remote-images --allowed-hosts HOST"
        )
        raise RequestError(
            f"{where}: remote image URLs (host '{clip_text(host)}') are not allowed on this server; {hint}",
            param=where,
            code="remote_images_disabled",
        )
    opener = urllib.request.build_opener(_NoRedirect)
    deadline = time.monotonic() + policy.timeout_s
    chunks, size = [], 0
    try:
        with opener.open(url, timeout=policy.timeout_s) as response:
            while size <= limits.max_image_bytes:  # a slow drip must not hold a thread forever
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the download took more than {policy.timeout_s:g} s")
                chunk = response.read(min(2**16, limits.max_image_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except Exception as exc:  # URLError, HTTPError, InvalidURL, IncompleteRead, timeouts, ...
        raise RequestError(
            f"{where}: fetching {clip_text(url, 200)} failed ({clip_text(str(exc), 200)}); check the URL or "
            f"send the image inline",
            param=where,
            code="image_fetch_failed",
        ) from exc
    return b"".join(chunks)


def _read_file(url: str, limits: Limits, policy: ImagePolicy, where: str) -> bytes:
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
    roots = [Path(d).resolve() for d in policy.allowed_dirs]
    if not any(path.is_relative_to(root) for root in roots):
        raise RequestError(
            f"{where}: file:// image URLs are not allowed here; send the image inline as a data: URL, or "
            f"start the server with --allowed-image-dir pointing at the folder that holds it",
            param=where,
            code="file_images_disabled",
        )
    return read_image_file(path, limits, where)


def read_image_file(path: str | Path, limits: Limits, where: str) -> bytes:
    """Bytes of an image file, with clear errors for missing, special or oversized files."""
    path = Path(path)
    too_large = RequestError(
        f"{where} ({clip_text(str(path), 200)}) is above the limit of {limits.max_image_bytes} bytes; "
        f"downscale it",
        param=where,
        code="image_too_large",
    )
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block or never end
            raise RequestError(
                f"{where}: {clip_text(str(path), 200)} is not a regular file; name an image file",
                param=where,
                code="image_not_found",
            )
        if path.stat().st_size > limits.max_image_bytes:
            raise too_large
        with path.open("rb") as f:
            data = f.read(limits.max_image_bytes + 1)
        if len(data) > limits.max_image_bytes:
            raise too_large
        return data
    except (OSError, ValueError) as exc:
        raise RequestError(
            f"{where}: cannot read {clip_text(str(path), 200)} ({clip_text(str(getattr(exc, 'strerror', None) or exc), 200)}); "
            f"check the path",
            param=where,
            code="image_not_found",
        ) from exc


def load_image_url(url: str, limits: Limits, policy: ImagePolicy, where: str) -> Image.Image:
    """An image_url from a request -> image (data URLs always; others by policy)."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where} is empty; give a data:image/...;base64 URL", param=where)
    try:
        return _load_image_url(url, limits, policy, where)
    except RequestError:
        raise
    except ValueError as exc:  # malformed URLs: bad IPv6 brackets, NUL characters in a path, ...
        raise RequestError(
            f"{where} is not a valid URL ({clip_text(str(exc), 120)}); send data:image/png;base64,<data>",
            param=where,
            code="invalid_image_url",
        ) from exc


def _load_image_url(url: str, limits: Limits, policy: ImagePolicy, where: str) -> Image.Image:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, limits, where)
    if scheme in ("http", "https"):
        return decode_image(_fetch(url, limits, policy, where), limits, where)
    if scheme == "file":
        return decode_image(_read_file(url, limits, policy, where), limits, where)
    raise RequestError(
        f"{where} has an unsupported URL scheme '{clip_text(scheme or url[:20], 30)}'; send "
        f"data:image/png;base64,<data>",
        param=where,
        code="invalid_image_url",
    )


def load_image_path(path: str | Path, limits: Limits, where: str) -> Image.Image:
    """A local image file (CLI chat, predict) -> image, within the limits."""
    return decode_image(read_image_file(path, limits, where), limits, where)
