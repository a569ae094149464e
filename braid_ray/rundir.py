"""The run directory: every stage reads and writes one folder (local path, or s3:// / gs:// via pyarrow.fs).

Each stage lives in its own sub-folder with a ``stage.json`` that records the fingerprint of its
inputs and config. A stage whose fingerprint is unchanged is reused; one whose config changed is never
silently replaced: :class:`StageConflict` names the keys that differ, unless ``run.overwrite`` is set.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

if TYPE_CHECKING:
    from braid_ray.config import Config

T = TypeVar("T")
log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
PENDING_FILE = "stage.pending.json"
LOCK_FILE = ".lock"


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked; the message says why and how to recover."""


class StageConflict(RunDirError):
    """A stage exists in the run directory with a different config or different inputs."""


class StageCorrupt(RunDirError):
    """A file of a finished stage cannot be read (truncated, or not what the stage wrote)."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able object (config sections, upstream fingerprints, file hashes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_record(cfg: Config, sections: Iterable[str] = (), upstream: dict[str, str] | None = None,
                 drop: Iterable[str] = (), **inputs: Any) -> dict[str, Any]:
    """What identifies a stage's result, one rule for every stage of both domains: the config ``sections`` it
    reads (less the keys in ``drop``, which only change how it runs or what it logs), the fingerprints of the
    stages it reads (``upstream``), the seed, and any other inputs by name (resolved settings, file hashes).
    Where it runs (``ray``, ``run.device``, ``tracking``: workers, devices, logging) is never part of it."""
    drop = set(drop)
    record: dict[str, Any] = {s: {k: v for k, v in cfg.section(s)[s].items() if k not in drop} for s in sections}
    record.update(inputs)
    if upstream is not None:
        record["upstream"] = upstream
    record["seed"] = cfg.run.seed
    return record


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def diff_keys(old: Any, new: Any) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


class RunDir:
    """A run directory on any pyarrow filesystem."""

    def __init__(self, uri: str):
        if "://" not in uri:
            path = Path(uri).expanduser().resolve()
            if path.exists() and not path.is_dir():
                raise RunDirError(f"run.dir {path} is a file, not a directory: choose another run.dir")
            uri = str(path)
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.uri = uri

    def stage(self, name: str) -> Stage:
        return Stage(self, name)

    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def fingerprints(self, names: Iterable[str]) -> dict[str, str]:
        """The fingerprints of finished stages, by name: what a later stage records as its upstream."""
        out = {}
        for name in names:
            stage = self.stage(name)
            if not stage.exists(STAGE_FILE):
                raise RunDirError(f"{self.uri}/{name} has not finished: run its stage first")
            out[name] = stage.read_json(STAGE_FILE)["fingerprint"]
        return out

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process: a second run in the same directory stops at once with a
        message naming the holder (host, pid, since when), instead of both writing the same stages. An
        exclusive ``flock`` on ``<run.dir>/.lock``, released when the process ends however it ends. A bucket
        (s3://, gs://) has no such lock: one run at a time there is the user's to keep."""
        if not self.is_local():
            yield
            return
        root = Path(self.root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            handle = open(root / LOCK_FILE, "a+")
        except OSError as e:
            raise RunDirError(f"run.dir {root} cannot be written ({e.strerror}): choose another run.dir or fix "
                              "its permissions") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunDirBusy(f"run.dir {root} is in use by {holder}; wait for that run to end, or use "
                                 "another run.dir") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
            handle.flush()
            try:
                yield
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)


