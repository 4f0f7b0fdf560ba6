"""The two-stage training recipe on accelerate: `train(cfg)` runs stage 1, stage 2, or both.

Stage 1 (concept alignment) trains the projectors and the fusion weight on captions; stage 2
(instruction tuning) trains projectors, fusion, the frame selector and LoRA on the LLM on
conversations. Which components train is `train.stageN.trainable`, applied by
`model/lora.py`. Each stage starts from a checkpoint folder (stage 2 from stage 1's output, also
when chained, so a chained run and two separate runs are the same computation) or, for a fresh
stage 1, from `build_model(cfg.model)`; each ends with a checkpoint folder that eval and serve load.

Order of work, so that bad input fails before any compute:
1. config-level checks: data files exist, `init_from` is a checkpoint, the run folder is free
   (or `--resume` / `--overwrite`);
2. tokenizer + every stage's samples encoded and length-checked (`train/dataset.py`, `model/processor.py`), missing
   images found; only then is a model built or loaded.

Under the hood: one `accelerate.Accelerator` (CPU when there is no CUDA; bf16 autocast on a GPU
that supports it, fp32 on CPU), gradient accumulation through `accelerator.accumulate`,
DDP / FSDP / DeepSpeed from the launcher's config (`configs/accelerate/`), global-norm gradient
clipping, cosine schedule with warm-up (`schedule.py`).

Each stage runs in a `trainer.Trainer` (prepare, resume, step / log / maybe-save, final folder);
resume goes through accelerate's `save_state` / `load_state`, with the trainer's counters and bad
samples registered for checkpointing (see trainer.py). Every checkpoint folder carries a manifest
(sizes and SHA-256, `checkpoint.py`), verified before it is read; `--resume` falls back past
damaged checkpoints, naming each file. A stage's starting folder (`stageN/` of this run, or
`train.init_from`) is verified the same way. Paths recorded inside a run are relative to it, so a
moved run folder resumes.

This module owns the run: checks, tokenizer, data, the accelerator, each stage's starting model,
and the order of stages. What a run starts from (data paths, tokenizer, the fresh model) is in
setup.py, shared with the feature cache.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ModelConfig, StageConfig, to_dict
from ..errors import CheckpointError, ConfigError
from . import checkpoint as ck
from .dataset import (
    Prepared,
    describe_bad,
    image_root_for,
    prepare_samples,
    read_instructions,
)
from .progress import MetricsLog
from .setup import data_path, initial_model, resolve_tokenizer
from .trainer import BadSampleLog, Progress, StageResult, Trainer


@dataclass
class TrainResult:
    run_dir: Path
    stages: list[StageResult]
    main_process: bool = True
    """False on the other processes of a distributed run (they should stay quiet)."""


# ------------------------------------------------------------------------------ setup helpers


def _check_checkpoint(folder: Path, what: str) -> None:
    from ..model.checkpoint import read_model_config

    if not folder.is_dir():
        raise CheckpointError(
            f"{what} {folder} does not exist; run stage 1 first (train.stages: [1]) or point "
            f"train.init_from at a stage-1 output folder"
        )
    read_model_config(folder)  # raises CheckpointError for a foreign folder
    try:  # a damaged folder must not become a silently wrong start
        ck.verify_checkpoint(folder, what)
    except ck.DamagedCheckpoint as exc:
        raise CheckpointError(
            f"{exc}; copy that folder again from where it came from, or point {what} at another checkpoint"
        ) from None


def _init_folder(cfg: Config, out: Path, stage: int) -> Path | None:
    """Where a stage starts from: stage 2 after stage 1 in this run -> out/stage1, else init_from."""
    if stage == 2 and 1 in cfg.train.stages:
        return out / "stage1"
    if cfg.train.init_from is not None:
        return Path(cfg.train.init_from)
    if stage == 2:
        raise ConfigError(
            "train.stages: [2] needs train.init_from pointing at a stage-1 output folder "
            "(e.g. runs/x/stage1); or run both stages with train.stages: [1, 2]"
        )
    return None


def preflight(cfg: Config, out: Path) -> None:
    """Cheap checks of every path the run needs (raise before any compute)."""
    for stage in cfg.train.stages:
        data_path(cfg, stage)
    first = _init_folder(cfg, out, cfg.train.stages[0])
    if first is not None:
        _check_checkpoint(first, "train.init_from")
    if cfg.data.feature_cache is not None:
        from .feature_cache import read_index

        read_index(cfg.data.feature_cache)


def _model_config(cfg: Config, init: Path | None, tokenizer: Any) -> ModelConfig:
    from ..model.checkpoint import read_model_config

    mcfg = read_model_config(init) if init is not None else cfg.model
    if mcfg.image_token_id is None:
        mcfg = dataclasses.replace(mcfg, image_token_id=tokenizer.convert_tokens_to_ids(mcfg.image_token))
    return mcfg


def _max_length(cfg: Config, mcfg: ModelConfig) -> int:
    if cfg.data.max_length is not None:
        return cfg.data.max_length
    inline = mcfg.llm.inline or {}
    if "max_position_embeddings" in inline:
        return int(inline["max_position_embeddings"])
    if mcfg.llm.path is not None:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(mcfg.llm.path).get_text_config().max_position_embeddings)
    return 2048


def _uses_teacher(stage: StageConfig, mcfg: ModelConfig) -> bool:
    return mcfg.selector.mode == "feature+attention" and stage.trainable.get("selector", "frozen") != "frozen"


def prepare_stage_data(cfg: Config, stage: int, tokenizer: Any, mcfg: ModelConfig, log=print) -> Prepared:
    """Read, encode and check one stage's samples; reports every skipped one."""
    path = data_path(cfg, stage)
    scfg = cfg.train.stage(stage)
    prepared = prepare_samples(
        read_instructions(path),
        tokenizer,
        mcfg,
        template=scfg.template,
        image_root=image_root_for(path, cfg.data.image_root),
        max_length=_max_length(cfg, mcfg),
        max_bad_fraction=cfg.data.max_bad_fraction,
        system=cfg.data.system,
        findings_tokens=cfg.data.findings_tokens if _uses_teacher(scfg, mcfg) else 0,
        extended_tokens=_max_length(cfg, mcfg) if stage in cfg.train.aligned_stages() else 0,
        source=f"data.stage{stage} ({path})",
    )
    no_caption = sum(e.extended_ids is not None and not len(e.extended_ids) for e in prepared.encoded)
    if no_caption:
        log(
            f"stage {stage}: {no_caption} of {len(prepared.encoded)} samples have no extended caption "
            f"(no extended_caption field and no site/language to build one); they train without the "
            f"alignment loss"
        )
    if prepared.bad:
        log(
            f"stage {stage}: {len(prepared.bad)} of {prepared.total} samples skipped:\n{describe_bad(prepared.bad)}"
        )
    return prepared


