"""Resumable batch jobs: run `work(item)` over many items, appending each result to a JSONL journal.

What this file owns: the journal format and the run loop shared by LLM instruction generation
and the judge.

Notable choices:
- One JSON line per finished item, `{"key", "fingerprint", ...result}`, appended (and flushed)
  as soon as the item finishes, in completion order. A restart reads the journal and skips
  every key whose fingerprint matches, so a crash at item 9,000 of 10,000 resumes at 9,000.
  The fingerprint (e.g. the request's cache key) makes a journal written with another model or
  prompt count as not done instead of being silently reused.
- A torn last line (the process died mid-write) is cut off before appending; unparseable lines
  are ignored and counted.
- Items whose `work` raises DataError are failures of that item: counted, reported, not
  journaled (a re-run tries them again, from the reply cache when one is configured). Any
  other exception (LLMError: the endpoint is gone) cancels what has not started and propagates;
  everything already finished is in the journal. `client.RequestRejected` (the endpoint refused
  one request: HTTP 400 / 413 / 422) is an LLMError too; a caller that can do without that part
  of an item catches it inside `work` (the instruct generator fails that task and goes on).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DataError

T = TypeVar("T")


@dataclass
class BatchResult:
    """Journal records by key (earlier runs included), failures by key, and counts."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    resumed: int = 0
    new: int = 0
    torn_lines: int = 0


def read_journal(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Records by key (the last line wins) and the number of unreadable lines."""
    records: dict[str, dict[str, Any]] = {}
    bad = 0
    if not path.exists():
        return records, bad
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                records[record["key"]] = record
            else:
                bad += 1
    return records, bad


def _cut_torn_tail(path: Path) -> None:
    """Truncate a journal that does not end in a newline back to its last complete line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)


def run_batch(
    items: Iterable[tuple[str, T]],
    work: Callable[[T], Mapping[str, Any]],
    journal: Path | str,
    *,
    fingerprint: Callable[[T], str] = lambda _: "",
    concurrency: int = 4,
) -> BatchResult:
    """Run `work` on every (key, item) not already done in `journal`, `concurrency` at a time."""
    path = Path(journal)
    path.parent.mkdir(parents=True, exist_ok=True)
    done, torn = read_journal(path)
    _cut_torn_tail(path)
    result = BatchResult(torn_lines=torn)
    pending: list[tuple[str, T, str]] = []
    seen: set[str] = set()
    for key, item in items:
        if key in seen:
            continue
        seen.add(key)
        fp = fingerprint(item)
        record = done.get(key)
        if record is not None and record.get("fingerprint") == fp:
            result.records[key] = record
            result.resumed += 1
        else:
            pending.append((key, item, fp))
    if not pending:
        return result

    lock = threading.Lock()
    stop = threading.Event()
    with path.open("a", encoding="utf-8") as fh:

        def one(key: str, item: T, fp: str) -> None:
            if stop.is_set():  # another item failed hard: start nothing new
                return
            try:
                out = dict(work(item))
            except DataError as exc:
                with lock:
                    result.failed[key] = str(exc)
                return
            except BaseException:
                stop.set()
                raise
            record = {"key": key, "fingerprint": fp, **out}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            with lock:
                fh.write(line)
                fh.flush()
                result.records[key] = record
                result.new += 1

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [pool.submit(one, key, item, fp) for key, item, fp in pending]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
    return result
