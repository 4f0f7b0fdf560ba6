"""`llava-ultra ablate`: row definitions -> config overrides, and a minimal end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ultra.errors import ConfigError
from llava_ultra.recipes.ablate import (
    ROWS,
    AblateOptions,
    check_rows,
    row_config,
    run_ablation,
)


def _cfg(row: str, tmp_path: Path):
    opts = AblateOptions(out=tmp_path, steps1=3, steps2=4)
    return row_config(opts, ROWS[row], 7, tmp_path / "instruct", tmp_path / "run")


def test_rows_give_the_intended_overrides(tmp_path: Path) -> None:
    full = _cfg("full", tmp_path)
    assert full.model.sam.enabled and full.model.selector.mode == "feature+attention"
    assert full.train.stages == [1, 2] and full.train.seed == 7
    assert full.train.stage1.max_steps == 3 and full.train.stage2.max_steps == 4
    assert full.data.stage2 == str(tmp_path / "instruct" / "stage2.train.json")
    assert not _cfg("no_ve", tmp_path).model.sam.enabled
    no_ra = _cfg("no_ra", tmp_path).model.selector
    assert (no_ra.mode, no_ra.none_strategy) == ("none", "random")
    assert _cfg("no_ra_first", tmp_path).model.selector.none_strategy == "first"
    assert _cfg("no_ra_all", tmp_path).model.selector.none_strategy == "all"
    assert _cfg("no_funcb", tmp_path).model.selector.mode == "feature"
    assert _cfg("no_stage2", tmp_path).train.stages == [1]
    assert ROWS["no_site"].site_cue == "without" and ROWS["full"].site_cue == "both"
    # every row differs from the full model in exactly what it names
    base = full.model
    assert _cfg("no_funcb", tmp_path).model.sam == base.sam
    assert _cfg("no_ve", tmp_path).model.selector == base.selector


def test_bad_rows_and_seeds_are_named() -> None:
    with pytest.raises(ConfigError, match="no_such"):
        check_rows(["full", "no_such"])
    assert check_rows(["no_ve", "full", "no_ve"]) == ["full", "no_ve"]


def test_minimal_ablation_end_to_end(tmp_path: Path) -> None:
    opts = AblateOptions(
        out=tmp_path,
        rows=["no_stage2", "full"],
        seeds=[0],
        reports=16,
        steps1=2,
        steps2=2,
        eval_samples=6,
        n_boot=50,
        encoders="random",
    )
    payload = run_ablation(opts, echo=lambda _m: None)
    # no_stage2 reuses the full row's stage-1 checkpoint: one training run only
    assert not (tmp_path / "runs" / "no_stage2-seed0").exists()
    assert payload["runs"]["no_stage2"]["0"]["checkpoint"].endswith("full-seed0/stage1")
    table = payload["table"]
    assert list(table) == ["full", "no_stage2"]
    for entry in table.values():
        f1 = entry["metrics"]["overall.f1"]
        assert 0.0 <= f1["mean"] <= 100.0 and f1["n"] == 6 and len(f1["ci"]) == 2
    assert "overall.f1" in table["no_stage2"]["delta_vs_full"]
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["settings"]["rows"] == ["full", "no_stage2"]
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    lines = [ln for ln in md.splitlines() if ln.startswith("| LLaVA-Ultra full model")]
    # main table, per-type table, selection table, hallucination table, teacher-definitions table
    assert len(lines) == 5 and all(ln.count("|") == lines[0].count("|") for ln in lines[:1])
    variants = table["full"]["teacher_variants"]
    assert set(variants) == {f"teacher_{t}_{h}" for t in ("findings", "diagnosis") for h in ("mass", "peak")}
    assert {"hallucination.chair_i", "hallucination.omission"} <= set(table["full"]["metrics"])
    assert "hallucination.chair_i" in table["no_stage2"]["delta_vs_full"]
    pooled = table["full"]["selector_pooled"]
    assert pooled["ci"][0] <= pooled["rate"] <= pooled["ci"][1] and pooled["n"] > 0
    header = next(ln for ln in md.splitlines() if ln.startswith("| variant | EM"))
    assert md.splitlines()[md.splitlines().index(header) + 1].count("|") == header.count("|")


def test_every_row_is_named_in_the_rows_help() -> None:
    import ast
    import inspect

    from llava_ultra.recipes import ablate

    tree = ast.parse(inspect.getsource(ablate.AblateOptions))
    fields = [n for n in tree.body[0].body if isinstance(n, ast.AnnAssign | ast.Expr)]
    help_text = next(
        fields[i + 1].value.value
        for i, n in enumerate(fields)
        if isinstance(n, ast.AnnAssign) and n.target.id == "rows"
    )
    missing = [k for k in ROWS if k not in help_text]
    assert not missing, f"--rows help does not name {missing}"
