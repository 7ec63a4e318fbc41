"""Checkpoint folders written from where the weights are, read back where they are needed.

A destination is a path every node sees (a shared volume) or a URI of any pyarrow
filesystem (s3://, gs://, file://). A writer fills a folder on its own node and
moves it there: renamed into a shared folder, uploaded to a URI. It returns what it
wrote ({relative path: bytes}), so the driver commits a checkpoint only once every
writer's files are there (jobs.checkpoints).

Local staging goes to VLRLHF_LOCAL_DIR, else the system temp folder (TMPDIR).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def open_uri(uri: str):
    """(pyarrow filesystem, path inside it) of a URI."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(str(uri).rstrip("/"))


def local_root() -> pathlib.Path:
    root = pathlib.Path(os.environ.get("VLRLHF_LOCAL_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


def node_name() -> str:
    """The Ray node this process runs on (the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - any Ray state problem: fall back to the host
        pass
    return socket.gethostname()


def listing(folder: pathlib.Path) -> dict[str, int]:
    """{relative path: size} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def write_folder(destination: str, fill: Callable[[str], object]) -> dict:
    """`fill(folder)` writes files into a fresh folder on this node; they then go to
    `destination` (created if needed; files of other writers there are kept)."""
    if is_uri(destination):
        from pyarrow import fs

        staging = pathlib.Path(tempfile.mkdtemp(prefix="vlrlhf-write-", dir=local_root()))
        try:
            fill(str(staging))
            files = listing(staging)
            filesystem, root = open_uri(destination)
            filesystem.create_dir(root, recursive=True)
            fs.copy_files(str(staging), root, source_filesystem=fs.LocalFileSystem(),
                          destination_filesystem=filesystem, use_threads=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        # beside the destination (same filesystem): each file is renamed into place, so a
        # writer's list is exactly its own files even with other ranks writing alongside
        target = pathlib.Path(destination)
        target.mkdir(parents=True, exist_ok=True)
        staging = target / f".writer-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            fill(str(staging))
            files = listing(staging)
            for relative in files:
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / relative, target / relative)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"node": node_name(), "destination": str(destination), "files": files}


def missing_files(report: dict) -> list[str]:
    """Files a writer reported (write_folder) that its destination does not hold, or holds at
    another size: seen from this process, so on the driver a folder that is not shared shows here."""
    destination, expected = report["destination"], report["files"]
    if is_uri(destination):
        from pyarrow import fs

        filesystem, root = open_uri(destination)
        infos = filesystem.get_file_info([f"{root}/{name}" for name in expected])
        found = {name: info.size for name, info in zip(expected, infos, strict=True) if info.type == fs.FileType.File}
    else:
        target = pathlib.Path(destination)
        found = {name: (target / name).stat().st_size for name in expected if (target / name).is_file()}
    return [f"{destination}/{name}" for name, size in expected.items() if found.get(name) != size]


@contextlib.contextmanager
def local_copy(source: str) -> Iterator[str]:
    """A folder on this node with the contents of `source` (downloaded when it is a URI,
    deleted afterwards); a local path is used as it is."""
    if not is_uri(source):
        yield str(source)
        return
    from pyarrow import fs

    folder = pathlib.Path(tempfile.mkdtemp(prefix="vlrlhf-read-", dir=local_root()))
    try:
        filesystem, root = open_uri(source)
        fs.copy_files(root, str(folder), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem(),
                      use_threads=True)
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
