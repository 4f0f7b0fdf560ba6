"""Serving throughput: requests/s, time to first token and latency over real HTTP, for the engine's
batching modes vs one request at a time.

One random-init model (preset `configs/tiny.yaml`, tiny byte-level tokenizer) is served three times
in the same run by the real app under uvicorn on 127.0.0.1: with continuous batching
(`--max-batch-size` slots, default 16; requests join and leave between decode steps), with
micro-batching (up to `--max-batch-size` requests that arrive within `--max-wait-ms` decode
together to the end) and with `max_batch_size=1` (one request at a time, the baseline). For 1, 4
and 16 concurrent clients (threads with their own HTTP connection), each sends streamed requests
of `--frames` 224 px PNG frames (data URLs) + a Chinese question, greedy, `--max-tokens` new tokens,
until `--requests` requests are done. Time to first token (TTFT) is measured in the engine, from
a request's arrival to its first sampled token (the first streamed text chunk can come later: text
that ends in an incomplete character, common with a random-init byte-level model, is held back). Every mode answers the same requests and must give the same answers (checked). Ratios
are to the one-at-a-time server with the same number of clients. Prints JSON; `--write-docs`
rewrites the `serve` section of docs/performance.md (only between `<!-- serve:begin -->` and
`<!-- serve:end -->`).

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

    def send(body: dict) -> tuple[float, str, float]:
        """Latency, answer and time to the first streamed text chunk of one request."""
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=300)
        t0 = time.perf_counter()
        ttft, text = None, []
        with local.http.stream("POST", f"{url}/v1/chat/completions", json=body | {"stream": True}) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[len("data: ") :])["choices"]
                delta = choices[0]["delta"].get("content") if choices else None
                if delta:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(delta)
        latency = time.perf_counter() - t0
        return latency, "".join(text), latency if ttft is None else ttft

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(send, bodies))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    ttfts = sorted(r[2] for r in results)
    return {
        "clients": clients,
        "requests": len(bodies),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(bodies) / wall, 2),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p95_ms": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000, 1),
        "first_text_p50_ms": round(statistics.median(ttfts) * 1000, 1),
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

    modes = {
        "continuous": ("continuous", args.max_batch_size),
        "micro": ("micro", args.max_batch_size),
        "one_at_a_time": ("micro", 1),
    }
    rows, answers = [], {}
    for mode, (batching, batch_size) in modes.items():
        engine = Engine(
            model, tokenizer, max_batch_size=batch_size, max_wait_ms=args.max_wait_ms, batching=batching
        )
        handles = []
        submit = engine.submit

        def recording_submit(prepared, listener, submit=submit, handles=handles):
            handles.append(submit(prepared, listener))
            return handles[-1]

        engine.submit = recording_submit
        with engine, Server(create_app(engine, ServerSettings(model_name="bench"))) as server:
            run_clients(server.url, bodies[:4], 4)  # warm-up
            for clients in args.clients:
                before = dict(engine.stats)
                handles.clear()
                cell = run_clients(server.url, bodies, clients)
                ttft = sorted(h.first_token_at - h.arrived for h in handles)
                cell |= {
                    "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
                    "ttft_p95_ms": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] * 1000, 1),
                }
                answers[(mode, clients)] = cell.pop("answers")
                batches = engine.stats["batches"] - before["batches"]
                steps = engine.stats["steps"] - before["steps"]
                tokens = engine.stats["tokens"] - before["tokens"]
                cell |= {
                    "mode": mode,
                    "max_batch_size": batch_size,
                    # rows per decode step (continuous) or requests per generate call (micro)
                    "mean_batch": round(tokens / steps if steps else len(bodies) / batches, 2),
                }
                rows.append(cell)
                print(json.dumps(cell), flush=True)
    reference = answers[("one_at_a_time", args.clients[0])]
    same = all(a == reference for a in answers.values())

    def cell(mode: str, clients: int) -> dict:
        return next(r for r in rows if r["mode"] == mode and r["clients"] == clients)

    for r in rows:  # ratios to one request at a time, same number of clients
        base = cell("one_at_a_time", r["clients"])
        r["throughput_vs_batch1"] = round(r["requests_per_s"] / base["requests_per_s"], 2)
        r["ttft_vs_batch1"] = round(r["ttft_p50_ms"] / base["ttft_p50_ms"], 2)
    speedup = {
        mode: {c: cell(mode, c)["throughput_vs_batch1"] for c in args.clients}
        for mode in ("continuous", "micro")
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
        "| clients | mode | requests/s | x batch-1 | TTFT p50 (ms) | TTFT / batch-1 | p50 latency (ms) | "
        "p95 latency (ms) | mean batch |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["clients"], r["mode"])):
        lines.append(
            f"| {r['clients']} | {r['mode'].replace('_', ' ')} | {r['requests_per_s']} | "
            f"{r['throughput_vs_batch1']} | {r['ttft_p50_ms']} | {r['ttft_vs_batch1']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['mean_batch']} |"
        )
    speedups = "; ".join(
        f"{mode}: " + ", ".join(f"{c} clients {s}x" for c, s in by_clients.items())
        for mode, by_clients in result["speedup_requests_per_s"].items()
    )
    lines += [
        "",
        f"Requests/s relative to one at a time: {speedups}. Answers identical in all modes: "
        f"{result['answers_identical_across_modes']}. Mean batch: rows per decode step (continuous) or "
        "requests per `generate` call (micro). With one client there is nothing to batch. On this CPU a "
        "decode step's cost grows with its rows and continuous batching prefills each request alone, so "
        "micro-batching is the CPU default; on a GPU a step costs about the same for 1 or 16 rows "
        "(memory-bound) and continuous batching, the CUDA default, lets a request start at the next step "
        "instead of after the running batch (GPU figures: `benchmarks/gpu_suite.py`).",
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
