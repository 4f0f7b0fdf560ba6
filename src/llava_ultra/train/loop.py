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
2. tokenizer + every stage's samples encoded and length-checked (`data/collate.py`), missing
   images found; only then is a model built or loaded.

Under the hood: one `accelerate.Accelerator` (CPU when there is no CUDA; bf16 autocast on a GPU
that supports it, fp32 on CPU), gradient accumulation through `accelerator.accumulate`,
DDP / FSDP / DeepSpeed from the launcher's config (`configs/accelerate/`), global-norm gradient
clipping, cosine schedule with warm-up (`schedule.py`).

Resume: a checkpoint stores every trainable parameter, the optimiser and scheduler states, the RNG
states of every process, and the data position (epoch, batches done); the sampler skips the
batches already seen without loading them, so a resumed run reaches the same weights as an
uninterrupted one (single process and DDP; tested on CPU). Under FSDP / ZeRO-3 the trainables are
gathered with `accelerator.get_state_dict` (a collective every process joins) before the main
process writes them; the partitioned optimiser state is not saved there, so a resumed sharded run
restarts Adam's moments (it says so). These sharded paths cannot be exercised without GPUs here.

Damage: every checkpoint folder carries a manifest (sizes and SHA-256, `checkpoint.py`), verified
before it is read. `--resume` takes the newest checkpoint that verifies and reads, says which
newer ones it skipped and why (naming the file), and refuses when none is usable. `--resume`
without any checkpoint of a stage says that the stage starts from its first step. A stage's
starting folder (`stageN/` of this run, or `train.init_from`) is verified the same way. Paths
recorded inside a run are relative to it, so a moved run folder resumes.

A non-finite loss stops the run (all processes agree through a reduction) with the step and the
last checkpoint named.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ModelConfig, StageConfig, to_dict
from ..data.collate import (
    BadSample,
    Collator,
    InstructDataset,
    PixelSource,
    Prepared,
    ShardedBatchSampler,
    check_bad_budget,
    describe_bad,
    image_root_for,
    make_loader,
    prepare_samples,
    read_instructions,
)
from ..errors import CheckpointError, ConfigError, DataError, LlavaUltraError
from . import checkpoint as ck
from . import logra
from .progress import MetricsLog, ProgressBar
from .schedule import build_optimizer, build_scheduler


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


@dataclass
class TrainResult:
    run_dir: Path
    stages: list[StageResult]
    main_process: bool = True
    """False on the other processes of a distributed run (they should stay quiet)."""


# ------------------------------------------------------------------------------ setup helpers


def _data_path(cfg: Config, stage: int) -> str:
    path = cfg.data.stage1 if stage == 1 else cfg.data.stage2
    if path is None:
        raise ConfigError(
            f"data.stage{stage} is not set; point it at the stage-{stage} instruction JSON "
            f"(e.g. data/instruct/stage{stage}.train.json from `llava-ultra instruct`)"
        )
    if not Path(path).is_file():
        raise DataError(
            f"data.stage{stage}={path} does not exist; build it with `llava-ultra instruct` or fix the path"
        )
    return path


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
        _data_path(cfg, stage)
    first = _init_folder(cfg, out, cfg.train.stages[0])
    if first is not None:
        _check_checkpoint(first, "train.init_from")
    if cfg.data.feature_cache is not None:
        from .feature_cache import read_index

        read_index(cfg.data.feature_cache)


def _training_texts(cfg: Config) -> list[str]:
    texts = []
    for stage in cfg.train.stages:
        for sample in read_instructions(_data_path(cfg, stage)):
            if isinstance(sample, dict):
                texts += [str(t.get("value", "")) for t in sample.get("conversations") or []]
                texts.append(str(sample.get("findings") or ""))
    return texts


def resolve_tokenizer(cfg: Config, init: Path | None) -> Any:
    """The tokenizer of a run: init folder's, `train.tokenizer`, the LLM's, or a tiny BPE built on
    the training text (inline LLMs only). `<image>` is added when missing."""
    from ..model.tokenizer import build_tiny_tokenizer, load_tokenizer

    if init is not None:
        return load_tokenizer(init)
    source = cfg.train.tokenizer or cfg.model.llm.path
    if source is None:
        vocab = (cfg.model.llm.inline or {}).get("vocab_size", 1024)
        return build_tiny_tokenizer(_training_texts(cfg), vocab_size=vocab)
    tok = load_tokenizer(source)
    token = cfg.model.image_token
    if tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [token]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


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
    path = _data_path(cfg, stage)
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


