"""Checkpoint folders: step-N under checkpoint.dir, a shared folder or a cloud URI.

Checkpoints are written from where the weights are: the driver hands every writer
(the policy workers; rank 0 holds the full model, DeepSpeed ranks their partitions)
the destination, each writes on its own node and reports its files
(actors.storage.write_folder), and the driver commits the step only once every
reported file is there:

- a folder every node mounts: writers fill step-N.tmp, the driver renames it to
  step-N (atomic; a crash mid-save leaves the last good step-N intact). A folder that
  is not shared shows as missing files, and the save fails saying so.
- a URI (s3://, gs://, file://, any pyarrow filesystem): writers upload to step-N/
  and the driver writes the _COMPLETE manifest last (object stores have no rename).
  Only folders with the manifest count. Workers resume straight from the URI
  (WorkerBase.read_checkpoint downloads to their own node), so a job survives the
  loss of the node that wrote a checkpoint.

Saves happen every `checkpoint.every` steps and/or once `checkpoint.every_minutes`
passed since the last save (`due`), and at the end.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time
from collections.abc import Callable

from actors.storage import is_uri, missing_files, open_uri

MARKER = "_COMPLETE"
STATE_FILE = "trainer_state.pt"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


class CheckpointIncomplete(RuntimeError):
    """A writer reported files the destination does not hold."""


def manifest(step: int, reports: list) -> bytes:
    writers = [r for r in reports if isinstance(r, dict)]
    return json.dumps({"step": step, "time": time.time(), "writers": writers}, indent=1).encode()


def verify(reports: list, hint: str) -> None:
    """Every file every writer reported is where it said, seen from here (the driver)."""
    missing = {}
    for report in (r for r in reports if isinstance(r, dict)):
        if lost := missing_files(report):
            missing[report["node"]] = lost
    if missing:
        count = sum(len(v) for v in missing.values())
        example = next(iter(missing.values()))[0]
        raise CheckpointIncomplete(f"{count} checkpoint file(s) written on node(s) {sorted(missing)} are not where "
                                   f"the driver looks (e.g. {example}); {hint}")


class _Schedule:
    """When to save: every N steps and/or every M minutes since the last save."""

    last_saved: str | None = None  # the newest checkpoint this object committed
    saved_at: float  # time.monotonic() of the last save (or of opening)

    def _saved(self, path: str) -> None:
        self.last_saved, self.saved_at = path, time.monotonic()

    def due(self, step: int, spec) -> bool:
        """`spec`: the CheckpointSpec."""
        if spec.every and step % spec.every == 0:
            return True
        return bool(spec.every_minutes) and time.monotonic() - self.saved_at >= spec.every_minutes * 60


class Checkpoints(_Schedule):
    """step-N folders under a local or shared directory, committed by rename."""

    def __init__(self, directory: str, keep_last: int):
        self.root = pathlib.Path(directory)
        self.keep_last = keep_last
        self.saved_at = time.monotonic()

    def path(self, step: int) -> pathlib.Path:
        return self.root / step_name(step)

    def local_path(self, step: int) -> pathlib.Path:
        """Where step N lies on this machine."""
        return self.path(step)

    def complete(self) -> list[pathlib.Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file()
                      and not p.name.endswith(".tmp"))

    def latest(self) -> pathlib.Path | None:
        """The newest complete checkpoint, as a local folder."""
        found = self.complete()
        return found[-1] if found else None

    def resume_point(self) -> str | None:
        found = self.latest()
        return str(found) if found else None

    def save(self, step: int, write: Callable[[str], object]) -> str:
        """`write(temp_folder)` fills the folder (returning the writers' reports, see
        actors.storage.write_folder); it becomes step-N only once complete."""
        final = self.path(step)
        temp = final.with_name(final.name + ".tmp")
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        reports = write(str(temp))
        if isinstance(reports, list):
            verify(reports, "checkpoint.dir must be a folder every node mounts (a shared volume), "
                            "or a URI such as s3://bucket/run")
            (temp / MARKER).write_bytes(manifest(step, reports))
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)  # atomic on one filesystem: a crash leaves the last good step-N intact
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self._saved(str(final))
        return str(final)


class RemoteCheckpoints(_Schedule):
    """step-N folders under a pyarrow-filesystem URI, marked complete last."""

    def __init__(self, uri: str, keep_last: int, staging: pathlib.Path):
        self.uri = uri.rstrip("/")
        self.filesystem, self.root = open_uri(self.uri)
        self.keep_last = keep_last
        self.staging = pathlib.Path(staging)  # where this machine downloads copies (latest, local_path)
        self.saved_at = time.monotonic()

    def path(self, step: int) -> str:
        return f"{self.uri}/{step_name(step)}"

    def complete(self) -> list[str]:
        """Names (step-N) of the uploaded folders that carry the marker, oldest first."""
        from pyarrow import fs

        listing = self.filesystem.get_file_info(fs.FileSelector(self.root, allow_not_found=True))
        names = sorted(info.base_name for info in listing
                       if info.type == fs.FileType.Directory and info.base_name.startswith("step-"))
        return [name for name in names
                if self.filesystem.get_file_info(f"{self.root}/{name}/{MARKER}").type == fs.FileType.File]

    def resume_point(self) -> str | None:
        """The URI of the newest complete checkpoint (workers read it from there)."""
        found = self.complete()
        return f"{self.uri}/{found[-1]}" if found else None

    def download(self, name: str, local: pathlib.Path) -> pathlib.Path:
        from pyarrow import fs

        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        fs.copy_files(f"{self.root}/{name}", str(local), source_filesystem=self.filesystem,
                      destination_filesystem=fs.LocalFileSystem())
        (local / MARKER).unlink(missing_ok=True)
        return local

    def latest(self) -> pathlib.Path | None:
        """The newest complete checkpoint, downloaded to this machine's staging folder."""
        found = self.complete()
        return self.download(found[-1], self.staging / f"resume-{found[-1]}") if found else None

    def local_path(self, step: int) -> pathlib.Path:
        """A copy of step N on this machine (downloaded on first use)."""
        local = self.staging / step_name(step)
        return local if (local / STATE_FILE).is_file() else self.download(step_name(step), local)

    def save(self, step: int, write: Callable[[str], object]) -> str:
        """`write(uri)` has every writer upload its files to step-N/ and returns their reports;
        the manifest (_COMPLETE) goes last, once all of them are there."""
        remote = f"{self.root}/{step_name(step)}"
        self.filesystem.delete_dir_contents(remote, missing_dir_ok=True)  # a half upload from a crashed run
        reports = write(self.path(step))
        writers = [r for r in reports if isinstance(r, dict)] if isinstance(reports, list) else []
        if not any(r["files"] for r in writers):
            raise CheckpointIncomplete(f"{self.path(step)}: no writer reported any file")
        verify(writers, "an upload was lost")
        with self.filesystem.open_output_stream(f"{remote}/{MARKER}") as marker:
            marker.write(manifest(step, writers))
        for old in self.complete()[: -self.keep_last]:
            self.filesystem.delete_dir(f"{self.root}/{old}")
        self._saved(self.path(step))
        return self.path(step)