def make_accelerator(cfg: Config) -> Any:
    """The Accelerator: CPU without CUDA (gloo under torchrun), bf16 autocast on a capable GPU."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mp == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision=fp16 does not run on CPU; use 'auto' or 'no' there")
    return Accelerator(
        cpu=not cuda,
        mixed_precision=mp,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)
        ],
    )


# ----------------------------------------------------------------------------- model helpers


def _load_stage_model(cfg: Config, init: Path | None, tokenizer: Any, device: torch.device) -> Any:
    from ..model.checkpoint import load_checkpoint

    if init is None:
        return initial_model(cfg, tokenizer, device)
    try:
        ck.verify_checkpoint(init, "the stage's starting checkpoint")
    except ck.DamagedCheckpoint as exc:
        raise CheckpointError(
            f"{exc}; copy that folder again, or (when this run wrote it) delete it and resume to write it again"
        ) from None
    model, _ = load_checkpoint(init, device=device)
    return model


def _set_trainable(model: Any, cfg: Config, stage: int) -> Any:
    """Apply the stage's trainability (LoRA from an earlier stage is merged first)."""
    from ..model.lora import TrainabilityConfig, apply_trainability, has_lora, merge_lora

    if has_lora(model):
        merge_lora(model)
    tcfg = TrainabilityConfig.from_trainable(cfg.train.stage(stage).trainable, lora=cfg.train.lora)
    torch.manual_seed(cfg.train.seed + 1000 * stage)  # LoRA init: identical on every process
    model = apply_trainability(model, tcfg)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master copies of what trains; frozen weights stay bf16
    return model


