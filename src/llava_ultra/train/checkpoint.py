"""Run folders and resumable checkpoints: atomic writes, retention, RNG capture, run identity.

Layout of a run folder (`train.output_dir`):

    run.json                  identity of the run (its resolved config), written when it starts
    config.yaml               the full resolved config
    metrics.jsonl             one JSON line per logged step (see progress.py)
    stage1/, stage2/          final checkpoint of each stage: what the next stage, eval and serve load
    checkpoints/stage{N}/step-00000040/
        model/                a loadable model checkpoint (same format as stage{N}/)
        trainables.safetensors  every trainable parameter (LoRA included), for an exact resume
        optimizer.pt, scheduler.pt, trainer_state.json, rng_state.pt, config.yaml

Notable choices:
- Every checkpoint folder is written to `.<name>.tmp` beside its final place and renamed when
  complete, so a crash leaves either the previous checkpoint or the new one, never half of one.
- The trainables are saved by name from a state dict the caller gathered with
  `accelerator.get_state_dict` (a collective that assembles FSDP / ZeRO-3 shards), so this file
  never touches sharded parameters.
- RNG states (python, numpy, torch CPU and CUDA) are captured per process and stored together.
- A run folder belongs to one config: starting again without `--resume` or `--overwrite` is
  refused, and resuming with a different config names the keys that differ.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..errors import CheckpointError, ConfigError

RUN_FILE = "run.json"
STEP_RE = re.compile(r"^step-(\d{8})$")
# Settings that may change between a run and its resumption without changing its result.
RESUMABLE_KEYS = (
    "data.num_workers",
    "train.progress",
    "train.tensorboard",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
)


# ---------------------------------------------------------------------------------- atomicity


def _tmp_of(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final` in one rename."""
    final = Path(final)
    tmp = _tmp_of(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a completed temporary folder into place (replacing an older `final`)."""
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


# ------------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """The state of every RNG training draws from (python, numpy, torch CPU, CUDA if present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo `capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ checkpoints


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, folder), oldest first (temp folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns the deleted folders."""
    ckpts = list_checkpoints(root)
    doomed = [p for _, p in ckpts[: max(0, len(ckpts) - keep)]]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def write_state_files(
    folder: Path,
    *,
    trainables: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    scheduler_state: dict,
    trainer_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
) -> None:
    """Write the resumable part of a checkpoint into `folder` (main process only)."""
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().contiguous().cpu() for k, v in trainables.items()}, folder / "trainables.safetensors"
    )
    if optimizer_state is not None:
        torch.save(optimizer_state, folder / "optimizer.pt")
    torch.save(scheduler_state, folder / "scheduler.pt")
    torch.save(rng_states, folder / "rng_state.pt")
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")


def read_state_files(folder: Path, with_optimizer: bool = True) -> dict[str, Any]:
    """Everything `write_state_files` wrote (tensors on CPU). `with_optimizer=False` leaves the
    optimiser state unread (None): FSDP processes other than the main one get it broadcast."""
    from safetensors.torch import load_file

    needed = ["trainables.safetensors", "scheduler.pt", "rng_state.pt", "trainer_state.json"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); delete it to resume "
            f"from the previous one"
        )
    opt = folder / "optimizer.pt"
    return {
        "trainables": load_file(str(folder / "trainables.safetensors")),
        "optimizer": torch.load(opt, weights_only=False) if with_optimizer and opt.is_file() else None,
        "scheduler": torch.load(folder / "scheduler.pt", weights_only=False),
        "rng": torch.load(folder / "rng_state.pt", weights_only=False),
        "trainer": json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")),
    }


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """The full resolved config as YAML beside a checkpoint."""
    (folder / "config.yaml").write_text(
        yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )


# --------------------------------------------------------------------------------- run folder


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (ignoring settings that do not change the result)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_KEYS)
    ]


def prepare_run_dir(out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
    """Check that `out` may hold this run; returns True when there is an earlier run to resume.

    - empty or new folder: a fresh run.
    - holds a run and neither flag: refused (ConfigError naming both flags).
    - `--overwrite`: the previous run's folder is deleted (only if it is a llava-ultra run).
    - `--resume`: the previous run's config must match (differences are listed).
    Nothing is written here; call `start_run` on the main process afterwards.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={out} is a file; choose a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise ConfigError(
            f"train.output_dir={out} is not empty and holds no llava-ultra run ({RUN_FILE} missing); "
            f"choose an empty or new folder (it is never deleted, even with --overwrite)"
        )
    previous = json.loads(run_file.read_text(encoding="utf-8"))
    if overwrite:
        return False
    if not resume:
        raise ConfigError(
            f"train.output_dir={out} already holds a run (started {previous.get('started', '?')}); "
            f"pass --resume to continue it, --overwrite to replace it, or choose another output_dir"
        )
    diffs = config_differences(previous.get("config", {}), config)
    if diffs:
        shown = "\n  ".join(diffs[:20])
        raise ConfigError(
            f"cannot resume {out}: it holds a run with a different config:\n  {shown}\n"
            f"resume with the original config, or pass --overwrite to start over"
        )
    return True


def start_run(out: Path, config: dict[str, Any], *, overwrite: bool) -> None:
    """Create the run folder (deleting a previous run on overwrite) and record its identity."""
    if overwrite and (out / RUN_FILE).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config}
    (out / RUN_FILE).write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_config(out, config)
