"""Nothing read from a file runs code: crafted checkpoints and reference tables whose pickles
would create a file are refused, and the file is not created."""

from __future__ import annotations

import json
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

from actors.common import UnsafeStateError, load_state_file, rng_state, set_rng_state


class Planted:
    """A pickle payload: unpickled by a plain loader it creates `path` (any code could run there)."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_a_state_file_is_tensors_and_plain_values_and_round_trips_the_rng(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    state = {"step": 7, "rng": rng_state(), "spec": {"trainer": {"seed": 0}, "keep": (0.1, 0.2)},
             "optimizer": torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]).state_dict()}
    torch.save(state, tmp_path / "trainer_state.pt")
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    loaded = load_state_file(tmp_path / "trainer_state.pt")
    set_rng_state(loaded["rng"])  # the same draws again
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert __import__("random").random() == expected[2]
    assert loaded["step"] == 7 and loaded["spec"] == state["spec"]


def test_a_crafted_checkpoint_is_refused_before_its_pickle_runs(tmp_path):
    marker = tmp_path / "planted"
    torch.save({"step": 1, "rng": Planted(marker)}, tmp_path / "trainer_state.pt")
    with pytest.raises(UnsafeStateError, match="refused to load.*could run code"):
        load_state_file(tmp_path / "trainer_state.pt")
    assert not marker.exists()
    # what the previous version wrote (NumPy's RNG state as a NumPy array): refused with the way out
    torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, tmp_path / "old.pt")
    with pytest.raises(UnsafeStateError, match=r"start a new run from its weights"):
        load_state_file(tmp_path / "old.pt")


def test_the_policy_and_the_critic_read_their_state_through_the_safe_loader(tiny_path, tmp_path):
    """The roles' own load paths, on a crafted folder: refused, nothing created."""
    from actors.critic import STATE_FILE, CriticWorker
    from actors.policy import PolicyWorker
    from vlrlhf.config import load_spec

    root = pathlib.Path(__file__).resolve().parents[2]
    spec = load_spec(root / "configs" / "demo_ppo.yaml", [f"model.path={tiny_path('llava')}"])
    policy = PolicyWorker(spec.model, spec.algorithm, spec.trainer, 4, spec.online)
    policy.setup_distributed("127.0.0.1", 0, 0, 1)
    folder = tmp_path / "step-000002"
    policy.save(str(folder), {"epoch": 0})
    marker = tmp_path / "planted"
    torch.save({"step": 2, "rng": Planted(marker)}, folder / "trainer_state.pt")
    with pytest.raises(UnsafeStateError):
        policy.load_state(str(folder))
    critic = CriticWorker(spec.model, spec.online.critic, spec.trainer, 4)
    critic.save(str(folder / "critic"))
    torch.save({"optimizer": Planted(marker)}, folder / "critic" / STATE_FILE)
    with pytest.raises(UnsafeStateError):
        critic.load_state(str(folder / "critic"))
    assert not marker.exists()


def test_an_online_checkpoint_of_the_earlier_pickle_format_is_refused(tmp_path):
    from jobs.online import ONLINE_STATE, read_online_state

    marker = tmp_path / "planted"
    folder = tmp_path / "step-000004"
    folder.mkdir()
    (folder / "online_state.pt").write_bytes(pickle.dumps({"step": Planted(marker)}))
    with pytest.raises(ValueError, match=r"no online_state.json.*pickle, which is not read"):
        read_online_state(str(folder))
    assert not marker.exists()
    (folder / ONLINE_STATE).write_text(json.dumps({"step": 4}))  # JSON: data only
    assert read_online_state(str(folder)) == {"step": 4}


def test_a_precomputed_reference_table_of_pickles_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlrlhf.data.shares import precomputed_table

    marker = tmp_path / "planted"
    crafted = tmp_path / "reference_logps" / "pairs"
    crafted.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a.json:1"], "reference": [pickle.dumps(Planted(marker))]}),
                   crafted / "part-0.parquet")
    with pytest.raises(ValueError, match="not a list of floats: refused"):
        precomputed_table(str(tmp_path / "reference_logps"))
    assert not marker.exists()
    good = tmp_path / "good"
    good.mkdir()
    pq.write_table(pa.table({"id": ["a.json:1"], "reference": [[-1.5, -2.5, 3.0, 4.0, float("nan")]]}),
                   good / "part-0.parquet")
    assert precomputed_table(str(good))["a.json:1"][:4] == [-1.5, -2.5, 3.0, 4.0]


def test_a_crafted_deepspeed_state_file_is_refused_and_its_own_classes_load(tmp_path):
    """DeepSpeed's files go through our loader (torch's restricted unpickler + the classes a ZeRO
    checkpoint names); tests/jobs/test_deepspeed.py resumes a real ZeRO-2 run through it."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from actors.deepspeed_engine import load_engine_file

    marker = tmp_path / "planted"
    torch.save({"optimizer_state_dict": {"loss_scaler": Planted(marker)}}, tmp_path / "optim_states.pt")
    with pytest.raises(UnsafeStateError, match="refused to load"):
        load_engine_file(str(tmp_path / "optim_states.pt"))
    assert not marker.exists()
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)},
               tmp_path / "genuine.pt")
    loaded = load_engine_file(str(tmp_path / "genuine.pt"))
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
