"""Checkpoints written where the weights are: shared folders and URIs (file://, and S3 on loopback)."""

from __future__ import annotations

import json
import pathlib

import pytest

from actors.storage import local_copy, write_folder
from jobs.checkpoints import MARKER, CheckpointIncomplete, Checkpoints, RemoteCheckpoints, open_checkpoints
from tests.cluster.s3 import moto_server


def rank_writer(payload: bytes, ranks: int = 2, node_dirs: list[pathlib.Path] | None = None, monkeypatch=None):
    """What the driver's write callback does: every rank writes on its own node and reports its files
    (rank 0 the model and state, the others a partition each, as DeepSpeed ranks do)."""
    def write(destination: str) -> list[dict]:
        reports = []
        for rank in range(ranks):
            if node_dirs is not None:  # each rank stages on its own "disk"
                monkeypatch.setenv("VLRLHF_LOCAL_DIR", str(node_dirs[rank]))

            def fill(folder, rank=rank):
                if rank == 0:
                    (pathlib.Path(folder) / "trainer_state.pt").write_bytes(payload)
                (pathlib.Path(folder) / "shards").mkdir()
                (pathlib.Path(folder) / "shards" / f"rank{rank}.bin").write_bytes(payload * (rank + 2))
            reports.append(write_folder(destination, fill))
        return reports
    return write


def check_uri_checkpoints(uri: str, tmp_path: pathlib.Path, monkeypatch) -> RemoteCheckpoints:
    nodes = [tmp_path / "node-a", tmp_path / "node-b"]
    checkpoints = open_checkpoints(uri, keep_last=2, staging=tmp_path / "driver")
    assert isinstance(checkpoints, RemoteCheckpoints) and checkpoints.resume_point() is None
    for step in (1, 2, 3):
        saved = checkpoints.save(step, rank_writer(f"step {step}".encode(), node_dirs=nodes, monkeypatch=monkeypatch))
        assert saved == f"{uri}/step-{step:06d}" == checkpoints.last_saved
    assert checkpoints.complete() == ["step-000002", "step-000003"]  # keep_last=2
    assert checkpoints.resume_point() == f"{uri}/step-000003"
    # nothing was staged on the driver, and the writers' own staging folders are cleaned up
    assert not (tmp_path / "driver").exists() and not [f for p in nodes for f in p.rglob("*") if f.is_file()]
    assert all(p.is_dir() for p in nodes)  # ... which they did use
    with local_copy(checkpoints.resume_point()) as folder:  # what a worker on any node reads
        folder = pathlib.Path(folder)
        assert (folder / "trainer_state.pt").read_bytes() == b"step 3"
        assert (folder / "shards" / "rank1.bin").read_bytes() == b"step 3" * 3
        manifest = json.loads((folder / MARKER).read_bytes())
        assert [sorted(w["files"]) for w in manifest["writers"]] == [["shards/rank0.bin", "trainer_state.pt"],
                                                                      ["shards/rank1.bin"]]
    return checkpoints


def test_uri_checkpoints_are_written_by_the_workers_and_committed_last(tmp_path, monkeypatch):
    bucket = tmp_path / "bucket"
    checkpoints = check_uri_checkpoints(f"file://{bucket}/run", tmp_path, monkeypatch)
    # an upload cut short (no manifest) is never resumed from, and saving that step again replaces it
    (bucket / "run" / "step-000004").mkdir()
    (bucket / "run" / "step-000004" / "trainer_state.pt").write_bytes(b"half")
    assert checkpoints.resume_point().endswith("step-000003")
    local = checkpoints.latest()  # a copy on this machine
    assert (local / "trainer_state.pt").read_bytes() == b"step 3" and not (local / MARKER).exists()
    checkpoints.save(4, rank_writer(b"step 4"))
    assert checkpoints.complete() == ["step-000003", "step-000004"]
    assert (bucket / "run" / "step-000004" / "trainer_state.pt").read_bytes() == b"step 4"


def test_checkpoints_on_a_real_s3_api(tmp_path, monkeypatch):
    with moto_server("ckpt"):
        checkpoints = check_uri_checkpoints("s3://ckpt/runs/a", tmp_path, monkeypatch)
        assert checkpoints.local_path(3).joinpath("trainer_state.pt").read_bytes() == b"step 3"


def test_a_failed_or_lost_write_commits_nothing(tmp_path):
    checkpoints = open_checkpoints(f"file://{tmp_path}/remote", keep_last=2, staging=tmp_path / "staging")
    checkpoints.save(1, rank_writer(b"good"))

    def crash(destination):
        write_folder(destination, lambda folder: (pathlib.Path(folder) / "model.safetensors").write_bytes(b"half"))
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError):
        checkpoints.save(2, crash)

    def lost(destination):  # a writer reports a file that never arrived
        report = write_folder(destination, lambda folder: (pathlib.Path(folder) / "a.bin").write_bytes(b"a"))
        return [report | {"files": report["files"] | {"model.safetensors": 10}}]

    with pytest.raises(CheckpointIncomplete, match="model.safetensors"):
        checkpoints.save(2, lost)
    assert checkpoints.complete() == ["step-000001"]


def test_a_checkpoint_folder_that_is_not_shared_is_refused(tmp_path):
    """Rank 0 writes to checkpoint.dir on its own node; when the driver's node does not see that
    folder (no shared volume), the save fails saying so instead of committing an empty step."""
    checkpoints = Checkpoints(str(tmp_path / "ck"), keep_last=2)
    elsewhere = tmp_path / "other-node"

    def write(destination):  # the same path, on another machine's disk
        report = write_folder(str(elsewhere),
                              lambda folder: (pathlib.Path(folder) / "trainer_state.pt").write_bytes(b"x"))
        return [report | {"destination": destination}]

    with pytest.raises(CheckpointIncomplete, match="every node mounts"):
        checkpoints.save(1, write)
    assert checkpoints.complete() == []
    assert checkpoints.save(1, rank_writer(b"ok")) == str(tmp_path / "ck" / "step-000001")
    assert (tmp_path / "ck" / "step-000001" / "shards" / "rank1.bin").read_bytes() == b"ok" * 3


def test_saves_are_due_by_steps_or_by_minutes(tmp_path, monkeypatch):
    from vlrlhf.config import CheckpointSpec

    clock = [1000.0]
    monkeypatch.setattr("jobs.checkpoints.time.monotonic", lambda: clock[0])
    checkpoints = Checkpoints(str(tmp_path), keep_last=2)
    by_steps, by_time = CheckpointSpec(every=3, every_minutes=0), CheckpointSpec(every=0, every_minutes=10)
    assert [s for s in range(1, 10) if checkpoints.due(s, by_steps)] == [3, 6, 9]
    assert not checkpoints.due(1, by_time)
    clock[0] += 601
    assert checkpoints.due(2, by_time)
    checkpoints.save(2, rank_writer(b"x"))
    assert not checkpoints.due(3, by_time)  # the clock restarts at each save
    assert CheckpointSpec().every_minutes == 30  # a crash loses at most half an hour by default
