"""One training stage on accelerate, read top to bottom: `Trainer(...).run()` prepares, resumes, then
repeats step -> log -> maybe save until the stage's last step, and writes the stage's final folder.

Resume goes through accelerate: `accelerator.save_state` / `load_state` write and read the
trainables, the optimiser (under DeepSpeed: its partitioned engine state, Adam moments included;
under FSDP: the sharded optimiser through torch.distributed.checkpoint), the scheduler, every
process's RNG states and the objects registered with `accelerator.register_for_checkpointing`:
the trainer's counters (`Progress`) and the list of bad samples met so far (`BadSampleLog`). The
sampler is ours (`ShardedBatchSampler`); the counters say where it resumes (epoch, batches done),
and it skips the batches already seen without loading them. So a resumed run reaches the same
weights as an uninterrupted one (tested on CPU, single process and 2-process DDP).

Notable choices:
- Only trainable weights go into a resumable checkpoint: a save-state hook trims the model's state
  dict to them (the frozen rest is rebuilt from the stage's start, as before), and a load-state hook
  loads them back strictly (missing or unexpected names are an error naming both) and the LoGra-Med
  head beside them (`logra.HEAD_FILE`). Under FSDP and DeepSpeed accelerate saves the model itself
  (DeepSpeed: `exclude_frozen_parameters`, loaded non-strictly).
- Each checkpoint folder is written by every process into `.step-N.tmp`, completed by the main
  process with a loadable model folder (`model/`, the format of `stageN/`), the config and
  `manifest.json` (size and SHA-256 of every file), then renamed into place: a crash leaves the
  previous checkpoint or the new one, never half of one.
- `--resume` verifies each candidate's manifest (and reads its small state files) before loading
  anything; a damaged one is named with its file and skipped for the previous one. Every process
  must pick the same checkpoint.
- A non-finite loss stops the run (all processes agree through a reduction) with the step and the
  last checkpoint named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config, to_dict
from ..errors import CheckpointError, ConfigError, DataError, LlavaUltraError
from ..model.checkpoint import load_state_dict_strict, save_checkpoint
from ..model.lora import trainable_parameter_names
from ..model.weights import read_safetensors_file
from . import checkpoint as ck
from . import logra
from .dataset import (
    BadSample,
    Collator,
    InstructDataset,
    PixelSource,
    Prepared,
    ShardedBatchSampler,
    check_bad_budget,
    image_root_for,
    make_loader,
)
from .progress import MetricsLog, ProgressBar
from .schedule import build_optimizer, build_scheduler
from .setup import data_path

TRAINABLES_FILE = "model.safetensors"  # accelerate's name for the first model's weights
OLD_LAYOUT_FILE = "trainables.safetensors"  # resumable checkpoints written before accelerate states


class TrainingError(LlavaUltraError):
    """Training cannot continue (e.g. the loss became NaN); the message names the step and checkpoint."""


@dataclass
class StageResult:
    """What one stage did."""

    stage: int
    folder: Path
    """The stage's final checkpoint folder (None-like path if interrupted)."""
    steps: int
    losses: list[float] = field(default_factory=list)
    """Mean training loss of every optimiser step run in this invocation."""
    bad: list[BadSample] = field(default_factory=list)
    """Samples skipped (up front and while loading), with reasons."""
    seconds: float = 0.0
    completed: bool = True


# ------------------------------------------------------------------------- checkpointed state