def stage_model(cfg: Config, n: int, init: Path | None, tokenizer: Any, device: torch.device) -> Any:
    """The model stage `n` trains: its starting folder (or a fresh model), the stage's trainability,
    the conversation template it is tuned with, gradient checkpointing when configured."""
    model = _set_trainable(_load_stage_model(cfg, init, tokenizer, device), cfg, n)
    template = cfg.train.stage(n).template
    if template != "plain" and model.config.template != template:
        # the checkpoint records the conversation format it was tuned with, so eval / serve /
        # check-images (which default to the recorded template) prompt it the same way
        model.config = dataclasses.replace(model.config, template=template)
    if cfg.train.gradient_checkpointing:
        if hasattr(model.llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.llm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# --------------------------------------------------------------------------------------- main


def train(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Run the configured stages. `stop_after` ends the invocation after that many optimiser steps
    of the current stage without a final save (simulates an interruption; for tests)."""
    out = Path(cfg.train.output_dir)
    config = to_dict(cfg)
    preflight(cfg, out)
    notes: list[str] = []
    resuming = ck.prepare_run_dir(out, config, resume=resume, overwrite=overwrite, notes=notes)

    first_init = _init_folder(cfg, out, cfg.train.stages[0])
    tokenizer = resolve_tokenizer(cfg, first_init)
    mcfg = _model_config(cfg, first_init, tokenizer)

    accelerator = make_accelerator(cfg)
    say = print if accelerator.is_main_process else (lambda *_: None)
    for note in notes:
        say(note)
    prepared = {n: prepare_stage_data(cfg, n, tokenizer, mcfg, log=say) for n in cfg.train.stages}

    # every process has read the run folder (prepare_run_dir) before the main one writes to it; the
    # process group may already exist (a second `train` call), so accelerator creation is no barrier
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not resuming:
        ck.start_run(out, config, overwrite=overwrite)
    elif accelerator.is_main_process:
        ck.repair_run_file(out, config)
    accelerator.wait_for_everyone()
    log = MetricsLog(out, cfg.train.tensorboard) if accelerator.is_main_process else None
    progress, bad = Progress(), BadSampleLog()  # each stage's counters and skipped samples, resumable
    accelerator.register_for_checkpointing(progress, bad)
    results = []
    try:
        for n in cfg.train.stages:
            final = out / f"stage{n}"
            if resuming and final.is_dir():
                try:
                    ck.verify_checkpoint(final, f"stage {n}'s final checkpoint")
                except ck.DamagedCheckpoint as exc:
                    raise CheckpointError(
                        f"{exc}; delete {final} and resume again: stage {n} is then finished again "
                        f"from its last checkpoint in {out / 'checkpoints' / f'stage{n}'}"
                    ) from None
                say(f"stage {n}: already complete in {final}; skipping")
                continue
            for skipped in prepared[n].bad:
                if log is not None:
                    log.event("bad_sample", stage=n, id=skipped.id, kind=skipped.kind, reason=skipped.reason)
            accelerator.free_memory()
            accelerator.gradient_accumulation_steps = cfg.train.stage(n).grad_accum
            model = stage_model(cfg, n, _init_folder(cfg, out, n), tokenizer, accelerator.device)
            trainer = Trainer(cfg, n, out, accelerator, log, model, prepared[n], tokenizer, progress, bad)
            del model
            result = trainer.run(resume=resuming, stop_after=stop_after)
            results.append(result)
            if not result.completed:
                break
            say(
                f"stage {n}: {result.steps} steps in {result.seconds:.1f}s, final loss "
                f"{result.losses[-1] if result.losses else math.nan:.4f} -> {result.folder}"
            )
    finally:
        if log is not None:
            log.close()
    return TrainResult(run_dir=out, stages=results, main_process=accelerator.is_main_process)
