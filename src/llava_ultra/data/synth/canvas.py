"""SynthUS drawing primitives: the echogenicity canvas, the depth-gain map and the noise banks.

Shapes are given in anatomy coordinates (units of image width, y = depth) and painted with soft
edges on the small pixel window they cover, so no shape costs a full-image pass. The noise banks
are cached per process and depend only on (seed, size), which keeps output identical for any
worker count.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .vocab import DEPTH, TOP, Probe


@lru_cache(maxsize=16)
def gain_map(probe: Probe, size: int) -> np.ndarray:
    """Depth attenuation x time-gain compensation, zero outside the scan region: (S, S) float32."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = c[None, :], c[:, None]
    if probe.kind == "linear":
        depth = np.broadcast_to(y - TOP, (size, size))
        inside = (x > 0.08) & (x < 0.92) & (depth > 0) & (depth < DEPTH)
    else:
        depth = np.sqrt((x - 0.5) ** 2 + (y - probe.apex_y) ** 2) - (TOP - probe.apex_y)
        ang = np.degrees(np.arctan2(np.abs(x - 0.5), y - probe.apex_y))
        inside = (depth > 0) & (depth < DEPTH) & (ang < probe.half_angle)
    cm = depth / DEPTH * probe.fov_cm  # depth in cm
    att = np.exp(-0.11 * cm) * (1.0 + 0.09 * cm)  # attenuation partly undone by TGC
    near = 0.8 + 0.2 * np.clip(depth / 0.05, 0, 1)
    return (att * near * inside).astype(np.float32)


def _box_blur(a: np.ndarray, rx: int, ry: int) -> np.ndarray:
    """Wrap-around box blur via cumulative sums (separable, any size)."""
    for axis, r in ((1, rx), (0, ry)):
        if r <= 0:
            continue
        pad = np.concatenate([a.take(range(-r - 1, 0), axis=axis), a, a.take(range(r), axis=axis)], axis=axis)
        cs = np.cumsum(pad, axis=axis, dtype=np.float64)
        n = a.shape[axis]
        hi = cs.take(range(2 * r + 1, 2 * r + 1 + n), axis=axis)
        lo = cs.take(range(0, n), axis=axis)
        a = ((hi - lo) / (2 * r + 1)).astype(np.float32)
    return a


