"""Run folders and checkpoint folders: atomic writes, manifests, retention, RNG capture and seeding,
run identity.

Layout of a run folder (`train.output_dir`):

    run.json                  identity of the run (its resolved config), written when it starts
    config.yaml               the full resolved config
    metrics.jsonl             one JSON line per logged step (see progress.py)
    stage1/, stage2/          final checkpoint of each stage: what the next stage, eval and serve load
    checkpoints/stage{N}/step-00000040/    written by trainer.py through accelerate's save_state:
        model.safetensors     every trainable parameter (LoRA included), for an exact resume
        optimizer.bin, scheduler.bin, random_states_{rank}.pkl (one per process)
        custom_checkpoint_0.pkl   the trainer's counters (stage, step, epoch, batch, samples seen)
        custom_checkpoint_1.pkl   the bad samples met so far
        align_head.safetensors    the LoGra-Med head, when the stage trains it
        model/                a loadable model checkpoint (same format as stage{N}/)
        config.yaml
        manifest.json         size and SHA-256 of every other file (also in stage{N}/)

Notable choices:
- Every checkpoint folder is written to `.<name>.tmp` beside its final place and renamed when
  complete, so a crash leaves either the previous checkpoint or the new one, never half of one.
- Every checkpoint folder the trainer writes carries `manifest.json`: the size and SHA-256 of each
  file in it, written last (inside the temporary folder, so it exists only when every file does).
  Resume verifies it before reading anything, so a truncated file, a missing file, or a file whose
  bytes changed while its size and header stayed (a zeroed tail) is found and named; the trainer
  then falls back to the previous checkpoint and says so.
- A run folder belongs to one config: starting again without `--resume` or `--overwrite` is
  refused, and resuming with a different config names the keys that differ. The run folder's own
  location is not part of that identity: `run.json` stores `train.output_dir` as "." and any path
  inside the run relative to it, so a moved (or copied) run folder resumes from its new place.
- A damaged `run.json` (truncated by a crash or a full disk) is rebuilt from `config.yaml` beside
  it when that is intact, with a message; when both are unreadable the message says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
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
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "llava-ultra-manifest"
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


def tmp_of(final: Path) -> Path:
    """Where `final` is written before it is renamed into place."""
    return final.parent / f".{final.name}.tmp"


def fresh_dir(folder: Path) -> Path:
    """`folder`, emptied (a leftover of an interrupted write is removed) and created."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


