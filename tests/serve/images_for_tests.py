"""Image files for the hardening tests: real encodings from Pillow, and hand-made PNG headers that
declare any size (decompression bombs) without the test having to hold the pixels."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int, idat: bytes | None = None, color_type: int = 2) -> bytes:
    """A PNG whose header says width x height (8-bit; RGB by default) with a tiny IDAT: a bomb when
    large, a truncated image when the IDAT is short."""
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def flat_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A real, complete PNG of one colour (kilobytes on disk, width x height pixels decoded)."""
    return encode(Image.new(mode, (width, height), 90), compress_level=9)


def noisy_png(width: int, height: int, mode: str, target_bytes: int) -> bytes:
    """A real PNG of `mode` whose file size is just below `target_bytes`: flat, with enough rows of
    noise to fill the bytes (noise does not compress)."""
    channels = len(Image.new(mode, (1, 1)).getbands())
    rows = max(1, min(height, target_bytes // (width * channels)))
    rng = np.random.default_rng(0)
    while True:
        pixels = np.zeros((height, width, channels), dtype=np.uint8)
        pixels[:rows] = rng.integers(0, 256, (rows, width, channels), dtype=np.uint8)
        data = encode(
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode), compress_level=1
        )
        if len(data) <= target_bytes:
            return data
        rows = max(1, int(rows * target_bytes / len(data) * 0.98))
