"""Checkpoints on a pyarrow-filesystem URI: staged, uploaded, marked complete last."""

from __future__ import annotations

import pathlib

import pytest

from jobs.checkpoints import MARKER, RemoteCheckpoints, open_checkpoints


def writer(payload: bytes):
    def write(folder):
        (pathlib.Path(folder) / "trainer_state.pt").write_bytes(payload)
        (pathlib.Path(folder) / "sub").mkdir()
        (pathlib.Path(folder) / "sub" / "weights.bin").write_bytes(payload * 3)
    return write


def test_uri_checkpoints_upload_keep_last_and_download_the_newest(tmp_path):
    bucket = tmp_path / "bucket"
    checkpoints = open_checkpoints(f"file://{bucket}/run", keep_last=2, staging=tmp_path / "staging")
    assert isinstance(checkpoints, RemoteCheckpoints) and checkpoints.latest() is None
    for step in (1, 2, 3):
        assert checkpoints.save(step, writer(f"step {step}".encode())) == f"file://{bucket}/run/step-{step:06d}"
    assert checkpoints.complete() == ["step-000002", "step-000003"]  # keep_last=2 on the remote side
    assert not (bucket / "run" / "step-000001").exists()
    assert (bucket / "run" / "step-000003" / "sub" / "weights.bin").read_bytes() == b"step 3" * 3
    # an upload cut short (no marker) is never resumed from
    (bucket / "run" / "step-000004").mkdir()
    (bucket / "run" / "step-000004" / "trainer_state.pt").write_bytes(b"half")
    local = checkpoints.latest()
    assert local.is_dir() and (local / "trainer_state.pt").read_bytes() == b"step 3"
    assert (local / "sub" / "weights.bin").read_bytes() == b"step 3" * 3 and not (local / MARKER).exists()
    # saving step 4 again replaces the partial upload
    checkpoints.save(4, writer(b"step 4"))
    assert checkpoints.complete() == ["step-000003", "step-000004"]
    assert (bucket / "run" / "step-000004" / "trainer_state.pt").read_bytes() == b"step 4"


def test_a_failed_write_uploads_nothing(tmp_path):
    checkpoints = open_checkpoints(f"file://{tmp_path}/remote", keep_last=2, staging=tmp_path / "staging")
    checkpoints.save(1, writer(b"good"))

    def crash(folder):
        (pathlib.Path(folder) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError):
        checkpoints.save(2, crash)
    assert checkpoints.complete() == ["step-000001"]
    assert (checkpoints.latest() / "trainer_state.pt").read_bytes() == b"good"