def initial_model(cfg: Config, tokenizer: Any, device: torch.device | str = "cpu") -> Any:
    """The model a fresh stage 1 starts from: `build_model(cfg.model)` after seeding with train.seed."""
    from ..model.ultra import build_model

    ck.seed_everything(cfg.train.seed)
    return build_model(cfg.model, tokenizer, device=device)


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


def _trainable_state(state_dict: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k in names}


# ------------------------------------------------------------------------------------- stage


class _Stage:
    """One stage's training state and its checkpointing (internal to `train`)."""

    def __init__(self, cfg: Config, n: int, out: Path, accelerator: Any, log: MetricsLog | None) -> None:
        self.cfg, self.n, self.out, self.acc, self.log = cfg, n, out, accelerator, log
        self.scfg = cfg.train.stage(n)
        self.ckpt_root = out / "checkpoints" / f"stage{n}"
        self.final = out / f"stage{n}"
        self.step = self.epoch = self.batch = 0
        self.samples_seen = 0
        self.bad_runtime: list[BadSample] = []
        self.bad_keys: set[tuple[str, str, str]] = set()
        self.pending_optimizer: dict[str, Any] | None = None
        """A full FSDP optimiser state read by `restore`, loaded after the model is sharded."""
        self.head: Any = None
        """The LoGra-Med alignment head when this stage adds the loss (saved in resumable checkpoints)."""

    def say(self, message: str) -> None:
        if self.acc.is_main_process:
            print(message, flush=True)

    def last_checkpoint(self) -> Path | None:
        found = ck.list_checkpoints(self.ckpt_root)
        return found[-1][1] if found else None

    # -------------------------------------------------------------------------------- saving

    def save(self, model: Any, optimizer: Any, scheduler: Any, tokenizer: Any, names: set[str]) -> Path:
        """Write a resumable checkpoint (all processes must call; the main process writes)."""
        from accelerate.utils import gather_object

        from ..model.checkpoint import save_checkpoint

        acc = self.acc
        folder = ck.step_dir(self.ckpt_root, self.step)
        state = acc.get_state_dict(model)  # collective: gathers FSDP / ZeRO-3 shards
        rngs = gather_object([ck.capture_rng()])
        if _fsdp(acc):  # collective: the sharded Adam moments, gathered whole and keyed by name
            optimizer_state, optimizer_format = _fsdp_optimizer_state(model, self.head, optimizer), "full_fqn"
        elif _sharded(acc):  # DeepSpeed partitions it inside its engine: not saved
            optimizer_state, optimizer_format = None, None
        else:
            optimizer_state, optimizer_format = optimizer.state_dict(), "torch"
        if acc.is_main_process:
            with ck.atomic_dir(folder, manifest=True) as tmp:
                save_checkpoint(_full_view(acc, model, state), tmp / "model", tokenizer)
                ck.write_state_files(
                    tmp,
                    trainables=_trainable_state(state, names),
                    optimizer_state=optimizer_state,
                    scheduler_state=scheduler.state_dict(),
                    trainer_state={
                        "stage": self.n,
                        "step": self.step,
                        "epoch": self.epoch,
                        "batch": self.batch,
                        "samples_seen": self.samples_seen,
                        "world_size": acc.num_processes,
                        "optimizer_format": optimizer_format,
                        "manifest": True,  # so a deleted manifest.json reads as damage, not as an old folder
                        "bad_runtime": [dataclasses.asdict(b) for b in self.bad_runtime],
                    },
                    rng_states=rngs,
                )
                if self.head is not None:
                    logra.save_head(self.head, tmp)
                ck.write_config(tmp, to_dict(self.cfg))
            ck.prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last)
            if self.log is not None:
                # relative to the run folder, so the log stays true when the folder moves
                self.log.event(
                    "checkpoint", stage=self.n, step=self.step, path=folder.relative_to(self.out).as_posix()
                )
        acc.wait_for_everyone()
        return folder

    def save_final(self, model: Any, tokenizer: Any) -> None:
        from ..model.checkpoint import save_checkpoint

        state = self.acc.get_state_dict(model)  # collective: gathers FSDP / ZeRO-3 shards
        if self.acc.is_main_process:
            with ck.atomic_dir(self.final, manifest=True) as tmp:
                save_checkpoint(_full_view(self.acc, model, state), tmp, tokenizer)
                ck.write_config(tmp, to_dict(self.cfg))
        self.acc.wait_for_everyone()

    def restore_newest(self, model: Any, optimizer: Any, scheduler: Any, names: set[str]) -> Path | None:
        """`--resume`: restore the newest checkpoint that verifies and reads, falling back past
        damaged ones (each named, with its damaged file); None when the stage has no checkpoint."""
        found = ck.list_step_dirs(self.ckpt_root)  # incomplete ones too: they are named, not skipped silently
        if not found:
            self.say(
                f"stage {self.n}: --resume found no checkpoint of this stage in {self.ckpt_root} (the "
                f"run stopped before its first save); starting stage {self.n} from its first step"
            )
            return None
        damaged: list[str] = []
        newest_first = [folder for _, folder in reversed(found)]
        fsdp_worker = _fsdp(self.acc) and not self.acc.is_main_process  # gets the moments broadcast
        chosen, state = None, None
        for i, folder in enumerate(newest_first):
            try:  # verify, and read everything, before anything is loaded into the model
                ck.verify_checkpoint(folder, expect_manifest=_says_it_has_a_manifest(folder))
                state = ck.read_state_files(folder, with_optimizer=not fsdp_worker)
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
        self.restore(chosen, model, optimizer, scheduler, names, state=state)
        if damaged:
            self.say(
                f"stage {self.n}: resumed from {chosen.name}, the newest usable checkpoint; "
                f"{len(damaged)} newer one(s) skipped as damaged (left in place for inspection)"
            )
        return chosen

    def restore(
        self,
        folder: Path,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        names: set[str],
        state: dict[str, Any] | None = None,
    ) -> None:
        """Load a resumable checkpoint into the (not yet prepared) model, optimiser and scheduler;
        `state` is what `ck.read_state_files` returned for it, when already read."""
        from ..model.checkpoint import load_state_dict_strict

        fsdp_worker = _fsdp(self.acc) and not self.acc.is_main_process  # gets the moments broadcast
        if state is None:
            state = ck.read_state_files(folder, with_optimizer=not fsdp_worker)
        trainer = state["trainer"]
        if trainer.get("world_size") != self.acc.num_processes:
            raise CheckpointError(
                f"{folder} was written by {trainer.get('world_size')} processes but this run has "
                f"{self.acc.num_processes}; resume with the same number of processes"
            )
        got = set(state["trainables"])
        if got != names:
            raise CheckpointError(
                f"{folder} does not hold this stage's trainables (missing: {sorted(names - got)[:10]}, "
                f"unexpected: {sorted(got - names)[:10]}); check train.stage{self.n}.trainable"
            )
        full = model.state_dict()
        full.update({k: v.to(full[k].dtype) for k, v in state["trainables"].items()})
        load_state_dict_strict(model, full, source=str(folder))
        if self.head is not None:
            logra.load_head(self.head, folder)
        if trainer.get("optimizer_format") == "full_fqn" and (fsdp_worker or state["optimizer"] is not None):
            if not _fsdp(self.acc):
                raise CheckpointError(
                    f"{folder} was written under FSDP (its optimiser state is keyed by parameter name); "
                    "resume it with the same FSDP accelerate config"
                )
            # loaded into the shards after acc.prepare; only the main process holds it, the others
            # receive their shards from it (no full copy per process)
            self.pending_optimizer = {} if fsdp_worker else state["optimizer"]
        elif state["optimizer"] is not None:
            if _fsdp(self.acc):
                raise CheckpointError(
                    f"{folder} was written without FSDP; resume it with the accelerate config that wrote it"
                )
            optimizer.load_state_dict(state["optimizer"])
        else:
            self.say(
                f"stage {self.n}: {folder} holds no optimiser state (written under DeepSpeed, or under "
                f"FSDP by a version before optimiser states were gathered); "
                f"Adam moments restart from zero, so the resumed run is close to, not equal to, an uninterrupted one"
            )
        scheduler.load_state_dict(state["scheduler"])
        ck.restore_rng(state["rng"][self.acc.process_index])
        self.step, self.epoch, self.batch = trainer["step"], trainer["epoch"], trainer["batch"]
        self.samples_seen = trainer["samples_seen"]
        self.bad_runtime = [BadSample(**b) for b in trainer.get("bad_runtime", [])]
        self.bad_keys = {_bad_key(b) for b in self.bad_runtime}
        self.say(
            f"stage {self.n}: resumed from {folder} (step {self.step}, epoch {self.epoch}, batch {self.batch})"
        )


