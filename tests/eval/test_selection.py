"""Golden tests for eval/selection.py on hand-made cases; every expectation is worked out in comments."""

from __future__ import annotations

import pytest

from llava_ultra.errors import DataError
from llava_ultra.eval.selection import SelectionCase, make_case, rate_summary, selection_report, unique_cases


def case(sid, valid, selected, frames=()):
    return make_case(sid, valid, selected, frames)


# (k=1, [T], pick 0) hit 1, random 1, not informative
# (k=3, [T,F,F], pick 0) hit 1, random 1/3, informative
# (k=2, [F,T], pick 0) hit 0, random 1/2, informative
# (k=4, [T,T,T,T], pick 2) hit 1, random 1, not informative (all valid)
CASES = [
    ("a", [True], [0]),
    ("b", [True, False, False], [0]),
    ("c", [False, True], [0]),
    ("d", [True, True, True, True], [2]),
]


def test_case_properties():
    b = case("b", [1, 0, 0], [0])
    assert (b.k, b.hit, b.random_rate, b.informative) == (3, 1.0, 1 / 3, True)
    # top_m = 2 picks frames 0 and 2 of [T, F, T, F]: hit = 2/2; random = 2/4
    two = case("t", [True, False, True, False], [0, 2])
    assert (two.hit, two.random_rate) == (1.0, 0.5)
    # half of the chosen frames valid
    assert case("h", [True, False, True], [0, 1]).hit == 0.5
    # no valid frame at all: every choice misses, and the case is not informative
    none = case("n", [False, False], [1])
    assert (none.hit, none.random_rate, none.informative) == (0.0, 0.0, False)


def test_golden_rates():
    report = selection_report([case(*c) for c in CASES], n_boot=0)
    everything = report["all"]
    assert everything["n"] == 4
    assert everything["rate"] == pytest.approx(75.0)  # (1 + 1 + 0 + 1) / 4
    assert everything["random_rate"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1) / 4 * 100)  # 70.833...
    assert everything["lift"] == pytest.approx(75.0 - 70.8333333, abs=1e-5)
    assert everything["rate_ci"] is None  # n_boot = 0: no intervals
    informative = report["informative"]
    assert informative["n"] == 2  # b and c
    assert informative["rate"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert informative["random_rate"] == pytest.approx((1 / 3 + 1 / 2) / 2 * 100)  # 41.666...
    assert set(report["by_k"]) == {"1", "2", "3", "4"}
    assert report["by_k"]["2"]["rate"] == 0.0 and report["by_k"]["2"]["random_rate"] == 50.0
    assert report["by_k"]["3"]["n_informative"] == 1
    assert report["n_unlabelled"] == 0 and report["n_repeats_dropped"] == 0


def test_bootstrap_intervals_bracket_the_rate():
    # 10 informative cases: selector right in 7, random expectation 1/2 each
    cases = [case(str(i), [True, False], [0 if i < 7 else 1]) for i in range(10)]
    summary = rate_summary(cases, n_boot=500, seed=0)
    assert summary["rate"] == pytest.approx(70.0)
    lo, hi = summary["rate_ci"]
    assert lo < 70.0 < hi and lo >= 0.0 and hi <= 100.0
    # random rate is 50 for every case: a zero-width interval
    assert summary["random_rate_ci"] == [50.0, 50.0]
    assert summary["lift"] == pytest.approx(20.0)


def test_unlabelled_samples_are_counted_not_scored():
    cases = [case("a", [True, False], [0]), case("b", None, [0]), case("c", [True], None)]
    assert cases[1] is None and cases[2] is None
    report = selection_report(cases, n_boot=0)
    assert report["n_samples"] == 3 and report["n_unlabelled"] == 2 and report["all"]["n"] == 1
    assert selection_report([None, None]) is None


def test_repeated_questions_on_the_same_frames_count_once():
    frames = ("f0.png", "f1.png")
    cases = [case("q1", [True, False], [0], frames), case("q2", [True, False], [0], frames)]
    other = case("q3", [True, False], [1], frames)  # same frames, different choice: kept
    kept = unique_cases([*cases, other])
    assert [c.sample_id for c in kept] == ["q1", "q3"]
    report = selection_report([*cases, other], n_boot=0)
    assert report["n_repeats_dropped"] == 1 and report["all"]["rate"] == 50.0


@pytest.mark.parametrize(
    ("valid", "selected", "frames", "message"),
    [
        ([True, False], [2], (), "index 2 is outside 0..1"),
        ([True, False], [], (), "no frame was selected"),
        ([], [0], (), "empty validity labels"),
        ([True, False], [0], ("a.png",), "1 frames but 2 validity labels"),
    ],
)
def test_bad_cases_name_the_sample(valid, selected, frames, message):
    with pytest.raises(DataError, match=message) as err:
        make_case("s7", valid, selected, frames)
    assert "s7" in str(err.value)


def test_selection_case_is_frozen():
    c = SelectionCase("x", (True,), (0,))
    with pytest.raises(AttributeError):
        c.selected = (1,)  # type: ignore[misc]