def open_checkpoints(directory: str, keep_last: int, staging: pathlib.Path) -> Checkpoints | RemoteCheckpoints:
    """Local or shared folder, or a URI (s3://, gs://, file://, ...); `staging`: where this
    machine keeps downloaded copies."""
    if is_uri(directory):
        return RemoteCheckpoints(directory, keep_last, staging)
    return Checkpoints(directory, keep_last)


def is_checkpoint(path: str) -> bool:
    """A complete checkpoint folder (local, shared or URI)."""
    if not is_uri(path):
        return (pathlib.Path(path) / STATE_FILE).is_file()
    from pyarrow import fs

    filesystem, root = open_uri(path)
    return filesystem.get_file_info(f"{root}/{STATE_FILE}").type == fs.FileType.File


def resume_from(spec, checkpoints: Checkpoints | RemoteCheckpoints) -> str | None:
    """What to resume from: a folder or URI the workers read (WorkerBase.read_checkpoint)."""
    if spec.checkpoint.resume == "off":
        return None
    if spec.checkpoint.resume == "auto":
        return checkpoints.resume_point()
    path = spec.checkpoint.resume
    if not is_checkpoint(path):
        raise ValueError(f"checkpoint.resume={path}: not a vlrlhf checkpoint (no {STATE_FILE})")
    return path
