"""CLI commands `chat` (driven through stdin), `predict` (with bad lines) and `serve` (the real
command in a subprocess, talked to with the openai client, then stopped)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.serve.engine import Message, SamplingParams
from tests.serve.conftest import frames


def test_chat_reads_stdin_streams_answers_and_handles_commands(checkpoint, engine, tmp_path):
    paths = []
    for i, image in enumerate(frames(3, seed=41)):
        paths.append(tmp_path / f"f{i}.png")
        image.save(paths[-1])
    script = "\n".join(
        [
            "胆囊内可见什么？",
            f"/image {paths[2]}",
            f"/image {tmp_path / 'missing.png'}",
            "And now?",
            "/frobnicate",
            "/reset",
            "third question",
            "/exit",
            "never asked",
        ]
    )
    args = ["chat", str(checkpoint), "--image", str(paths[0]), "--image", str(paths[1]), "--max-tokens", "6"]
    result = CliRunner().invoke(app, args, input=script + "\n")
    assert result.exit_code == 0, result.output
    out = result.output
    first = engine.generate(
        [Message("user", "胆囊内可见什么？", frames(2, seed=41))], SamplingParams(max_tokens=6)
    )
    assert first.text in out
    assert f"[frame {first.selection.chosen[0] + 1} of 2 chosen, score" in out
    assert "of 3 chosen" in out  # the second turn sees both earlier frames and the new one
    assert "error: image " in out and "missing.png" in out and "check the path" in out
    assert "unknown command '/frobnicate'" in out
    assert "[new conversation]" in out
    third = engine.generate([Message("user", "third question")], SamplingParams(max_tokens=6))
    assert out.rstrip().endswith(third.text.rstrip())  # text-only after /reset; nothing after /exit


def test_predict_answers_good_lines_and_counts_bad_ones(checkpoint, engine, tmp_path):
    for i, image in enumerate(frames(2, seed=51)):
        image.save(tmp_path / f"f{i}.png")
    lines = [
        json.dumps(
            {"id": "a", "images": ["f0.png", "f1.png"], "question": "胆囊内可见什么？"}, ensure_ascii=False
        ),
        "{not json",
        json.dumps({"id": "b", "images": ["nope.png"], "question": "q"}),
        "",
        json.dumps({"id": 7, "messages": [{"role": "user", "content": "Liver size?"}], "max_tokens": 3}),
        json.dumps({"id": "a", "question": "repeat"}),
    ]
    data = tmp_path / "requests.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "answers.jsonl"
    args = ["predict", str(checkpoint), "--data", str(data), "--out", str(out), "--max-tokens", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # 3 of 5 lines bad > 10% allowed; the rest is still written
    assert "2 of 5 requests answered" in result.output
    assert "line 2: not valid JSON" in result.output
    assert "line 3: image nope.png" in result.output
    assert "line 6: id 'a' repeats line 1" in result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "7"]
    expected = engine.generate(
        [Message("user", "胆囊内可见什么？", frames(2, seed=51))], SamplingParams(max_tokens=5)
    )
    assert rows[0]["answer"] == expected.text
    assert rows[0]["selection"]["chosen"] == expected.selection.chosen
    assert rows[1]["completion_tokens"] <= 3 and rows[1]["selection"] is None
    ok = CliRunner().invoke(app, [*args, "--max-bad-fraction", "0.6"])
    assert ok.exit_code == 0, ok.output


def test_serve_command_runs_a_real_server(checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from llava_ultra.cli import app; app()", "serve", str(checkpoint)]
    cmd += ["--port", str(port), "--api-key", "k", "--max-batch-size", "2", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        resp = client.chat.completions.create(
            model=checkpoint.name, messages=[{"role": "user", "content": "hello"}], max_tokens=3
        )
        assert resp.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read()


def test_check_images_passes_a_seeing_checkpoint_and_fails_a_blind_one(checkpoint, tmp_path):
    """`llava-ultra check-images`: exit 0 when the output depends on the images, 1 (with the fix
    named) when a zeroed projector makes the model blind; an unreadable image is a clear error."""
    import torch

    from llava_ultra.model.checkpoint import load_for_inference, save_pretrained
    from tests.helpers import tiny_tokenizer

    paths = []
    for i, image in enumerate(frames(2, seed=5)):
        paths.append(tmp_path / f"f{i}.png")
        image.save(paths[-1])
    args = [a for p in paths for a in ("--image", str(p))] + ["--max-tokens", "4", "--device", "cpu"]
    seeing = CliRunner().invoke(app, ["check-images", str(checkpoint), *args])
    assert seeing.exit_code == 0, seeing.output
    assert "OK: the output depends on the images" in seeing.output

    model, _ = load_for_inference(checkpoint, device="cpu")
    with torch.no_grad():  # what a projector that failed to load looks like: constant visual tokens
        for projector in (model.fusion.clip_projector, getattr(model.fusion, "sam_projector", None)):
            if projector is not None:
                for p in projector.parameters():
                    p.zero_()
    blind_dir = tmp_path / "blind"
    save_pretrained(model, blind_dir, tiny_tokenizer())
    blind = CliRunner().invoke(app, ["check-images", str(blind_dir), *args])
    assert blind.exit_code == 1, blind.output
    assert "does not change" in blind.output and "projector" in blind.output

    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = CliRunner().invoke(
        app, ["check-images", str(checkpoint), "--image", str(tmp_path / "broken.png")]
    )
    assert broken.exit_code != 0 and "cannot read image" in broken.output and "broken.png" in broken.output
