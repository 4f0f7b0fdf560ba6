"""Selection evaluation: how often the frame selector picks a frame the report text describes.

What this file owns: pure functions over (k, validity labels, chosen frame indices) per sample,
giving the selector's hit rate, the rate random choice would get, their difference, all with
bootstrap 95% CIs, overall, on the informative subset, and by k.

Notable choices:
- A sample's hit is the fraction of its chosen frames that are valid (1/0 with top_m = 1). The
  random baseline is valid_count / k: the expected valid fraction of a uniformly random subset of
  any size, so the baseline is right for top_m > 1 and for 'send all frames' too.
- Informative samples have k > 1 and both a valid and an invalid frame: with k = 1, or all frames
  valid, every choice is a hit; with no valid frame every choice misses. Selector and random
  agree on the others, which only pull both rates towards 0 or 1 (both sets are reported).
- Several questions are asked about one report, and selection depends on the frames alone, so
  the same (frames, choice) pair appears once per question. Such repeats are counted once:
  they are not independent draws, and counting them would shrink the intervals.
- `lift` = hit - random per sample, bootstrapped as paired differences: its CI excluding 0 is the
  evidence that the selector beats chance.
- Samples without validity labels or without a recorded selection are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .metrics import bootstrap_ci


@dataclass(frozen=True)
class SelectionCase:
    """One sample's selection: its frames' validity labels and the chosen frame positions."""

    sample_id: str
    valid: tuple[bool, ...]
    """Per frame, whether the report text describes it (len = k)."""
    selected: tuple[int, ...]
    """Positions (0-based, within the sample) of the frames sent to the LLM."""
    frames: tuple[str, ...] = ()
    """Frame identities (image paths) used to count repeated questions on one report once."""

    @property
    def k(self) -> int:
        return len(self.valid)

    @property
    def hit(self) -> float:
        """Fraction of the chosen frames that are valid."""
        return sum(self.valid[i] for i in self.selected) / len(self.selected)

    @property
    def random_rate(self) -> float:
        """Expected valid fraction of a uniformly random choice: valid_count / k."""
        return sum(self.valid) / self.k

    @property
    def informative(self) -> bool:
        """k > 1 with at least one valid and one invalid frame."""
        return self.k > 1 and any(self.valid) and not all(self.valid)


def make_case(
    sample_id: str, valid: Sequence[Any] | None, selected: Sequence[int] | None, frames: Sequence[str] = ()
) -> SelectionCase | None:
    """A checked `SelectionCase`, or None when labels or the selection are missing.

    Raises DataError for an empty selection, an index outside 0..k-1, or frames/labels of
    different lengths (naming the sample).
    """
    if valid is None or selected is None:
        return None
    labels = tuple(bool(v) for v in valid)
    chosen = tuple(int(i) for i in selected)
    if not labels:
        raise DataError(f"sample {sample_id}: empty validity labels; give one label per frame")
    if not chosen:
        raise DataError(f"sample {sample_id}: no frame was selected; the prediction's 'selected' is empty")
    bad = [i for i in chosen if not 0 <= i < len(labels)]
    if bad:
        raise DataError(
            f"sample {sample_id}: selected frame index {bad[0]} is outside 0..{len(labels) - 1} "
            f"({len(labels)} validity labels); the predictions and ground truth disagree on the frames"
        )
    if frames and len(frames) != len(labels):
        raise DataError(
            f"sample {sample_id}: {len(frames)} frames but {len(labels)} validity labels; "
            "give one label per frame"
        )
    return SelectionCase(sample_id, labels, chosen, tuple(frames))


def unique_cases(cases: Iterable[SelectionCase]) -> list[SelectionCase]:
    """Cases with repeated (frames, selection) pairs kept once (first occurrence); cases without
    frame identities are all kept."""
    seen: set[tuple[tuple[str, ...], tuple[int, ...]]] = set()
    out = []
    for case in cases:
        if case.frames:
            key = (case.frames, case.selected)
            if key in seen:
                continue
            seen.add(key)
        out.append(case)
    return out


def rate_summary(cases: Sequence[SelectionCase], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """n, selector rate, random rate and lift (x 100), each with a 95% bootstrap CI (None when
    `n_boot` is 0 or there are no cases)."""
    hits = [c.hit for c in cases]
    rand = [c.random_rate for c in cases]
    lift = [h - r for h, r in zip(hits, rand, strict=True)]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) * 100 if values else None

    def ci(values: list[float]) -> list[float] | None:
        if not values or n_boot <= 0:
            return None
        lo, hi = bootstrap_ci(values, n=n_boot, seed=seed)
        return [lo * 100, hi * 100]

    return {
        "n": len(cases),
        "rate": mean(hits),
        "rate_ci": ci(hits),
        "random_rate": mean(rand),
        "random_rate_ci": ci(rand),
        "lift": mean(lift),
        "lift_ci": ci(lift),
    }


def selection_report(
    cases: Sequence[SelectionCase | None], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """Selector vs random over all labelled samples, the informative subset, and by k.

    `cases` holds one entry per evaluated sample (None where labels or the selection are
    missing). Returns None when no sample has both.
    """
    labelled = [c for c in cases if c is not None]
    if not labelled:
        return None
    unique = unique_cases(labelled)
    by_k: dict[str, Any] = {}
    for k in sorted({c.k for c in unique}):
        group = [c for c in unique if c.k == k]
        by_k[str(k)] = rate_summary(group, n_boot, seed) | {
            "n_informative": sum(c.informative for c in group)
        }
    return {
        "n_samples": len(cases),
        "n_unlabelled": len(cases) - len(labelled),
        "n_repeats_dropped": len(labelled) - len(unique),
        "all": rate_summary(unique, n_boot, seed),
        "informative": rate_summary([c for c in unique if c.informative], n_boot, seed),
        "by_k": by_k,
        "definition": "hit = valid fraction of the chosen frames; random = valid_count / k; "
        "informative = k > 1 with valid and invalid frames; repeated (frames, choice) pairs counted once",
    }
