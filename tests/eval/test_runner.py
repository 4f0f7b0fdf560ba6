"""eval/runner.py and the eval / score / compare commands, end to end on a tiny random-init model.

The module fixture writes a SynthUS set (12 reports, 64 px), builds its eval samples with
`llava-ultra instruct`, keeps 16 of them with k = 1..4 frames, and saves a tiny model with its
tokenizer. One live evaluation (single-threaded, so its numerics match a process started with
OMP_NUM_THREADS=1) is shared by the tests that read its outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.data.instruct import run_instruct
from llava_ultra.data.synth import SynthConfig, generate
from llava_ultra.errors import CheckpointError, ConfigError, DataError
from llava_ultra.eval.runner import (
    EvalResult,
    EvalSettings,
    plan_batches,
    read_predictions,
    rescore,
    resolve_spec,
    run_eval,
    shard_batches,
)
from llava_ultra.model.checkpoint import load_for_inference, save_pretrained
from tests.helpers import tiny_model, tiny_tokenizer

SETTINGS = {"batch_size": 4, "max_new_tokens": 4, "bootstrap": 100}
RESULT_KEYS = (
    "n",
    "exact_match",
    "f1",
    "bleu",
    "closed_accuracy",
    "sacrebleu",
    "ci",
    "subsets",
    "selection",
    "confusion",
)


@contextlib.contextmanager
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    generate(root / "synth", SynthConfig(reports=12, image_size=64, k_min=1, k_max=4, seed=0))
    run_instruct(root / "synth", root / "inst")
    samples = json.loads((root / "inst" / "eval.train.json").read_text(encoding="utf-8"))
    chosen, seen = [], set()
    for s in samples:  # the first open and closed question of each (report, language), 8 per language
        key = (s["report_id"], s["language"], s["answer_type"])
        if key not in seen and sum(c["language"] == s["language"] for c in chosen) < 8:
            seen.add(key)
            chosen.append(s)
    assert len(chosen) == 16 and {s["language"] for s in chosen} == {"zh", "en"}
    assert len({len(s["images"]) for s in chosen}) > 1, "want several k values"
    (root / "inst" / "eval.mix.json").write_text(json.dumps(chosen, ensure_ascii=False), encoding="utf-8")
    save_pretrained(tiny_model(), root / "ckpt", tiny_tokenizer())
    return root


@pytest.fixture(scope="module")
def live(work):
    with single_thread():
        result = run_eval(
            work / "ckpt", str(work / "inst" / "eval.mix.json"), work / "live", EvalSettings(**SETTINGS)
        )
    return result


def results(scores):
    return {k: scores[k] for k in RESULT_KEYS}


# ------------------------------------------------------------------------------ end to end


def test_eval_writes_predictions_scores_report_and_plots(work, live):
    out = work / "live"
    data = json.loads((work / "inst" / "eval.mix.json").read_text(encoding="utf-8"))
    preds = read_predictions(out / "predictions.jsonl")
    assert [p["question_id"] for p in preds] == [s["id"] for s in data]
    for p, s in zip(preds, data, strict=True):
        assert set(p) >= {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert p["model_id"] == "ckpt" and "<image>" not in p["prompt"]
        assert p["metadata"]["rendered_prompt"].endswith("ASSISTANT:")
        assert p["k"] == len(s["images"]) and len(p["selection_scores"]) == p["k"]
        assert len(p["selected"]) == 1 and 0 <= p["selected"][0] < p["k"]
        assert (p["language"], p["answer_type"], p["site"]) == (s["language"], s["answer_type"], s["site"])
        assert 0 < p["n_new_tokens"] <= SETTINGS["max_new_tokens"]
    assert not (out / "shards").exists()

    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["decoding"]["temperature"] == 0.0 and run["decoding"]["max_new_tokens"] == 4
    assert run["processes"] == 1 and run["n_samples"] == len(data) and run["failed_samples"] == 0

    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert scores["n"] == len(data) and scores["mode"] == "strict"
    assert {"language", "answer_type", "question_type", "site", "k"} <= set(scores["subsets"])
    assert scores["selection"]["all"]["n"] >= 1 and scores["confusion"]["n"] >= 1
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "metric mode: **strict**" in report and f"model: `{work / 'ckpt'}`" in report
    assert "decoding: greedy, max_new_tokens=4, batch_size=4" in report
    for plot in ("subset_language", "subset_k", "closed_confusion", "selection_vs_k"):
        with Image.open(out / "plots" / f"{plot}.png") as im:
            assert im.format == "PNG" and im.width > 100
    assert len((out / "per_sample.jsonl").read_text().splitlines()) == len(data)
    assert "eval ->" in live.render()


def test_rescoring_saved_predictions_equals_the_live_run(work, live):
    again = rescore(
        work / "live" / "predictions.jsonl", str(work / "inst" / "eval.mix.json"), EvalSettings(**SETTINGS)
    )
    assert results(again) == results(live.scores)
    assert again["run"]["model"] == live.run["model"]  # run.json beside the predictions names the model

    res = CliRunner().invoke(
        app,
        [
            "score",
            str(work / "live"),
            f"ultra:{work / 'inst' / 'eval.mix.json'}",
            "--bootstrap",
            "100",
            "--out",
            str(work / "rescored"),
        ],
    )
    assert res.exit_code == 0, res.output
    from_cli = json.loads((work / "rescored" / "scores.json").read_text(encoding="utf-8"))
    assert results(from_cli) == results(live.scores)
    assert (work / "rescored" / "report.md").is_file()


def test_rescoring_perfect_and_empty_answers(work, live, tmp_path):
    preds = read_predictions(work / "live")
    for p in preds:
        p["text"] = p["reference"]
    preds[0]["text"] = ""
    preds[1].pop("text")
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds), encoding="utf-8")
    scores = rescore(path, str(work / "inst" / "eval.mix.json"), EvalSettings(bootstrap=0, plots=False))
    assert scores["n_empty_predictions"] == 2
    n_open = scores["n_open"]
    empty_open = sum(1 for p in preds[:2] if p["answer_type"] == "OPEN")
    assert scores["exact_match"] == pytest.approx((n_open - empty_open) / n_open * 100)
    n_closed = scores["n_closed"]
    assert scores["closed_accuracy"] == pytest.approx((n_closed - (2 - empty_open)) / n_closed * 100)


def test_rescoring_against_other_data_names_the_first_mismatch(work, live, tmp_path):
    with pytest.raises(
        DataError,
        match=r"16 predictions but 22 ground-truth samples: 22 ground-truth sample\(s\) have no prediction, "
        r"first: ground truth \[0\] id='r\d+-\w+-eval-",
    ):
        rescore(work / "live", str(work / "inst" / "eval.val.json"), EvalSettings(bootstrap=0))
    short = tmp_path / "short.jsonl"
    short.write_text(
        "".join((work / "live" / "predictions.jsonl").read_text(encoding="utf-8").splitlines(True)[:5])
    )
    with pytest.raises(
        DataError,
        match=r"5 predictions but 16 ground-truth samples: 11 ground-truth sample\(s\) have no prediction, "
        r"first: ground truth \[5\]",
    ):
        rescore(short, str(work / "inst" / "eval.mix.json"), EvalSettings(bootstrap=0))
    # the same file scores against the first five samples with --limit
    assert rescore(short, str(work / "inst" / "eval.mix.json"), EvalSettings(bootstrap=0, limit=5))["n"] == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "a", "text": "x"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_predictions(bad)


def test_unreadable_image_gives_an_empty_counted_prediction(work, tmp_path):
    data = json.loads((work / "inst" / "eval.mix.json").read_text(encoding="utf-8"))[:3]
    data[1]["images"][0] = "images/missing-frame.png"
    path = work / "inst" / "eval.broken.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    result = run_eval(
        work / "ckpt", str(path), tmp_path / "run", EvalSettings(bootstrap=0, max_new_tokens=2, plots=False)
    )
    preds = read_predictions(tmp_path / "run")
    assert "missing-frame.png does not exist" in preds[1]["error"] and preds[1]["text"] == ""
    assert "error" not in preds[0] and preds[0]["text"] == preds[0]["text"].strip()
    assert result.run["failed_samples"] == 1 and result.run["failed_sample_ids"] == [data[1]["id"]]
    assert result.scores["n_empty_predictions"] >= 1
    assert "images could not be read (empty prediction): 1" in (tmp_path / "run" / "report.md").read_text()


def test_malformed_ground_truth_is_an_error_unless_allowed(work, live, tmp_path):
    data = json.loads((work / "inst" / "eval.mix.json").read_text(encoding="utf-8"))
    bad_id = data[3]["id"]
    data[3].pop("conversations")
    path = work / "inst" / "eval.malformed.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    # 1 of 16 = 6.25% malformed: the default (0) refuses, naming the record and the fix
    with pytest.raises(
        DataError,
        match=r"1 malformed of 16 records \(6\.2%, allowed 0\.0%\); first problem: "
        r".*eval\.malformed\.json record\[3\].*pass --max-bad-fraction 0\.07 to skip",
    ):
        rescore(work / "live", str(path), EvalSettings(bootstrap=0))
    preds = [p for p in read_predictions(work / "live") if p["question_id"] != bad_id]
    pred_path = tmp_path / "predictions.jsonl"
    pred_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds), encoding="utf-8")
    args = ["score", str(pred_path), str(path), "--bootstrap", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "--max-bad-fraction 0.07" in res.output
    res = CliRunner().invoke(app, [*args, "--max-bad-fraction", "0.07"])
    assert res.exit_code == 0, res.output
    assert "ground-truth records skipped as malformed: 1" in res.output
    # re-scoring an eval run that recorded --max-bad-fraction 0.07 skips the same records by itself
    (tmp_path / "run.json").write_text(json.dumps({"settings": {"max_bad_fraction": 0.07}}), encoding="utf-8")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "ground-truth records skipped as malformed: 1" in res.output
    with pytest.raises(ConfigError, match="max_bad_fraction=1.5 must be in"):
        EvalSettings(max_bad_fraction=1.5)
    # the eval command's summary names the skipped count
    assert (
        "skipped 1 malformed ground-truth record(s)"
        in EvalResult(tmp_path, live.scores, {"bad_records": 1}).render()
    )
    assert "skipped" not in live.render()


def test_stale_shards_from_a_crashed_run_are_cleared(work, tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    for r in range(3):  # an earlier 3-process run that crashed before merging
        (out / "shards" / f"rank{r:03d}-of-003.jsonl").write_text('{"index": 0}\n')
    settings = EvalSettings(limit=2, batch_size=2, max_new_tokens=2, bootstrap=0, plots=False)
    run_eval(work / "ckpt", str(work / "inst" / "eval.mix.json"), out, settings)
    assert not (out / "shards").exists() and len(read_predictions(out)) == 2


def test_sampling_is_seeded(work, tmp_path):
    spec = str(work / "inst" / "eval.mix.json")
    settings = EvalSettings(
        temperature=1.5, top_p=0.9, seed=3, limit=4, batch_size=2, max_new_tokens=3, bootstrap=0, plots=False
    )
    run_eval(work / "ckpt", spec, tmp_path / "a", settings)
    run_eval(work / "ckpt", spec, tmp_path / "b", settings)
    assert (tmp_path / "a" / "predictions.jsonl").read_bytes() == (
        tmp_path / "b" / "predictions.jsonl"
    ).read_bytes()
    assert "sampling (temperature=1.5, top_p=0.9, seed=3)" in (tmp_path / "a" / "report.md").read_text()


@pytest.mark.slow
def test_two_process_eval_writes_the_same_predictions(work, live):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "llava_ultra", "eval",
        "--model", str(work / "ckpt"), "--data", str(work / "inst" / "eval.mix.json"), "--out", str(work / "ddp"),
        "--batch-size", "4", "--max-new-tokens", "4", "--bootstrap", "100", "--shard", "strided", "--no-plots",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "ddp" / "predictions.jsonl").read_bytes() == (
        work / "live" / "predictions.jsonl"
    ).read_bytes()
    assert json.loads((work / "ddp" / "run.json").read_text())["processes"] == 2
    assert results(json.loads((work / "ddp" / "scores.json").read_text())) == results(live.scores)


# ------------------------------------------------------------------------------ compare (CLI)


def test_compare_command_prints_and_writes_a_table(work, live, tmp_path):
    table = tmp_path / "table.md"
    res = CliRunner().invoke(
        app,
        [
            "compare",
            str(work / "live"),
            str(work / "live" / "scores.json"),
            "--subset",
            "language",
            "--out",
            str(table),
        ],
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(
        "| run | mode | tokenizer | n | EM | F1 | Precision | Recall | BLEU | BLEU-1 | BLEU-2 | BLEU-3 | Open acc "
        "| Closed acc |"
    )
    assert sum(line.startswith("| live (en)") for line in lines) == 2
    assert table.read_text() == res.output
    res = CliRunner().invoke(app, ["compare", str(work / "live"), "--metrics", "f1,nope"])
    assert res.exit_code == 2 and "unknown metric 'nope'" in res.output


# ------------------------------------------------------------------------------- bad inputs


def test_missing_checkpoint_and_wrong_folders(work, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_inference(tmp_path / "nope")
    run_dir = tmp_path / "run"
    shutil.copytree(work / "ckpt", run_dir / "stage2")
    with pytest.raises(CheckpointError, match="looks like a training run: pass .*stage2"):
        load_for_inference(run_dir)
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(work / "ckpt" / name, no_tok / name)
    with pytest.raises(CheckpointError, match="holds no tokenizer"):
        load_for_inference(no_tok)
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(work / "inst" / "eval.mix.json"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "error: checkpoint folder" in res.output


def test_unknown_spec_and_wrong_layout(work, tmp_path):
    with pytest.raises(DataError, match="unknown dataset scheme 'foo'"):
        run_eval(work / "ckpt", "foo:/data", tmp_path / "o")
    (tmp_path / "slake").mkdir()
    (tmp_path / "slake" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"expected train.json/validate.json/test.json in .*found: notes.txt"):
        run_eval(work / "ckpt", f"slake:{tmp_path / 'slake'}", tmp_path / "o")
    with pytest.raises(DataError, match="bad dataset spec"):
        run_eval(work / "ckpt", str(tmp_path / "missing.json"), tmp_path / "o")


def test_existing_run_needs_overwrite(work, live):
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        run_eval(work / "ckpt", str(work / "inst" / "eval.mix.json"), work / "live")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mode", "loose", "eval mode='loose'"),
        ("batch_size", 0, "batch_size=0 must be >= 1"),
        ("temperature", -1.0, "temperature=-1.0 must be >= 0"),
        ("shard", "random", "shard='random'"),
        ("metric_tokenizer", "spaces", "metric tokenizer 'spaces'"),
        ("limit", 0, "limit=0"),
    ],
)
def test_settings_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EvalSettings(**{field: value})


# ---------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("strategy", ["contiguous", "strided"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_cover_every_batch_once(strategy, world):
    n = 7
    shards = [shard_batches(n, r, world, strategy) for r in range(world)]
    assert sorted(b for s in shards for b in s) == list(range(n))
    if strategy == "contiguous":
        assert all(s == list(range(s[0], s[0] + len(s))) for s in shards if s)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_and_batch_plans():
    assert plan_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert shard_batches(5, 1, 2, "strided") == [1, 3]
    assert shard_batches(5, 0, 2, "contiguous") == [0, 1, 2]
    with pytest.raises(ConfigError, match="rank 2 is outside 0..1"):
        shard_batches(5, 2, 2)


def test_resolve_spec(work):
    path = str(work / "inst" / "eval.mix.json")
    assert resolve_spec(path) == f"ultra:{path}"
    assert resolve_spec("slake:/d/Slake1.0?lang=zh") == "slake:/d/Slake1.0?lang=zh"
    assert resolve_spec("/no/such/file.json") == "/no/such/file.json"  # the reader names the problem
