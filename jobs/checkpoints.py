"""Checkpoint folders: step-N under checkpoint.dir, on local disk or a cloud URI.

Local (or a shared mount): the workers write into step-N.tmp, which is renamed to
step-N once complete; a crash mid-save leaves the last good step-N intact.

Cloud URIs (s3://, gs://, any pyarrow filesystem, file:// too): object stores have no
atomic rename, so the folder is staged on local disk, uploaded to step-N/, and a
_COMPLETE marker is written last. Only folders with the marker count; resuming
downloads the newest one to the staging area. A job survives losing the node (and
the disk) that wrote its checkpoints.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable

MARKER = "_COMPLETE"
STATE_FILE = "trainer_state.pt"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


class Checkpoints:
    """step-N folders under a local directory, written atomically (temp dir + rename)."""

    def __init__(self, directory: str, keep_last: int):
        self.root = pathlib.Path(directory)
        self.keep_last = keep_last

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

    def save(self, step: int, write: Callable[[str], object]) -> str:
        """`write(temp_folder)` fills the folder; it becomes step-N only once complete."""
        final = self.path(step)
        temp = final.with_name(final.name + ".tmp")
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        write(str(temp))
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)  # atomic on one filesystem: a crash leaves the last good step-N intact
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return str(final)


class RemoteCheckpoints:
    """step-N folders under a pyarrow-filesystem URI, staged locally, marked complete last."""

    def __init__(self, uri: str, keep_last: int, staging: pathlib.Path):
        from pyarrow import fs

        self.uri = uri.rstrip("/")
        self.filesystem, self.root = fs.FileSystem.from_uri(self.uri)
        self.keep_last = keep_last
        self.staging = Checkpoints(str(staging), keep_last=1)

    def path(self, step: int) -> str:
        return f"{self.uri}/{step_name(step)}"

    def local_path(self, step: int) -> pathlib.Path:
        """The staged copy of the newest save (the staging area keeps one)."""
        return self.staging.path(step)

    def complete(self) -> list[str]:
        """Names (step-N) of the uploaded folders that carry the marker, oldest first."""
        from pyarrow import fs

        listing = self.filesystem.get_file_info(fs.FileSelector(self.root, allow_not_found=True))
        names = sorted(info.base_name for info in listing
                       if info.type == fs.FileType.Directory and info.base_name.startswith("step-"))
        return [name for name in names
                if self.filesystem.get_file_info(f"{self.root}/{name}/{MARKER}").type == fs.FileType.File]

    def latest(self) -> pathlib.Path | None:
        """The newest complete checkpoint, downloaded to the staging area."""
        from pyarrow import fs

        found = self.complete()
        if not found:
            return None
        local = self.staging.root / f"resume-{found[-1]}"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        fs.copy_files(f"{self.root}/{found[-1]}", str(local), source_filesystem=self.filesystem,
                      destination_filesystem=fs.LocalFileSystem())
        (local / MARKER).unlink(missing_ok=True)
        return local

    def save(self, step: int, write: Callable[[str], object]) -> str:
        from pyarrow import fs

        local = pathlib.Path(self.staging.save(step, write))
        remote = f"{self.root}/{step_name(step)}"
        self.filesystem.delete_dir_contents(remote, missing_dir_ok=True)  # a half upload from a crashed run
        self.filesystem.create_dir(remote)
        fs.copy_files(str(local), remote, source_filesystem=fs.LocalFileSystem(),
                      destination_filesystem=self.filesystem)
        with self.filesystem.open_output_stream(f"{remote}/{MARKER}") as marker:
            marker.write(b"ok\n")
        for old in self.complete()[: -self.keep_last]:
            self.filesystem.delete_dir(f"{self.root}/{old}")
        return self.path(step)


def open_checkpoints(directory: str, keep_last: int, staging: pathlib.Path) -> Checkpoints | RemoteCheckpoints:
    """Local folder, or a URI (s3://, gs://, file://, ...) staged under `staging`."""
    if "://" in directory:
        return RemoteCheckpoints(directory, keep_last, staging)
    return Checkpoints(directory, keep_last)


def resume_from(spec, checkpoints: Checkpoints | RemoteCheckpoints) -> pathlib.Path | None:
    if spec.checkpoint.resume == "off":
        return None
    if spec.checkpoint.resume == "auto":
        return checkpoints.latest()
    path = pathlib.Path(spec.checkpoint.resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"checkpoint.resume={path}: not a vlrlhf checkpoint (no {STATE_FILE})")
    return path