@contextmanager
def atomic_dir(final: str | Path, *, manifest: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final` in one rename.

    With `manifest=True` the folder's `manifest.json` (sizes and SHA-256 of every file) is written
    after the caller's files and before the rename."""
    final = Path(final)
    tmp = fresh_dir(tmp_of(final))
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
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


# -------------------------------------------------------------------------------- manifests


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: Path) -> list[str]:
    """Every file under `folder` as a POSIX path relative to it (the manifest itself excluded)."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str | Path) -> Path:
    """Record the size and SHA-256 of every file in `folder` in `folder/manifest.json`."""
    folder = Path(folder)
    files = {
        rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}
        for rel in _files_of(folder)
    }
    path = folder / MANIFEST
    path.write_text(
        json.dumps({"format": MANIFEST_FORMAT, "version": 1, "files": files}, indent=1) + "\n",
        encoding="utf-8",
    )
    return path


def manifest_problems(folder: str | Path) -> list[str] | None:
    """What is wrong with `folder` against its manifest: [] when every file matches, None when the
    folder has no manifest (written before manifests existed; it cannot be verified)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a llava-ultra manifest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return [f"{MANIFEST} is damaged ({exc})"]
    problems = []
    for rel, want in sorted(files.items()):
        file = folder / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = file.stat().st_size
        if size != want.get("size"):
            problems.append(
                f"{rel} is {size} bytes, the manifest says {want.get('size')} (truncated or overwritten)"
            )
        elif _sha256(file) != want.get("sha256"):
            problems.append(
                f"{rel} has the right size but its SHA-256 differs from the manifest (its bytes were damaged)"
            )
    return problems


class DamagedCheckpoint(CheckpointError):
    """A checkpoint folder whose files are missing, truncated or changed (not a config mismatch)."""


def verify_checkpoint(folder: str | Path, what: str = "checkpoint", *, expect_manifest: bool = False) -> bool:
    """Raise DamagedCheckpoint naming each damaged file of `folder`; True when it was verified,
    False when it has no manifest to verify against (allowed unless `expect_manifest`)."""
    problems = manifest_problems(folder)
    if problems is None and expect_manifest:
        problems = [f"{MANIFEST} is missing"]
    if problems:
        raise DamagedCheckpoint(f"{what} {folder} is damaged: {'; '.join(problems)}")
    return problems is not None


# ------------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """The state of every RNG training draws from (python, numpy, torch CPU, CUDA if present); the
    encoder pretraining (pretrain.py) saves it. The two-stage trainer uses accelerate's save_state."""
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


def list_checkpoints(root: str | Path, marker: str = "trainer_state.json") -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (`step-*` folders holding `marker`: the trainer's are
    complete with their MANIFEST, the encoder pretraining's with trainer_state.json) as (step,
    folder), oldest first (temp folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / marker).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Every `step-*` folder under `root`, complete or not, oldest first (resume checks each)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())


def prune_checkpoints(root: str | Path, keep: int, marker: str = "trainer_state.json") -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (see `list_checkpoints`); returns the
    deleted folders."""
    ckpts = list_checkpoints(root, marker)
    doomed = [p for _, p in ckpts[: max(0, len(ckpts) - keep)]]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def check_readable(folder: Path, names: list[str]) -> None:
    """Read each named pickle of `folder` (small state files) and raise DamagedCheckpoint naming
    the first that is missing or cannot be read (a file written damaged, which its manifest matches)."""
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {name} is missing")
        try:
            torch.load(path, weights_only=False)
        except Exception as exc:  # truncated / damaged: pickle and torch raise their own kinds
            raise DamagedCheckpoint(
                f"checkpoint {folder} is damaged: {name} ({path.stat().st_size} bytes) cannot be read "
                f"({type(exc).__name__}: {str(exc)[:200]}); it is truncated or damaged"
            ) from None


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


def _in_run(value: Any, bases: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _in_run(v, bases) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_run(v, bases) for v in value]
    if isinstance(value, str):
        for base in bases:
            if value.rstrip("/" + os.sep) == base:
                return "."
            for sep in {"/", os.sep}:
                if value.startswith(base + sep):
                    return "./" + value[len(base) + 1 :].replace(os.sep, "/")
    return value


def run_identity(config: dict[str, Any], out: str | Path | None = None) -> dict[str, Any]:
    """`config` with the run folder's location taken out: `train.output_dir` becomes "." and every
    path inside the run folder becomes relative to it ("./stage1"). `out` defaults to the config's
    own `train.output_dir`; a config already made relative is returned unchanged."""
    recorded = (config.get("train") or {}).get("output_dir")
    out = recorded if out is None else out
    if out is None or str(out) == ".":
        return config
    base = str(out).rstrip("/" + os.sep)
    bases = tuple(dict.fromkeys(b for b in (base, str(Path(base).absolute())) if b))
    same = _in_run(config, bases)
    same.setdefault("train", {})["output_dir"] = "."
    return same


def read_run_file(out: Path) -> tuple[dict[str, Any], str | None]:
    """The run's record from `run.json` and None, or, when `run.json` is damaged, one rebuilt from
    `config.yaml` beside it and a note saying so. Both unreadable: ConfigError saying what to do."""
    path = out / RUN_FILE
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise ValueError("it holds no 'config' object")
        return run, None
    except (ValueError, UnicodeDecodeError) as exc:
        damage = f"{path} is damaged ({type(exc).__name__}: {exc}; {path.stat().st_size} bytes)"
    try:
        config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("it holds no config mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{damage}, and {out / 'config.yaml'} cannot be read either ({exc}), so the config this run "
            f"was started with is unknown. Restore run.json from a backup, or start a new run in "
            f"another output_dir (this folder's checkpoints are left as they are)"
        ) from None
    note = f"{damage}; using {out / 'config.yaml'} (the run's full config) instead, and rewriting run.json from it"
    return {"started": "?", "config": run_identity(config), "rebuilt_from": "config.yaml"}, note


def prepare_run_dir(
    out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool, notes: list[str] | None = None
) -> bool:
    """Check that `out` may hold this run; returns True when there is an earlier run to resume.

    - empty or new folder: a fresh run (with `--resume`, a note says so).
    - holds a run and neither flag: refused (ConfigError naming both flags).
    - `--overwrite`: the previous run's folder is deleted (only if it is a llava-ultra run).
    - `--resume`: the previous run's config must match (differences are listed); where the run
      folder lives is not compared, so a moved run folder resumes.
    Nothing is written here; call `start_run` (fresh) or `repair_run_file` (resume) on the main
    process afterwards. Messages for the user (not errors) are appended to `notes`.
    """
    notes = [] if notes is None else notes
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={out} is a file; choose a folder")
    if not out.is_dir() or not any(out.iterdir()):
        if resume:
            notes.append(f"--resume: {out} holds no run yet; starting a new run there from the first step")
        return False
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise ConfigError(
            f"train.output_dir={out} is not empty and holds no llava-ultra run ({RUN_FILE} missing); "
            f"choose an empty or new folder (it is never deleted, even with --overwrite)"
        )
    if overwrite:
        return False
    previous, note = read_run_file(out)
    if not resume:
        raise ConfigError(
            f"train.output_dir={out} already holds a run (started {previous.get('started', '?')}); "
            f"pass --resume to continue it, --overwrite to replace it, or choose another output_dir"
        )
    if note:
        notes.append(note)
    diffs = config_differences(run_identity(previous.get("config", {})), run_identity(config, out))
    if diffs:
        shown = "\n  ".join(diffs[:20])
        raise ConfigError(
            f"cannot resume {out}: it holds a run with a different config:\n  {shown}\n"
            f"resume with the original config ({out / 'config.yaml'} holds it), or start a new run in "
            f"another output_dir"
        )
    return True


def _write_run_file(out: Path, config: dict[str, Any], started: str) -> None:
    run = {"started": started, "config": run_identity(config, out)}
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / RUN_FILE)  # a crash leaves the old file or the new one, never half of one


def start_run(out: Path, config: dict[str, Any], *, overwrite: bool) -> None:
    """Create the run folder (deleting a previous run on overwrite) and record its identity."""
    if overwrite and (out / RUN_FILE).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_run_file(out, config, time.strftime("%Y-%m-%d %H:%M:%S"))
    write_config(out, config)


def repair_run_file(out: Path, config: dict[str, Any]) -> bool:
    """On resume: rewrite a damaged `run.json` (its config matched `config`); True if it was."""
    _, note = read_run_file(out)
    if note is None:
        return False
    _write_run_file(out, config, "?")
    return True
