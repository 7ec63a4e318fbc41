"""Where records come from: files, globs, folders of shards and Hugging Face datasets.

    units = expand_sources(["train-*.parquet", "s3://bucket/rlaif-v/", "hf:openbmb/RLAIF-V-Dataset"])
    for number, row in read_unit(units[0]):
        ...

`expand_sources` turns what a spec names into read units: one per JSON/JSONL file,
one per row group of a Parquet file, one per Arrow file of a `save_to_disk` folder.
It reads only listings and Parquet footers. The rows themselves are read by
`read_unit`, inside Ray Data tasks (vlrlhf.data.pipeline), never in the driver.

Accepted: local paths and pyarrow filesystem URIs (s3://, gs://, file://) to a file,
a glob (`shards/*.parquet`), or a folder (every .json/.jsonl/.parquet below it, in
name order); a folder written by `datasets.Dataset.save_to_disk`; `hf:OWNER/NAME`,
a dataset in the local Hugging Face cache (no network: download it first with
`hf download --repo-type dataset OWNER/NAME`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import pathlib
from collections.abc import Iterator

SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclasses.dataclass(frozen=True)
class ReadUnit:
    """One task's worth of reading: a file, or one row group of a Parquet file."""

    path: str  # local path or URI
    kind: str  # json | jsonl | parquet | arrow
    part: int | None = None  # Parquet row group
    first_row: int = 1  # number of the unit's first row within its file

    @property
    def name(self) -> str:
        """The file name that record ids and error messages use ('name:row')."""
        return pathlib.PurePosixPath(self.path.split("?")[0]).name


def _filesystem(path: str):
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), str(pathlib.Path(path).resolve())


def _join(path: str, inner: str, base_inner: str) -> str:
    """The user-facing spelling of `inner` (a path inside the filesystem of `path`)."""
    if "://" not in path:
        return inner
    scheme = path.split("://", 1)[0]
    return f"{scheme}://{inner}" if scheme != "file" else f"file://{inner}"


def _listing(path: str, recursive: bool = True) -> list[str]:
    from pyarrow import fs

    filesystem, inner = _filesystem(path)
    infos = filesystem.get_file_info(fs.FileSelector(inner, recursive=recursive))
    return sorted(_join(path, info.path, inner) for info in infos if info.type == fs.FileType.File)


def _kind(path: str) -> str | None:
    suffix = pathlib.PurePosixPath(path.split("?")[0]).suffix.lower()
    return suffix[1:] if suffix in SUFFIXES else ("arrow" if suffix == ".arrow" else None)


def _hub_folder(name: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means: not in the local cache
        raise ValueError(f"hf:{name} is not in the local Hugging Face cache ({type(error).__name__}); download it "
                         f"first: hf download --repo-type dataset {name}") from None


def _saved_dataset_units(folder: str) -> list[ReadUnit] | None:
    """Units of a `save_to_disk` folder (state.json lists its Arrow files), else None."""
    from pyarrow import fs

    filesystem, inner = _filesystem(folder)
    state = filesystem.get_file_info(f"{inner}/state.json")
    if state.type != fs.FileType.File:
        if filesystem.get_file_info(f"{inner}/dataset_dict.json").type == fs.FileType.File:
            raise ValueError(f"{folder} is a DatasetDict saved with save_to_disk: name one split's folder, "
                             f"e.g. {folder}/train")
        return None
    with filesystem.open_input_stream(f"{inner}/state.json") as stream:
        files = [entry["filename"] for entry in json.loads(stream.read())["_data_files"]]
    base = folder.rstrip("/")
    return [ReadUnit(f"{base}/{name}", "arrow") for name in files]


def _parquet_units(path: str) -> list[ReadUnit]:
    import pyarrow.parquet as pq

    filesystem, inner = _filesystem(path)
    with filesystem.open_input_file(inner) as handle:
        metadata = pq.ParquetFile(handle).metadata
    units, first = [], 1
    for group in range(metadata.num_row_groups):
        units.append(ReadUnit(path, "parquet", group, first))
        first += metadata.row_group(group).num_rows
    return units or [ReadUnit(path, "parquet", None, 1)]


def _file_units(path: str) -> list[ReadUnit]:
    kind = _kind(path)
    if kind == "parquet":
        return _parquet_units(path)
    if kind is None:
        raise ValueError(f"{path}: unknown file type; use .json, .jsonl or .parquet (or a folder or a glob of them)")
    return [ReadUnit(path, kind)]


def expand_sources(paths: list[str] | str) -> list[ReadUnit]:
    """Every read unit of `paths`, in a stable order (the order of `paths`, then names)."""
    from pyarrow import fs

    units: list[ReadUnit] = []
    for path in [paths] if isinstance(paths, str) else paths:
        if path.startswith("hf:"):
            path = _hub_folder(path[3:])
        if any(char in path for char in "*?["):
            base = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0] or "."
            matches = [p for p in _listing(base) if fnmatch.fnmatch(p if "://" in path else str(pathlib.Path(p)),
                                                                     path if "://" in path else
                                                                     str(pathlib.Path(path).resolve()))]
            matches = [p for p in matches if _kind(p) in ("json", "jsonl", "parquet")]
            if not matches:
                raise ValueError(f"data file pattern {path} matches no .json/.jsonl/.parquet file")
            units += [u for match in matches for u in _file_units(match)]
            continue
        filesystem, inner = _filesystem(path)
        info = filesystem.get_file_info(inner)
        if info.type == fs.FileType.NotFound:
            raise ValueError(f"data file {path} does not exist")
        if info.type == fs.FileType.Directory:
            saved = _saved_dataset_units(path)
            if saved is not None:
                units += saved
                continue
            files = [p for p in _listing(path) if _kind(p) in ("json", "jsonl", "parquet")
                     and not pathlib.PurePosixPath(p).name.startswith((".", "_"))]
            if not files:
                raise ValueError(f"data folder {path} holds no .json/.jsonl/.parquet file")
            units += [u for file in files for u in _file_units(file)]
            continue
        units += _file_units(path)
    return units


def read_unit(unit: ReadUnit) -> Iterator[tuple[int, object]]:
    """(row number in its file, row) for every row of the unit; a row that cannot be
    parsed comes as a RecordError in place of the dict."""
    from vlrlhf.data.formats import read_rows

    if unit.kind in ("json", "jsonl"):
        yield from read_rows(unit.path)
        return
    filesystem, inner = _filesystem(unit.path)
    if unit.kind == "arrow":
        import pyarrow as pa

        with filesystem.open_input_file(inner) as handle:
            table = pa.ipc.open_stream(handle).read_all()
    else:
        import pyarrow.parquet as pq

        with filesystem.open_input_file(inner) as handle:
            parquet = pq.ParquetFile(handle)
            table = parquet.read_row_group(unit.part) if unit.part is not None else parquet.read()
    for offset, row in enumerate(table.to_pylist()):
        yield unit.first_row + offset, row
