"""Serving throughput: requests/s and p50/p95 latency over real HTTP, batched engine vs one at a time.

One random-init model (preset `configs/tiny.yaml`, tiny byte-level tokenizer) is served twice in
the same run by the real app under uvicorn on 127.0.0.1: with dynamic micro-batching
(`--max-batch-size`, default 16) and with `max_batch_size=1` (one request at a time, the baseline).
For 1, 4 and 16 concurrent clients (threads with their own HTTP connection), each sends requests
of `--frames` 224 px PNG frames (data URLs) + a Chinese question, greedy, `--max-tokens` new tokens,
until `--requests` requests are done. Both modes answer the same requests and must give the same
answers (checked). Prints JSON; `--write-docs` rewrites the `serve` section of docs/performance.md
(only between `<!-- serve:begin -->` and `<!-- serve:end -->`).

    python benchmarks/serve_throughput.py [--requests 48] [--max-tokens 16] [--write-docs]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from llava_ultra.config import load_config
from llava_ultra.model.tokenizer import build_tiny_tokenizer
from llava_ultra.model.ultra import build_model
from llava_ultra.serve.app import ServerSettings, create_app
from llava_ultra.serve.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- serve:begin -->", "<!-- serve:end -->"
TEXTS = [
    "肝脏大小正常，形态规则，包膜光滑，实质回声均匀。",
    "胆囊内见一强回声团，后方伴声影，随体位改变移动。",
    "甲状腺右叶见一低回声结节，边界清，形态规则。",
    "The liver is normal in size with a smooth capsule and homogeneous echotexture.",
    "USER: What is the examination site? ASSISTANT: Liver ultrasound.",
]
QUESTIONS = [
    "胆囊内可见什么？",
    "甲状腺结节的边界清楚吗？",
    "Is the liver normal in size?",
    "请描述超声所见。",
]


def frame_url(seed: int, size: int = 224) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    """uvicorn on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def run_clients(url: str, bodies: list[dict], clients: int) -> dict:
    """Send every body with `clients` concurrent clients; latency per request and the wall time."""
    local = threading.local()

    def send(body: dict) -> tuple[float, str]:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=300)
        t0 = time.perf_counter()
        resp = local.http.post(f"{url}/v1/chat/completions", json=body)
        resp.raise_for_status()
        return time.perf_counter() - t0, resp.json()["choices"][0]["message"]["content"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(send, bodies))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests": len(bodies),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(bodies) / wall, 2),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p95_ms": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000, 1),
        "answers": [r[1] for r in results],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--requests", type=int, default=48, help="requests per (mode, clients) cell")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--frames", type=int, default=2, help="frames per request")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = build_tiny_tokenizer(TEXTS * 8, vocab_size=1024)
    torch.manual_seed(0)
    model = build_model(load_config(args.preset).model, tokenizer).eval()
    urls = [frame_url(i) for i in range(8)]
    bodies = []
    for i in range(args.requests):
        parts = [
            {"type": "image_url", "image_url": {"url": urls[(i + j) % len(urls)]}} for j in range(args.frames)
        ]
        parts.append({"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]})
        bodies.append(
            {
                "model": "bench",
                "messages": [{"role": "user", "content": parts}],
                "max_tokens": args.max_tokens,
            }
        )

    modes = {"batched": args.max_batch_size, "one_at_a_time": 1}
    rows, answers = [], {}
    for mode, batch_size in modes.items():
        engine = Engine(model, tokenizer, max_batch_size=batch_size, max_wait_ms=args.max_wait_ms)
        with engine, Server(create_app(engine, ServerSettings(model_name="bench"))) as server:
            run_clients(server.url, bodies[:4], 4)  # warm-up
            for clients in args.clients:
                before = dict(engine.stats)
                cell = run_clients(server.url, bodies, clients)
                answers[(mode, clients)] = cell.pop("answers")
                batches = engine.stats["batches"] - before["batches"]
                cell |= {
                    "mode": mode,
                    "max_batch_size": batch_size,
                    "mean_batch": round(len(bodies) / batches, 2),
                }
                rows.append(cell)
                print(json.dumps(cell), flush=True)
    reference = answers[("one_at_a_time", args.clients[0])]
    same = all(a == reference for a in answers.values())
    speedup = {
        c: round(
            next(r for r in rows if r["mode"] == "batched" and r["clients"] == c)["requests_per_s"]
            / next(r for r in rows if r["mode"] == "one_at_a_time" and r["clients"] == c)["requests_per_s"],
            2,
        )
        for c in args.clients
    }
    result = {
        "preset": str(args.preset.relative_to(ROOT) if args.preset.is_relative_to(ROOT) else args.preset),
        "frames_per_request": args.frames,
        "max_tokens": args.max_tokens,
        "requests_per_cell": args.requests,
        "torch_threads": args.threads,
        "answers_identical_across_modes": same,
        "speedup_requests_per_s": speedup,
        "rows": rows,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.write_docs:
        write_docs(result, argv)
    if not same:
        raise SystemExit("answers differ between batched and one-at-a-time serving")
    return result


def write_docs(result: dict, argv: list[str] | None) -> None:
    cmd = " ".join(["python benchmarks/serve_throughput.py", *(argv or [])])
    lines = [
        BEGIN,
        "## Serving throughput (`benchmarks/serve_throughput.py`)",
        "",
        f"`{cmd}` - preset `{result['preset']}` (random init), {result['frames_per_request']} PNG frames of "
        f"224 px per request + a question, greedy, {result['max_tokens']} new tokens, "
        f"{result['requests_per_cell']} requests per cell, real HTTP through uvicorn on 127.0.0.1, "
        f"{result['torch_threads']} torch thread(s), shared 2-core CPU; Python {result['python']}, "
        f"torch {result['torch']}. Baseline: the same server with `--max-batch-size 1`, same model, same run.",
        "",
        "| clients | mode | requests/s | p50 latency (ms) | p95 latency (ms) | mean batch |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["clients"], r["mode"])):
        lines.append(
            f"| {r['clients']} | {r['mode'].replace('_', ' ')} | {r['requests_per_s']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['mean_batch']} |"
        )
    speedups = ", ".join(f"{c} clients {s}x" for c, s in result["speedup_requests_per_s"].items())
    lines += [
        "",
        f"Batched / one-at-a-time requests/s: {speedups}. Answers identical in both modes: "
        f"{result['answers_identical_across_modes']}. With one client there is nothing to batch; with "
        "more, requests arriving within `--max-wait-ms` share one prefill and one decoding loop, so "
        "throughput grows while each step costs little more than a single request's step.",
        END,
    ]
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Performance\n"
    section = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
