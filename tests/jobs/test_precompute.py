"""The reference as a pipeline stage and precomputed: the same log-probs and the same
losses as a reference model beside the policy."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from actors.reference import ReferenceWorker
from jobs.common import prepare_data
from jobs.offline import reference_stage
from jobs.precompute import precompute_reference
from jobs.run import run_job
from vlrlhf.config import load_spec
from vlrlhf.data.pipeline import EncodeSettings, collate_items, encode_record, EncodedItem
from vlrlhf.data.reader import read_records
from vlrlhf.data.shares import precomputed_table
from vlrlhf.data.synthetic import synthesize

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    synthesize(root, ("preference",), num_train=12, num_test=4, seed=2)
    return root


def spec_for(small, tiny_path, tmp_path, *overrides):
    return load_spec(ROOT / "configs" / "demo_dpo.yaml", [
        f"model.path={tiny_path('llava')}", f"data.train={small / 'preference.json'}",
        f"data.eval={small / 'test_preference.json'}", f"data.image_root={small}", f"checkpoint.dir={tmp_path / 'ck'}",
        "trainer.batch_size=4", "trainer.micro_batch_size=2", "reference.mode=precomputed", *overrides])


def test_precomputed_table_equals_a_live_reference_and_is_reused(ray_cluster, small, tiny_path, tmp_path):
    spec = spec_for(small, tiny_path, tmp_path)
    data = prepare_data(spec, tmp_path / "run")
    folder = precompute_reference(spec, data, lambda dataset: reference_stage(spec, dataset))
    table = precomputed_table(folder)
    records = read_records(str(small / "preference.json"), "plain_dpo") + \
        read_records(str(small / "test_preference.json"), "plain_dpo")
    assert sorted(table) == sorted(r.id for r in records)  # train and held-out
    live = ReferenceWorker(spec.model)
    settings = EncodeSettings(model_path=spec.model.path, task="preference", image_root=str(small))
    items = [EncodedItem(0, r.id, r, encode_record(live.adapter, r, settings)) for r in records[:5]]
    (out,) = live.logprobs([collate_items(live.adapter, items)])  # one micro-batch of 5: other padding
    for row, item in enumerate(items):
        chosen, rejected, chosen_length, rejected_length, corrupted = table[item.id]
        assert chosen == pytest.approx(float(out.chosen[row]), abs=1e-5)
        assert rejected == pytest.approx(float(out.rejected[row]), abs=1e-5)
        assert (chosen_length, rejected_length) == (int(out.chosen_lengths[row]), int(out.rejected_lengths[row]))
        assert math.isnan(corrupted)  # no mDPO: no corrupted-image log-prob
    written = (pathlib.Path(folder) / "_COMPLETE").stat().st_mtime_ns
    assert precompute_reference(spec, data, lambda dataset: 1 / 0) == folder  # reused: the stage is not run
    assert (pathlib.Path(folder) / "_COMPLETE").stat().st_mtime_ns == written
    changed = spec_for(small, tiny_path, tmp_path, "data.max_length=100")
    assert json.loads((pathlib.Path(folder) / "_manifest.json").read_text())["max_length"] == 128
    precompute_reference(changed, data, lambda dataset: reference_stage(changed, dataset))  # stale: rewritten
    assert json.loads((pathlib.Path(folder) / "_manifest.json").read_text())["max_length"] == 100


def train_losses(run_dir: pathlib.Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def test_reference_stage_precomputed_and_local_reference_give_the_same_losses(ray_cluster, small, tiny_path,
                                                                               tmp_path):
    """A reference model inside the policy worker (num_workers 0), a reference stage in the
    pipeline (an actor pool) and the precomputed table: the same losses step by step."""
    common = [f"model.path={tiny_path('llava')}", f"data.train={small / 'preference.json'}", "data.eval=[]",
              f"data.image_root={small}", "trainer.batch_size=4", "trainer.micro_batch_size=2",
              "trainer.max_steps=3", "resources.policy.cpus=0.5"]
    runs = {"local": ["reference.mode=separate"],
            "stage": ["reference.mode=separate", "resources.reference={num_workers: 1, cpus: 0.5}"],
            "precomputed": ["reference.mode=precomputed"]}
    losses = {}
    for name, extra in runs.items():
        run_dir = tmp_path / name
        assert run_job(str(ROOT / "configs" / "demo_dpo.yaml"), common + extra + [f"checkpoint.dir={run_dir / 'ck'}"],
                       run_dir=str(run_dir)) == 0
        losses[name] = train_losses(run_dir)
    assert len(losses["local"]) == 3
    for name in ("stage", "precomputed"):
        assert torch.allclose(torch.tensor(losses[name]), torch.tensor(losses["local"]), atol=1e-6), losses
