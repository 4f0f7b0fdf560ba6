"""Turning image references from requests into checked PIL images.

Accepted: `data:image/<type>;base64,<data>` URLs always; `http(s)://` URLs only when the server
was started with `--allow-remote-images` and the host is on the allow-list; `file://` URLs only
under a folder given with `--allowed-image-dir`. Everything else is refused with a `RequestError`
that says what to send instead. The byte limit is checked before decoding, the pixel limit from
the header before the pixels are decoded (no decompression bombs), and the whole file is then
decoded so that truncated data fails here, with a message, rather than inside the model.
Remote fetches do not follow redirects (a redirect could leave the allow-list) and read at most
`max_image_bytes + 1` bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .engine import Limits, RequestError


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
    """Encoded image bytes -> RGB PIL image, within the limits."""
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            f"{where} is {len(data)} bytes, above this server's limit of {limits.max_image_bytes} bytes; "
            f"send a smaller (downscaled or JPEG) image",
            param=where,
            code="image_too_large",
        )
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
    except Exception as exc:  # PIL raises many exception types on foreign or damaged data
        raise RequestError(
            f"{where} is not a readable image ({type(exc).__name__}: {exc}); send PNG, JPEG, BMP, TIFF "
            f"or another format Pillow reads",
            param=where,
            code="invalid_image",
        ) from exc
    if w * h > limits.max_image_pixels:
        raise RequestError(
            f"{where} is {w}x{h} = {w * h} pixels, above this server's limit of {limits.max_image_pixels}; "
            f"downscale it",
            param=where,
            code="image_too_large",
        )
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:
        raise RequestError(
            f"{where} could not be decoded ({type(exc).__name__}: {exc}); the file is damaged or "
            f"truncated - send the complete image",
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
            f"{where} is a data URL of type {mime or 'text/plain'!r}, not an image; send an image "
            f"(data:image/png;base64,... or data:image/jpeg;base64,...)",
            param=where,
            code="invalid_image_url",
        )
    if "base64" not in [f.strip().lower() for f in fields[1:]]:
        raise RequestError(
            f"{where} is not base64-encoded; use data:{mime};base64,<data>",
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
            f"{where} has invalid or truncated base64 data ({exc}); send the whole file base64-encoded",
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
            f"add {host!r} with --allowed-hosts"
            if policy.allow_remote
            else "send the image inline as a data: URL (base64), or start the server with "
            "--allow-remote-images --allowed-hosts HOST"
        )
        raise RequestError(
            f"{where}: remote image URLs (host {host!r}) are not allowed on this server; {hint}",
            param=where,
            code="remote_images_disabled",
        )
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=policy.timeout_s) as response:
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RequestError(
            f"{where}: fetching {url} failed ({exc}); check the URL or send the image inline",
            param=where,
            code="image_fetch_failed",
        ) from exc
    return data


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
    """Bytes of an image file, with clear errors for missing or oversized files."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise RequestError(
                f"{where} ({path}) is {size} bytes, above the limit of {limits.max_image_bytes} bytes; "
                f"downscale it",
                param=where,
                code="image_too_large",
            )
        return path.read_bytes()
    except OSError as exc:
        raise RequestError(
            f"{where}: cannot read {path} ({exc.strerror or exc}); check the path",
            param=where,
            code="image_not_found",
        ) from exc


def load_image_url(url: str, limits: Limits, policy: ImagePolicy, where: str) -> Image.Image:
    """An image_url from a request -> image (data URLs always; others by policy)."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where} is empty; give a data:image/...;base64 URL", param=where)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, limits, where)
    if scheme in ("http", "https"):
        return decode_image(_fetch(url, limits, policy, where), limits, where)
    if scheme == "file":
        return decode_image(_read_file(url, limits, policy, where), limits, where)
    raise RequestError(
        f"{where} has an unsupported URL scheme {scheme or url[:20]!r}; send data:image/png;base64,<data>",
        param=where,
        code="invalid_image_url",
    )


def load_image_path(path: str | Path, limits: Limits, where: str) -> Image.Image:
    """A local image file (CLI chat, predict) -> image, within the limits."""
    return decode_image(read_image_file(path, limits, where), limits, where)