class Stage:
    """One stage's folder inside a run directory, with reuse bookkeeping."""

    def __init__(self, run: RunDir, name: str):
        self.run, self.name = run, name
        self.root = f"{run.root}/{name}"

    # ---- files
    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def local_path(self, name: str = "") -> Path:
        """A local filesystem path (only for local run directories, e.g. for Ray's storage_path)."""
        if not self.run.is_local():
            raise ValueError(f"{self.run.uri} is not a local directory")
        return Path(self.path(name) if name else self.root)

    def exists(self, name: str) -> bool:
        return self.run.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write atomically where the filesystem allows it (temp file + move), so a crash leaves no half file."""
        self.run.fs.create_dir(self.root, recursive=True)
        tmp = self.path(f".{name}.{os.getpid()}.tmp")  # per process: two writers never share a temp file
        with self.run.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.run.fs.move(tmp, self.path(name))

    def read_bytes(self, name: str) -> bytes:
        if not self.exists(name):
            raise FileNotFoundError(f"{self.run.uri}/{self.name}/{name} not found")
        with self.run.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())

    def load(self, name: str, parse: Callable[[bytes], T]) -> T:
        """``parse`` of a file of this stage; a file that cannot be parsed raises :class:`StageCorrupt` naming it
        and the way to recover."""
        data = self.read_bytes(name)
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - any parser's error means the same to the user: the file is bad
            raise StageCorrupt(f"{self.run.uri}/{self.name}/{name} cannot be read ({type(e).__name__}: {e}). "
                               f"Delete {self.run.uri}/{self.name}, or set run.overwrite=true, to rebuild "
                               "the stage.") from e

    def read_json(self, name: str) -> Any:
        return self.load(name, json.loads)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_yaml(self, name: str, obj: Any) -> None:
        self.write_text(name, yaml.safe_dump(obj, sort_keys=False))

    def write_parquet(self, name: str, frame: pd.DataFrame) -> None:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        self.write_bytes(name, buf.getvalue())

    def read_parquet(self, name: str) -> pd.DataFrame:
        return self.load(name, lambda data: pq.read_table(io.BytesIO(data)).to_pandas())

    # ---- reuse bookkeeping
    def once(self, record: dict[str, Any], cfg: Config, make: Callable[[], T], reuse: Callable[[], T]) -> T:
        """The stage's work, done once per ``record`` (see :func:`stage_record`): ``reuse()`` when a finished
        stage has the same record; otherwise ``make()``, which writes the stage's files (and may resume from an
        interrupted run's leftovers), then the run's ``config.yaml`` and the record (``stage.json``), last, so a
        crash never leaves a stage that looks finished. Another record is a :class:`StageConflict` unless
        ``run.overwrite`` is set."""
        if self.begin(record, cfg.run.overwrite):
            try:
                result = reuse()
            except StageCorrupt as e:
                if not cfg.run.overwrite:
                    raise
                log.warning("%s: rebuilding it (run.overwrite=true): %s", self.name, e)
                self.clear()
                self.begin(record, True)
            else:
                log.info("%s: reusing %s/%s (config and inputs unchanged)", self.name, self.run.uri, self.name)
                return result
        result = make()
        self.write_yaml("config.yaml", cfg.to_dict())
        self.finish(record)
        return result

    def begin(self, record: dict[str, Any], overwrite: bool) -> bool:
        """Start the stage for ``record`` (its config and inputs). Returns True if a finished stage with
        the same record can be reused. Leftovers of an interrupted run with the same record are kept
        (so the stage can resume from them); anything recorded with another record is a conflict."""
        fp = fingerprint(record)
        for marker in (STAGE_FILE, PENDING_FILE):
            if not self.exists(marker):
                continue
            try:
                old = self.read_json(marker)
            except StageCorrupt:
                if not overwrite:
                    raise
                self.clear()
                break
            if old.get("fingerprint") == fp:
                if marker == STAGE_FILE:
                    return True
                break
            if not overwrite:
                changes = "; ".join(diff_keys(old.get("record"), record)) or "inputs changed"
                raise StageConflict(
                    f"{self.run.uri}/{self.name} was made with a different config or inputs ({changes}). "
                    "Use a new run.dir, or set run.overwrite=true to replace this stage.")
            self.clear()
            break
        self.write_json(PENDING_FILE, {"fingerprint": fp, "record": record})
        return False

    def finish(self, record: dict[str, Any]) -> None:
        self.write_json(STAGE_FILE, {"fingerprint": fingerprint(record), "record": record,
                                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.run.fs.delete_file(self.path(PENDING_FILE))

    def clear(self) -> None:
        if self.run.fs.get_file_info(self.root).type == pafs.FileType.Directory:
            self.run.fs.delete_dir_contents(self.root)