def _says_it_has_a_manifest(folder: Path) -> bool:
    """Whether the checkpoint's own trainer_state.json says a manifest was written (a missing one is
    then damage, not an older version's folder); an unreadable state file is caught later."""
    import json

    try:
        return bool(json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")).get("manifest"))
    except (OSError, ValueError, AttributeError):
        return True


def _bad_key(bad: BadSample) -> tuple[str, str, str]:
    """Identity of a skipped sample: its id, what was wrong and where (ids need not be unique)."""
    return (bad.id, bad.kind, bad.reason)


def _fsdp(acc: Any) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _optimizer_view(model: Any, head: Any) -> nn.Module:
    """One module over everything the optimiser trains, so parameters get stable names."""
    parts = {"model": model} if head is None else {"model": model, "head": head}
    return nn.ModuleDict(parts)


def _fsdp_optimizer_state(model: Any, head: Any, optimizer: Any) -> dict[str, Any]:
    """The FSDP-sharded optimiser state gathered whole, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(
        _optimizer_view(model, head), getattr(optimizer, "optimizer", optimizer), options=opts
    )


def _load_fsdp_optimizer_state(model: Any, head: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Scatter a full, name-keyed optimiser state into this process's shards (every process calls;
    only the main process passes the state, the others pass {} and receive theirs from it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    view = _optimizer_view(model, head)
    set_optimizer_state_dict(
        view, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state, options=opts
    )


def _sharded(acc: Any) -> bool:
    """FSDP or DeepSpeed: the optimiser state is partitioned across processes."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _configure_sharding(acc: Any, cfg: Config, scfg: StageConfig) -> None:
    """Fill DeepSpeed's batch / accumulation / clipping from the stage (we pass no dataloader to
    accelerate, so it cannot infer them)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = scfg.batch_size
        ds["gradient_accumulation_steps"] = scfg.grad_accum
        ds["train_batch_size"] = scfg.batch_size * scfg.grad_accum * acc.num_processes
        ds["gradient_clipping"] = cfg.train.max_grad_norm


def _check_ranks_agree(st: _Stage, params: list[torch.Tensor]) -> None:
    """Every process must end a stage with bit-identical trainable weights (DDP keeps them in sync);
    a SHA-256 of every trainable tensor's bytes, in order, is logged per process and any
    disagreement stops the run."""
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    prints = gather_object([digest.hexdigest()])
    if st.log is not None:
        st.log.event("rank_fingerprints", stage=st.n, step=st.step, values=prints)
    if len(set(prints)) > 1:
        raise TrainingError(
            f"stage {st.n}: the processes hold different weights after step {st.step} (fingerprints "
            f"{prints}); this is a bug in the distributed setup, please report it"
        )


def _run_stage(
    st: _Stage,
    prepared: Prepared,
    tokenizer: Any,
    init: Path | None,
    *,
    resume: bool,
    stop_after: int | None,
) -> StageResult:
    from ..model.lora import trainable_parameter_names

    cfg, acc, scfg, n = st.cfg, st.acc, st.scfg, st.n
    t0 = time.perf_counter()
    acc.free_memory()
    acc.gradient_accumulation_steps = scfg.grad_accum
    acc.step = 0

    model = _set_trainable(_load_stage_model(cfg, init, tokenizer, acc.device), cfg, n)
    if scfg.template != "plain" and model.config.template != scfg.template:
        # the checkpoint records the conversation format it was tuned with, so eval / serve /
        # check-images (which default to the recorded template) prompt it the same way
        model.config = dataclasses.replace(model.config, template=scfg.template)
    if cfg.train.gradient_checkpointing:
        if hasattr(model.llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.llm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = set(trainable_parameter_names(model))

    image_root = image_root_for(_data_path(cfg, n), cfg.data.image_root)
    source = PixelSource(model.image_processor)
    if cfg.data.feature_cache is not None:  # frozen-encoder outputs computed once, checked here
        from .feature_cache import cached_source

        source = cached_source(cfg.data.feature_cache, model, prepared, image_root)
    dataset = InstructDataset(prepared, image_root, source)
    sampler = ShardedBatchSampler(
        len(dataset),
        scfg.batch_size,
        cfg.train.seed,
        rank=acc.process_index,
        world=acc.num_processes,
        multiple_of=scfg.grad_accum,
    )
    steps_per_epoch = len(sampler) // scfg.grad_accum
    if steps_per_epoch == 0:
        raise DataError(
            f"stage {n}: {len(dataset)} samples are too few for batch_size={scfg.batch_size} x "
            f"grad_accum={scfg.grad_accum} x {acc.num_processes} process(es); lower them or add data"
        )
    total = steps_per_epoch * scfg.epochs
    if scfg.max_steps is not None:
        total = min(total, scfg.max_steps)
    optimizer = build_optimizer(model, cfg.train, scfg)
    head = logra.build_head(cfg.train, n, model.llm.config.get_text_config().hidden_size, acc.device)
    if head is not None:  # before the scheduler, which records every group's initial lr
        optimizer.add_param_group(logra.head_param_group(head, scfg.weight_decay))
    st.head = head
    scheduler = build_scheduler(optimizer, scfg, total)

    _configure_sharding(acc, cfg, scfg)
    last = st.restore_newest(model, optimizer, scheduler, names) if resume else None
    if last is None:
        ck.seed_everything(cfg.train.seed + n)
    if head is not None:
        model, head, optimizer = acc.prepare(model, head, optimizer)
        st.head = head
    else:
        model, optimizer = acc.prepare(model, optimizer)
    if st.pending_optimizer is not None:  # FSDP resume: the moments go into the shards
        _load_fsdp_optimizer_state(model, head, optimizer, st.pending_optimizer)
        st.pending_optimizer = None
    loader = make_loader(
        dataset, sampler, Collator(tokenizer.pad_token_id or 0), cfg.data.num_workers, cfg.train.seed
    )
    budget_total = prepared.total

    params = [p for p in model.parameters() if p.requires_grad]
    params += [] if head is None else list(head.parameters())
    trained = [model] if head is None else [model, head]
    align_parts: dict[str, list[float]] = {}
    bar = ProgressBar(total, st.step, f"stage {n}", cfg.train.progress and acc.is_main_process)
    losses: list[float] = []
    micro: list[torch.Tensor] = []
    parts: dict[str, list[float]] = {"lm_loss": [], "kd_loss": []}
    step_samples = 0
    t_stage = time.perf_counter()
    seen_at_start = st.samples_seen
    model.train()
    stopped = False
    try:
        while st.step < total and not stopped:
            if st.batch >= len(sampler):
                st.epoch, st.batch = st.epoch + 1, 0
            sampler.set_epoch(st.epoch, start=st.batch)
            for item in loader:
                st.batch += 1
                # a bad sample is counted once per run, whichever epoch or process meets it: the new
                # ones are gathered from every process, so all hold the same list (saved for resume)
                new = [b for b in item["bad"] if _bad_key(b) not in st.bad_keys]
                n_new = int(acc.reduce(torch.tensor(float(len(new)), device=acc.device), "sum").item())
                if n_new:
                    from accelerate.utils import gather_object

                    for bad in gather_object(new) if acc.num_processes > 1 else new:
                        if _bad_key(bad) in st.bad_keys:
                            continue
                        st.bad_keys.add(_bad_key(bad))
                        st.bad_runtime.append(bad)
                        bar.write(f"stage {n}: skipped sample {bad.id}: {bad.reason}")
                        if st.log is not None:
                            st.log.event("bad_sample", stage=n, id=bad.id, kind=bad.kind, reason=bad.reason)
                check_bad_budget(
                    len(prepared.bad) + len(st.bad_runtime),
                    budget_total,
                    cfg.data.max_bad_fraction,
                    f"stage {n}",
                    st.bad_runtime,
                )
                inputs = item["inputs"]
                with acc.accumulate(*trained):
                    if inputs is None:  # every sample of this micro-batch was bad: join the collectives
                        loss = sum(p.sum() for p in params) * 0.0
                        out = None
                    elif head is not None:
                        llm = acc.unwrap_model(model).llm
                        out, loss, logged = logra.aligned_loss(
                            model, head, llm, inputs, item["extended"], logra.backward_scale(acc)
                        )
                        for key, value in logged.items():
                            align_parts.setdefault(key, []).append(value)
                    else:
                        out = model(**inputs, return_logits=False)  # logits only where labelled
                        loss = out.loss
                    finite = acc.reduce(
                        torch.tensor(float(torch.isfinite(loss.detach()).all()), device=acc.device), "min"
                    )
                    if finite.item() < 1.0:
                        last = st.last_checkpoint()
                        raise TrainingError(
                            f"stage {n}: the loss became {loss.item()} at step {st.step + 1} (epoch {st.epoch}, "
                            f"batch {st.batch}); last checkpoint: {last or 'none yet'}. Check the data, or "
                            f"lower train.stage{n}.lr (or train.max_grad_norm) and start over with --overwrite"
                        )
                    acc.backward(loss)
                    grad_norm = None
                    if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(params, cfg.train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if inputs is not None:
                    micro.append(loss.detach().float())
                    for key in parts:
                        value = getattr(out, key)
                        if value is not None:
                            parts[key].append(float(value.detach()))
                    step_samples += item["samples"]
                if not acc.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                scheduler.step()
                st.step += 1
                mean = torch.stack(micro).mean() if micro else torch.zeros((), device=acc.device)
                loss_value = float(acc.reduce(mean.to(acc.device), "mean"))
                samples = int(acc.reduce(torch.tensor(step_samples, device=acc.device), "sum"))
                st.samples_seen += samples
                losses.append(loss_value)
                elapsed = time.perf_counter() - t_stage
                rate = (st.samples_seen - seen_at_start) / max(elapsed, 1e-9)
                bar.update(loss_value, lr, rate)
                if st.log is not None and st.step % cfg.train.log_every == 0:
                    st.log.log(
                        {
                            "stage": n,
                            "step": st.step,
                            "epoch": st.epoch,
                            "loss": loss_value,
                            **{k: sum(v) / len(v) for k, v in parts.items() if v},
                            **{k: sum(v) / len(v) for k, v in align_parts.items() if v},
                            "lr": lr,
                            "grad_norm": float(grad_norm) if grad_norm is not None else None,
                            "samples": st.samples_seen,
                            "samples_per_s": rate,
                            "elapsed_s": elapsed,
                        }
                    )
                micro, step_samples = [], 0
                parts = {k: [] for k in parts}
                align_parts = {}
                done = st.step >= total
                if done or (cfg.train.save_every and st.step % cfg.train.save_every == 0):
                    st.save(model, optimizer, scheduler, tokenizer, names)
                if done:
                    break
                if stop_after is not None and st.step >= stop_after:
                    stopped = True
                    break
        if not stopped:
            if not _sharded(acc):  # sharded runs hold different shards by design
                _check_ranks_agree(st, params)
            st.save_final(model, tokenizer)
    finally:
        bar.close()
    result = StageResult(
        stage=n,
        folder=st.final,
        steps=st.step,
        losses=losses,
        bad=list(prepared.bad) + st.bad_runtime,
        seconds=time.perf_counter() - t0,
        completed=not stopped,
    )
    acc.free_memory()
    del model, optimizer
    return result


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

    if accelerator.is_main_process and not resuming:
        ck.start_run(out, config, overwrite=overwrite)
    elif accelerator.is_main_process:
        ck.repair_run_file(out, config)
    accelerator.wait_for_everyone()
    log = MetricsLog(out, cfg.train.tensorboard) if accelerator.is_main_process else None
    results = []
    try:
        for n in cfg.train.stages:
            st = _Stage(cfg, n, out, accelerator, log)
            if resuming and st.final.is_dir():
                try:
                    ck.verify_checkpoint(st.final, f"stage {n}'s final checkpoint")
                except ck.DamagedCheckpoint as exc:
                    raise CheckpointError(
                        f"{exc}; delete {st.final} and resume again: stage {n} is then finished again "
                        f"from its last checkpoint in {st.ckpt_root}"
                    ) from None
                say(f"stage {n}: already complete in {st.final}; skipping")
                continue
            for bad in prepared[n].bad:
                if log is not None:
                    log.event("bad_sample", stage=n, id=bad.id, kind=bad.kind, reason=bad.reason)
            init = _init_folder(cfg, out, n)
            result = _run_stage(st, prepared[n], tokenizer, init, resume=resuming, stop_after=stop_after)
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
