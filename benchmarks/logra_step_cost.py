"""Cost of the LoGra-Med alignment loss per training step, as a ratio to the step without it.

Same model (tiny preset), same batch, same process: one stage-2 step (forward, backward, optimiser
step) is timed with `out = model(**inputs)` and with `train.logra.aligned_loss` (hidden states out,
the text-only caption pass, the three views, the six matchings, and the head's backward),
alternating the two so that machine load affects both alike. Reports the medians and their ratio.

    .venv/bin/python benchmarks/logra_step_cost.py --batch 8 --repeats 15 [--solver ipfp]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from llava_ultra.config import Config, apply_overrides, from_dict, load_config, to_dict
from llava_ultra.data.instruct import run_instruct
from llava_ultra.data.synth import generate
from llava_ultra.recipes.quickstart import default_config_path, quickstart_synth
from llava_ultra.train import logra, loop
from llava_ultra.train.dataset import Collator, InstructDataset, PixelSource, image_root_for
from llava_ultra.train.schedule import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/logra_bench"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--solver", default="lap")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    instruct = args.data / "instruct"
    if not (instruct / "instruct_meta.json").is_file():
        generate(args.data / "synthus", quickstart_synth(40, 0))
        run_instruct(args.data / "synthus", instruct, seed=0)
    cfg = load_config(
        default_config_path(),
        {
            "data.stage1": str(instruct / "stage1.train.json"),
            "data.stage2": str(instruct / "stage2.train.json"),
            "train.output_dir": str(args.data / "run"),
        },
    )
    over = [
        "train.align_weight=1.0",
        f"train.align.solver={args.solver}",
        f"train.stage2.batch_size={args.batch}",
    ]
    cfg = from_dict(Config, apply_overrides(to_dict(cfg), over))
    tok = loop.resolve_tokenizer(cfg, None)
    mcfg = loop._model_config(cfg, None, tok)
    prepared = loop.prepare_stage_data(cfg, 2, tok, mcfg, log=lambda *_: None)
    model = loop._set_trainable(loop.initial_model(cfg, tok), cfg, 2).train()
    ds = InstructDataset(prepared, image_root_for(cfg.data.stage2), PixelSource(model.image_processor))
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(args.batch)])
    head = logra.build_head(cfg.train, 2, model.llm.config.hidden_size, "cpu").train()
    opt = build_optimizer(model, cfg.train, cfg.train.stage2)
    opt.add_param_group(logra.head_param_group(head, 0.0))

    def plain() -> None:
        model(**batch["inputs"], return_logits=False).loss.backward()  # as the trainer's plain step

    def aligned() -> None:
        logra.aligned_loss(model, head, model.llm, batch["inputs"], batch["extended"])[1].backward()

    times: dict[str, list[float]] = {"plain": [], "aligned": []}
    for i in range(args.repeats + 2):
        for name, fn in (("plain", plain), ("aligned", aligned)):
            t = time.perf_counter()
            fn()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t)
    p, a = statistics.median(times["plain"]), statistics.median(times["aligned"])
    lengths = batch["inputs"]["input_ids"].shape[1], batch["extended"]["input_ids"].shape[1]
    print(
        f"tiny preset, stage 2, batch {args.batch}, sequence {lengths[0]} tokens, captions {lengths[1]} tokens, "
        f"solver {args.solver}, {args.threads} thread(s), {args.repeats} steps each"
    )
    print(f"step without alignment: {p * 1000:.0f} ms (median)")
    print(f"step with alignment:    {a * 1000:.0f} ms (median)")
    print(f"ratio: {a / p:.2f}x")


if __name__ == "__main__":
    main()