@dataclass
class Progress:
    """The trainer's counters, saved in every resumable checkpoint (accelerate custom state)."""

    stage: int = 0
    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    batch: int = 0
    """Micro-batches of this epoch done (per process)."""
    samples_seen: int = 0
    """Samples trained on, all processes together."""
    world_size: int = 1

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class BadSampleLog:
    """Samples skipped while loading, each counted once per run, whichever epoch or process meets it."""

    def __init__(self) -> None:
        self.items: list[BadSample] = []
        self._keys: set[tuple[str, str, str]] = set()

    def add(self, bad: BadSample) -> bool:
        """Record `bad`; False when it was already recorded (same id, kind and reason)."""
        key = (bad.id, bad.kind, bad.reason)  # ids need not be unique
        if key in self._keys:
            return False
        self._keys.add(key)
        self.items.append(bad)
        return True

    def is_new(self, bad: BadSample) -> bool:
        return (bad.id, bad.kind, bad.reason) not in self._keys

    def state_dict(self) -> dict[str, Any]:
        return {"items": [dataclasses.asdict(b) for b in self.items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items, self._keys = [], set()
        for item in state["items"]:
            self.add(BadSample(**item))


# --------------------------------------------------------------------------------- trainer


class Trainer:
    """One stage: `run()` = prepare -> resume or seed -> (step -> log -> maybe save)* -> final folder.

    `progress` and `bad` are registered for checkpointing once per accelerator by `train` and reset
    here, so every stage's checkpoints hold that stage's counters."""

    def __init__(
        self,
        cfg: Config,
        n: int,
        out: Path,
        acc: Any,
        log: MetricsLog | None,
        model: Any,
        prepared: Prepared,
        tokenizer: Any,
        progress: Progress,
        bad: BadSampleLog,
    ) -> None:
        self.cfg, self.n, self.out, self.acc, self.log = cfg, n, out, acc, log
        self.scfg = cfg.train.stage(n)
        self.model, self.prepared, self.tokenizer = model, prepared, tokenizer
        self.progress, self.bad = progress, bad
        progress.load_state_dict(Progress(stage=n, world_size=acc.num_processes).state_dict())
        bad.load_state_dict({"items": []})
        self.ckpt_root = out / "checkpoints" / f"stage{n}"
        self.final = out / f"stage{n}"
        self.names = set(trainable_parameter_names(model))
        self.head: Any = None
        """The LoGra-Med alignment head when this stage adds the loss."""
        self.skipped_damaged = 0
        """Newer checkpoints `--resume` skipped as damaged before the one it resumed from."""

    def say(self, message: str) -> None:
        if self.acc.is_main_process:
            print(message, flush=True)

    # ------------------------------------------------------------------------------ the stage

    def run(self, *, resume: bool, stop_after: int | None) -> StageResult:
        t0 = time.perf_counter()
        self._build()
        chosen = self._choose_checkpoint() if resume else None
        if chosen is None:
            ck.seed_everything(self.cfg.train.seed + self.n)
        self._prepare()
        if chosen is not None:
            self._load(chosen)
        loader = make_loader(
            self.dataset,
            self.sampler,
            Collator(self.tokenizer.pad_token_id or 0),
            self.cfg.data.num_workers,
            self.cfg.train.seed,
        )
        p = self.progress
        self.bar = ProgressBar(
            self.total, p.step, f"stage {self.n}", self.cfg.train.progress and self.acc.is_main_process
        )
        self.losses: list[float] = []
        self._reset_step_stats()
        self.t_stage, self.seen_at_start = time.perf_counter(), p.samples_seen
        self.model.train()
        try:
            completed = self._train(loader, stop_after)
            if completed:
                if not _sharded(self.acc):  # sharded runs hold different shards by design
                    self._check_ranks_agree()
                self._save_final()
        finally:
            self.bar.close()
            for handle in self.hooks:
                handle.remove()
        result = StageResult(
            stage=self.n,
            folder=self.final,
            steps=p.step,
            losses=self.losses,
            bad=list(self.prepared.bad) + list(self.bad.items),
            seconds=time.perf_counter() - t0,
            completed=completed,
        )
        self.acc.free_memory()
        del self.model, self.optimizer
        return result

    def _train(self, loader: Any, stop_after: int | None) -> bool:
        """Epochs of micro-steps until the stage's last step (True), or until `stop_after` optimiser
        steps (False: an interruption, for tests). Every optimiser step is logged and may save."""
        p = self.progress
        while p.step < self.total:
            if p.batch >= len(self.sampler):
                p.epoch, p.batch = p.epoch + 1, 0
            self.sampler.set_epoch(p.epoch, start=p.batch)
            for item in loader:
                p.batch += 1
                self._note_bad(item["bad"])
                if not self._micro_step(item):
                    continue  # accumulating
                self._log_step()
                self._maybe_save()
                if p.step >= self.total:
                    return True
                if stop_after is not None and p.step >= stop_after:
                    return False
        return True

    # -------------------------------------------------------------------------------- prepare

    def _build(self) -> None:
        """Data source, sampler, optimiser, LoGra-Med head and scheduler (before accelerate wraps them)."""
        cfg, scfg, acc, n = self.cfg, self.scfg, self.acc, self.n
        image_root = image_root_for(data_path(cfg, n), cfg.data.image_root)
        source = PixelSource(self.model.image_processor)
        if cfg.data.feature_cache is not None:  # frozen-encoder outputs computed once, checked here
            from .feature_cache import cached_source

            source = cached_source(cfg.data.feature_cache, self.model, self.prepared, image_root)
        self.dataset = InstructDataset(self.prepared, image_root, source)
        self.sampler = ShardedBatchSampler(
            len(self.dataset),
            scfg.batch_size,
            cfg.train.seed,
            rank=acc.process_index,
            world=acc.num_processes,
            multiple_of=scfg.grad_accum,
        )
        steps_per_epoch = len(self.sampler) // scfg.grad_accum
        if steps_per_epoch == 0:
            raise DataError(
                f"stage {n}: {len(self.dataset)} samples are too few for batch_size={scfg.batch_size} x "
                f"grad_accum={scfg.grad_accum} x {acc.num_processes} process(es); lower them or add data"
            )
        self.total = steps_per_epoch * scfg.epochs
        if scfg.max_steps is not None:
            self.total = min(self.total, scfg.max_steps)
        self.optimizer = build_optimizer(self.model, cfg.train, scfg)
        hidden = self.model.llm.config.get_text_config().hidden_size
        self.head = logra.build_head(cfg.train, n, hidden, acc.device)
        if self.head is not None and _fsdp(acc):
            raise ConfigError(
                f"train.align_weight > 0 in stage {n} is not supported under FSDP: the LoGra-Med head "
                f"shares the optimiser with the model, and accelerate's FSDP checkpoints save one "
                f"optimiser per model; train aligned stages with DDP or DeepSpeed (configs/accelerate/)"
            )
        if self.head is not None:  # before the scheduler, which records every group's initial lr
            self.optimizer.add_param_group(logra.head_param_group(self.head, scfg.weight_decay))
        self.scheduler = build_scheduler(self.optimizer, scfg, self.total)
        _configure_sharding(acc, cfg, self.scfg)

    def _prepare(self) -> None:
        """Wrap model (+ head), optimiser and scheduler; hook our trainables-only model state in."""
        acc = self.acc
        if self.head is not None:
            self.model, self.head, self.optimizer, self.scheduler = acc.prepare(
                self.model, self.head, self.optimizer, self.scheduler
            )
        else:
            self.model, self.optimizer, self.scheduler = acc.prepare(
                self.model, self.optimizer, self.scheduler
            )
        self.hooks = [
            acc.register_save_state_pre_hook(self._save_model_state),
            acc.register_load_state_pre_hook(self._load_model_state),
        ]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.params += [] if self.head is None else list(self.head.parameters())
        self.trained = [self.model] if self.head is None else [self.model, self.head]

    # ----------------------------------------------------------------------------------- step

    def _note_bad(self, found: list[BadSample]) -> None:
        """Record this micro-batch's new bad samples, gathered from every process so that all hold
        the same list, and stop when they exceed the budget."""
        acc, n = self.acc, self.n
        new = [b for b in found if self.bad.is_new(b)]
        n_new = int(acc.reduce(torch.tensor(float(len(new)), device=acc.device), "sum").item())
        if n_new:
            from accelerate.utils import gather_object

            for bad in gather_object(new) if acc.num_processes > 1 else new:
                if self.bad.add(bad):
                    self.bar.write(f"stage {n}: skipped sample {bad.id}: {bad.reason}")
                    if self.log is not None:
                        self.log.event("bad_sample", stage=n, id=bad.id, kind=bad.kind, reason=bad.reason)
        check_bad_budget(
            len(self.prepared.bad) + len(self.bad.items),
            self.prepared.total,
            self.cfg.data.max_bad_fraction,
            f"stage {n}",
            self.bad.items,
        )

    def _micro_step(self, item: dict[str, Any]) -> bool:
        """Forward, backward and (at an accumulation boundary) the optimiser step; True when the
        optimiser stepped."""
        acc, inputs = self.acc, item["inputs"]
        with acc.accumulate(*self.trained):
            if inputs is None:  # every sample of this micro-batch was bad: join the collectives
                loss, out = sum(p.sum() for p in self.params) * 0.0, None
            elif self.head is not None:
                llm = acc.unwrap_model(self.model).llm
                out, loss, logged = logra.aligned_loss(
                    self.model, self.head, llm, inputs, item["extended"], logra.backward_scale(acc)
                )
                for key, value in logged.items():
                    self.align_parts.setdefault(key, []).append(value)
            else:
                out = self.model(**inputs, return_logits=False)  # logits only where labelled
                loss = out.loss
            self._stop_unless_finite(loss)
            acc.backward(loss)
            self.grad_norm = None
            if acc.sync_gradients and self.cfg.train.max_grad_norm > 0:
                self.grad_norm = acc.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if inputs is not None:
            self.micro.append(loss.detach().float())
            for key in self.parts:
                value = getattr(out, key)
                if value is not None:
                    self.parts[key].append(float(value.detach()))
            self.step_samples += item["samples"]
        if not acc.sync_gradients:
            return False
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.progress.step += 1
        return True

    def _stop_unless_finite(self, loss: torch.Tensor) -> None:
        acc, p = self.acc, self.progress
        finite = acc.reduce(
            torch.tensor(float(torch.isfinite(loss.detach()).all()), device=acc.device), "min"
        )
        if finite.item() < 1.0:
            found = ck.list_checkpoints(self.ckpt_root, ck.MANIFEST)
            last = found[-1][1] if found else None
            raise TrainingError(
                f"stage {self.n}: the loss became {loss.item()} at step {p.step + 1} (epoch {p.epoch}, "
                f"batch {p.batch}); last checkpoint: {last or 'none yet'}. Check the data, or "
                f"lower train.stage{self.n}.lr (or train.max_grad_norm) and start over with --overwrite"
            )

    # ------------------------------------------------------------------------------------ log

    def _reset_step_stats(self) -> None:
        self.micro: list[torch.Tensor] = []
        self.parts: dict[str, list[float]] = {"lm_loss": [], "kd_loss": []}
        self.align_parts: dict[str, list[float]] = {}
        self.step_samples = 0

    def _log_step(self) -> None:
        """Reduce the step's loss and sample count over processes; progress bar and metrics.jsonl."""
        acc, p = self.acc, self.progress
        mean = torch.stack(self.micro).mean() if self.micro else torch.zeros((), device=acc.device)
        loss_value = float(acc.reduce(mean.to(acc.device), "mean"))
        p.samples_seen += int(acc.reduce(torch.tensor(self.step_samples, device=acc.device), "sum"))
        self.losses.append(loss_value)
        elapsed = time.perf_counter() - self.t_stage
        rate = (p.samples_seen - self.seen_at_start) / max(elapsed, 1e-9)
        self.bar.update(loss_value, self.lr, rate)
        if self.log is not None and p.step % self.cfg.train.log_every == 0:
            self.log.log(
                {
                    "stage": self.n,
                    "step": p.step,
                    "epoch": p.epoch,
                    "loss": loss_value,
                    **{k: sum(v) / len(v) for k, v in self.parts.items() if v},
                    **{k: sum(v) / len(v) for k, v in self.align_parts.items() if v},
                    "lr": self.lr,
                    "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
                    "samples": p.samples_seen,
                    "samples_per_s": rate,
                    "elapsed_s": elapsed,
                }
            )
        self._reset_step_stats()

    # ----------------------------------------------------------------------------------- save

    def _maybe_save(self) -> None:
        step, every = self.progress.step, self.cfg.train.save_every
        if step >= self.total or (every and step % every == 0):
            self.save()

    def save(self) -> Path:
        """Write a resumable checkpoint (every process calls; see the module docstring)."""
        acc = self.acc
        folder = ck.step_dir(self.ckpt_root, self.progress.step)
        tmp = ck.tmp_of(folder)
        if acc.is_main_process:
            ck.fresh_dir(tmp)
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)  # collective: gathers FSDP / ZeRO-3 shards
        acc.save_state(str(tmp), **self._deepspeed_kwargs(save=True))
        if acc.is_main_process:
            save_checkpoint(_full_view(acc, self.model, state), tmp / "model", self.tokenizer)
            ck.write_config(tmp, to_dict(self.cfg))
        acc.wait_for_everyone()  # every process's random states are in
        if acc.is_main_process:
            ck.write_manifest(tmp)
            ck.commit_dir(tmp, folder)
            ck.prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last, ck.MANIFEST)
            if self.log is not None:  # relative to the run folder, so the log stays true when it moves
                rel = folder.relative_to(self.out).as_posix()
                self.log.event("checkpoint", stage=self.n, step=self.progress.step, path=rel)
        acc.wait_for_everyone()
        return folder

    def _save_final(self) -> None:
        """The stage's model folder (`stageN/`: what the next stage, eval and serve load)."""
        state = self.acc.get_state_dict(self.model)  # collective: gathers FSDP / ZeRO-3 shards
        if self.acc.is_main_process:
            with ck.atomic_dir(self.final, manifest=True) as tmp:
                save_checkpoint(_full_view(self.acc, self.model, state), tmp, self.tokenizer)
                ck.write_config(tmp, to_dict(self.cfg))
        self.acc.wait_for_everyone()

    def _save_model_state(self, models: list[Any], weights: list[dict], output_dir: str) -> None:
        """accelerate save hook: keep the trainables only; the head goes to its own file."""
        if not weights:  # FSDP / DeepSpeed: accelerate saved the models itself
            return
        state = self.acc.unwrap_model(models[0]).state_dict()
        weights[0] = {k: state[k].detach().contiguous() for k in sorted(self.names)}
        if self.head is not None:
            weights.pop(1)
            if self.acc.is_main_process:
                logra.save_head(self.head, Path(output_dir))

    def _load_model_state(self, models: list[Any], input_dir: str) -> None:
        """accelerate load hook: the trainables into the model, strictly; the head from its file."""
        if not models:  # FSDP / DeepSpeed: accelerate loads the models itself
            return
        folder = Path(input_dir)
        saved = read_safetensors_file(folder / TRAINABLES_FILE)
        if set(saved) != self.names:
            raise CheckpointError(
                f"{folder} does not hold this stage's trainables (missing: {sorted(self.names - set(saved))[:10]}, "
                f"unexpected: {sorted(set(saved) - self.names)[:10]}); check train.stage{self.n}.trainable"
            )
        model = self.acc.unwrap_model(models[0])
        full = model.state_dict()
        full.update({k: v.to(device=full[k].device, dtype=full[k].dtype) for k, v in saved.items()})
        load_state_dict_strict(model, full, source=str(folder))
        if self.head is not None:
            logra.load_head(self.acc.unwrap_model(self.head), folder)
        models.clear()  # loaded here; accelerate would load them strictly against the full model

    def _deepspeed_kwargs(self, save: bool) -> dict[str, Any]:
        """DeepSpeed saves only what trains (its engine holds the Adam moments) and loads it non-strictly."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.DEEPSPEED:
            return {}
        return {"exclude_frozen_parameters": True} if save else {"load_module_strict": False}

    # --------------------------------------------------------------------------------- resume

    def _choose_checkpoint(self) -> Path | None:
        """`--resume`: the newest checkpoint that verifies, falling back past damaged ones (each
        named, with its damaged file); None when the stage has none. Every process must agree."""
        found = ck.list_step_dirs(self.ckpt_root)  # incomplete ones too: they are named, not skipped silently
        if not found:
            self.say(
                f"stage {self.n}: --resume found no checkpoint of this stage in {self.ckpt_root} (the "
                f"run stopped before its first save); starting stage {self.n} from its first step"
            )
            return None
        damaged: list[str] = []
        newest_first = [folder for _, folder in reversed(found)]
        chosen = None
        for i, folder in enumerate(newest_first):
            try:  # verify, and read the small state files, before anything is loaded
                self._check_usable(folder)
            except ck.DamagedCheckpoint as exc:
                damaged.append(str(exc))
                if i + 1 < len(newest_first):
                    self.say(f"stage {self.n}: {exc}; falling back to {newest_first[i + 1].name}")
                continue
            chosen = folder
            break
        if self.acc.num_processes > 1:  # every process must resume the same step (collective)
            from accelerate.utils import gather_object

            picks = gather_object([chosen.name if chosen is not None else None])
            if len(set(picks)) > 1:
                raise CheckpointError(
                    f"stage {self.n}: the processes found different usable checkpoints in "
                    f"{self.ckpt_root} ({picks}); put the run folder on storage every process sees "
                    f"the same way, and resume again"
                )
        if chosen is None:
            shown = "\n  ".join(damaged)
            raise CheckpointError(
                f"stage {self.n}: every checkpoint in {self.ckpt_root} is damaged, none can be resumed:\n"
                f"  {shown}\nrestore the files from a backup, or delete {self.ckpt_root} and resume again "
                f"to start stage {self.n} from its first step"
            )
        self.skipped_damaged = len(damaged)
        return chosen

    def _check_usable(self, folder: Path) -> None:
        """DamagedCheckpoint unless `folder` verifies against its manifest, is an accelerate state of
        this run's world size, and its small state files read."""
        if (folder / OLD_LAYOUT_FILE).is_file():
            raise ck.DamagedCheckpoint(
                f"checkpoint {folder} was written by an earlier llava-ultra (its own resume format, not "
                f"accelerate's); finish that run with the version that started it, or delete it"
            )
        ck.verify_checkpoint(folder, expect_manifest=True)
        states = sorted(folder.glob("random_states_*.pkl"))
        if len(states) != self.acc.num_processes:
            raise CheckpointError(
                f"{folder} was written by {len(states)} processes but this run has "
                f"{self.acc.num_processes}; resume with the same number of processes"
            )
        ck.check_readable(folder, [f"random_states_{self.acc.process_index}.pkl", "scheduler.bin"])
        ck.check_readable(folder, sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl")))

    def _load(self, folder: Path) -> None:
        """Restore model trainables, optimiser, scheduler, RNG states, counters and bad samples."""
        self.acc.load_state(str(folder), **self._deepspeed_kwargs(save=False))
        p = self.progress
        if p.stage != self.n or p.world_size != self.acc.num_processes:
            raise CheckpointError(
                f"{folder} holds stage {p.stage} written by {p.world_size} processes; this is stage "
                f"{self.n} on {self.acc.num_processes}: resume with the run's own config and launcher"
            )
        self.say(f"stage {self.n}: resumed from {folder} (step {p.step}, epoch {p.epoch}, batch {p.batch})")
        if self.skipped_damaged:
            self.say(
                f"stage {self.n}: resumed from {folder.name}, the newest usable checkpoint; "
                f"{self.skipped_damaged} newer one(s) skipped as damaged (left in place for inspection)"
            )

    # --------------------------------------------------------------------------------- finish

    def _check_ranks_agree(self) -> None:
        """Every process must end a stage with bit-identical trainable weights (DDP keeps them in sync);
        a SHA-256 of every trainable tensor's bytes, in order, is logged per process and any
        disagreement stops the run."""
        from accelerate.utils import gather_object

        digest = hashlib.sha256()
        for p in self.params:
            digest.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        prints = gather_object([digest.hexdigest()])
        if self.log is not None:
            self.log.event("rank_fingerprints", stage=self.n, step=self.progress.step, values=prints)
        if len(set(prints)) > 1:
            raise TrainingError(
                f"stage {self.n}: the processes hold different weights after step {self.progress.step} "
                f"(fingerprints {prints}); this is a bug in the distributed setup, please report it"
            )


# --------------------------------------------------------------------------------- sharding


class _GatheredModel:
    """The unwrapped model with its `state_dict()` replaced by a gathered full one, so that
    `save_checkpoint` writes whole tensors under FSDP / ZeRO-3 (module structure is unchanged there)."""

    def __init__(self, model: Any, state: dict[str, torch.Tensor]) -> None:
        self._model, self._state = model, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _full_view(acc: Any, model: Any, state: dict[str, torch.Tensor]) -> Any:
    unwrapped = acc.unwrap_model(model)
    return _GatheredModel(unwrapped, state) if _sharded(acc) else unwrapped


def _fsdp(acc: Any) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _sharded(acc: Any) -> bool:
    """FSDP or DeepSpeed: parameters and optimiser state are partitioned across processes."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _configure_sharding(acc: Any, cfg: Config, scfg: Any) -> None:
    """Fill DeepSpeed's batch / accumulation / clipping from the stage (we pass no dataloader to
    accelerate, so it cannot infer them)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = scfg.batch_size
        ds["gradient_accumulation_steps"] = scfg.grad_accum
        ds["train_batch_size"] = scfg.batch_size * scfg.grad_accum * acc.num_processes
        ds["gradient_clipping"] = cfg.train.max_grad_norm
