"""`benchmarks/gpu_suite.py --scale tiny` runs end to end on the CPU (CI keeps the GPU suite alive).

Every section runs at toy sizes with fewer clients and frames than the default, so the test takes
15-30 s on a shared 2-core machine. Besides "it runs", the fp32 run checks what must hold on any
device: the engine's three batching modes give identical answers, our generate agrees with
transformers' Llava generate token for token on shared modules, and the docs section is written
under the CPU smoke-run heading with the device named.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_scale_runs_every_section_on_cpu(tmp_path):
    suite = load_suite()
    docs = tmp_path / "performance.md"
    docs.write_text("# Performance\n\nkept\n", encoding="utf-8")
    threads = torch.get_num_threads()
    try:
        result = suite.main(
            ["--scale", "tiny", "--device", "cpu", "--ks", "1", "2", "--clients", "4", "--requests", "6",
             "--threads", "1", "--json-out", str(tmp_path / "suite.json"), "--write-docs", "--docs", str(docs)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert set(result["section_s"]) == {"decode", "select", "engine", "llava", "train"}
    rows = result["decode"]["rows"]
    assert all(r["ms_per_token"] > 0 for r in rows.values())
    assert result["decode"]["bound_ms_per_token"] > 0
    assert [r["k"] for r in result["select"]["per_report"]] == [1, 2]
    assert result["engine"]["answers_identical"]
    assert set(result["engine"]["cells"]) == {"batch-1", "micro-batching", "continuous batching"}
    assert (
        result["llava"]["tokens_agree"] == f"{result['llava']['new_tokens']}/{result['llava']['new_tokens']}"
    )
    steps = result["train"]["steps"]
    assert steps["live encoders"]["flops_per_step"] > steps["feature cache"]["flops_per_step"] > 0
    assert steps["feature cache"]["mfu"] is None  # no peak FLOP/s for a CPU
    assert json.loads((tmp_path / "suite.json").read_text())["scale"] == "tiny"
    text = docs.read_text(encoding="utf-8")
    assert "kept" in text and "CPU, tiny scale (smoke run; not a performance claim)" in text
    assert result["device"]["name"] in text and text.count("<!-- gpu-suite-tiny:begin -->") == 1