@lru_cache(maxsize=4)
def noise_banks(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-process noise banks (2S x 2S): speckle (mean 1) and low-frequency tissue texture."""
    rng = np.random.default_rng([seed, 0x5EED, size])
    n = 2 * size
    rx = max(1, round(size / 160))
    ray = rng.rayleigh(1.0, size=(n, n)).astype(np.float32)
    spk = _box_blur(ray, rx, max(0, rx // 2))  # speckle is elongated laterally
    spk = spk / spk.mean()
    spk = 1.0 + (spk - 1.0) * (0.45 / spk.std())  # restore Rayleigh-like spread after smoothing
    spk = np.clip(spk, 0.05, None).astype(np.float32)
    low = rng.standard_normal((n, n)).astype(np.float32)
    r = max(2, size // 28)
    low = _box_blur(_box_blur(low, r, r), r, r)
    low = 1.0 + 0.1 * (low - low.mean()) / low.std()
    return spk, low.astype(np.float32)


class Canvas:
    """Echogenicity map of one frame; shapes are given in anatomy coordinates and painted on the
    small pixel window they cover."""

    def __init__(self, size: int, shift: tuple[float, float], probe: Probe, fill: float) -> None:
        self.size = size
        self.dx, self.dy = shift
        self.probe = probe
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.c = c
        self.xa = c - np.float32(self.dx)  # anatomy x of every column
        self.ya = c - np.float32(self.dy)  # anatomy y of every row
        self.e = np.full((size, size), fill, dtype=np.float32)

    def _window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        s = self.size
        c0 = max(0, math.floor((x0 + self.dx) * s))
        c1 = min(s, math.ceil((x1 + self.dx) * s))
        r0 = max(0, math.floor((y0 + self.dy) * s))
        r1 = min(s, math.ceil((y1 + self.dy) * s))
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def _apply(self, win: tuple[slice, slice], m: np.ndarray, value: float, mode: str) -> None:
        e = self.e[win]
        if mode == "paint":
            e += (value - e) * m
        elif mode == "mul":
            e *= 1.0 + (value - 1.0) * m
        else:  # add
            e += value * m

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        value: float,
        mode: str = "paint",
        angle: float = 0.0,
        ring: float | None = None,
        half: str | None = None,
        lobes: tuple[tuple[float, float, float], ...] = (),
        edge_px: float = 1.2,
    ) -> None:
        """Soft ellipse; `ring` keeps only the outer band (thickness in squared-radius units),
        `half` keeps the 'upper' or 'lower' half, `lobes` (amp, freq, phase) make it irregular."""
        r = max(rx, ry) if angle else None
        win = self._window(cx - (r or rx), cx + (r or rx), cy - (r or ry), cy + (r or ry))
        if win is None:
            return
        u = self.xa[win[1]][None, :] - np.float32(cx)
        v = self.ya[win[0]][:, None] - np.float32(cy)
        if angle:
            ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            u, v = u * ca + v * sa, v * ca - u * sa
        rr = (u / rx) ** 2 + (v / ry) ** 2
        if lobes:
            theta = np.arctan2(v / ry, u / rx)
            shrink = 1.0 - sum(a * (1.0 + np.cos(f * theta + p)) / 2 for a, f, p in lobes)
            rr = rr / shrink**2
        e = min(0.6, 2 * edge_px / (min(rx, ry) * self.size))
        m = np.clip((1.0 - rr) / e, 0.0, 1.0)
        if ring is not None:
            m *= np.clip((rr - (1.0 - ring)) / e, 0.0, 1.0)
        if half == "upper":
            m *= v < 0
        elif half == "lower":
            m *= v > 0
        self._apply(win, m, value, mode)

    def band(
        self, y0: float, y1: float, value: float, amp: float = 0.0, freq: float = 1.0, phase: float = 0.0
    ) -> None:
        """Horizontal layer between two wavy boundaries, full width."""
        win = self._window(-1.0, 2.0, y0 - amp, y1 + amp)
        if win is None:
            return
        x = self.xa[None, :]
        y = self.ya[win[0]][:, None]
        wave = np.float32(amp) * np.sin(np.float32(2 * math.pi * freq) * x + np.float32(phase))
        s = np.float32(self.size / 1.5)
        m = np.clip((y - y0 - wave) * s, 0, 1) * np.clip((y1 + wave * 0.7 - y) * s, 0, 1)
        self._apply(win, m, value, "paint")

    def posterior(
        self, cx: float, cy: float, half_w: float, factor: float, fade: float | None = None
    ) -> None:
        """Multiply by `factor` behind a point (shadow < 1 < enhancement) along the scan lines:
        straight down for a linear probe, along rays from the fan apex for a sector probe."""
        s = self.size
        ix, iy = cx + self.dx, cy + self.dy
        r0 = max(0, math.floor(iy * s))
        if r0 >= s:
            return
        apex = self.probe.apex_y
        if self.probe.kind == "linear":
            c0, c1 = max(0, math.floor((ix - half_w) * s) - 1), min(s, math.ceil((ix + half_w) * s) + 1)
            if c0 >= c1:
                return
            d_px = (half_w - np.abs(self.c[c0:c1][None, :] - ix)) * s
            d_px = np.broadcast_to(d_px, (s - r0, c1 - c0))
        else:
            dep = max(iy - apex, 1e-3)
            lat_c, lat_w = (ix - 0.5) / dep, half_w / dep
            xs = [0.5 + (lat_c + sgn * lat_w) * (yy - apex) for sgn in (-1, 1) for yy in (iy, 1.0)]
            c0, c1 = max(0, math.floor(min(xs) * s) - 1), min(s, math.ceil(max(xs) * s) + 1)
            if c0 >= c1:
                return
            yd = self.c[r0:, None] - apex
            lat = (self.c[None, c0:c1] - 0.5) / yd
            d_px = (lat_w - np.abs(lat - lat_c)) * yd * s
        m = np.clip(d_px / 1.5 + 0.5, 0.0, 1.0)
        if fade is not None:
            m = m * np.exp(-(self.c[r0:, None] - iy) / fade)
        self._apply((slice(r0, s), slice(c0, c1)), m, factor, "mul")

    def shadow_column(self, cx: float, y0: float, half_w: float, factor: float) -> None:
        """Anatomical shadow in anatomy coordinates (linear-probe sites only)."""
        win = self._window(cx - half_w, cx + half_w, y0, 2.0)
        if win is None:
            return
        d = (half_w - np.abs(self.xa[win[1]][None, :] - cx)) * self.size
        m = np.broadcast_to(np.clip(d / 1.5, 0, 1), (win[0].stop - win[0].start, win[1].stop - win[1].start))
        self._apply(win, m, factor, "mul")
