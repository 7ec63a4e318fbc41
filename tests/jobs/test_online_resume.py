"""Online runs resume exactly: a run stopped after a checkpoint and resumed gives the same
rewards and losses, step for step, as the run that was never stopped."""

from __future__ import annotations

import json
import pathlib

import pytest

from jobs.online import OnlineJob
from jobs.run import run_job
from tests.jobs.test_online import reward_model_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPES = ROOT / "data" / "shapes"
COMPARED = ("train/reward", "train/reward_std", "train/loss", "train/kl", "train/ratio", "train/grad_norm",
            "train/reference_kl", "train/trained_samples", "critic/value_loss", "train/reward_model")


class Killed(Exception):
    """The driver dies."""


def steps(run_dir: pathlib.Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "train/reward" in row}


def assert_same_steps(resumed: dict, uninterrupted: dict, numbers: list[int]) -> None:
    assert sorted(resumed) == numbers
    for step in numbers:
        keys = [k for k in COMPARED if k in uninterrupted[step]]
        assert "train/loss" in keys  # a step that trained
        assert {k: resumed[step][k] for k in keys} == pytest.approx({k: uninterrupted[step][k] for k in keys},
                                                                     rel=1e-6, abs=1e-7), step


def test_grpo_killed_after_a_checkpoint_resumes_exactly_across_an_epoch(ray_cluster, tmp_path, monkeypatch):
    """In-process roles, 10 prompts of 4 per step: steps 1-2 are epoch 0, steps 3-4 epoch 1 (a new
    order). The driver dies at step 3, after step 2's checkpoint; the resumed run must redo
    steps 3 and 4 as the uninterrupted run did (prompt order, sampling seeds, optimizer, RNG)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((SHAPES / "prompts.jsonl").read_text().splitlines(keepends=True)[:10]))
    base = ["trainer.max_steps=4", "online.prompts_per_step=4", "online.n=4", "trainer.lr=1e-3",
            f"data.train={prompts}", f"data.image_root={SHAPES}", "checkpoint.every=2", "checkpoint.resume=auto"]
    config = str(ROOT / "configs" / "demo_grpo.yaml")
    assert run_job(config, base + [f"checkpoint.dir={tmp_path / 'ck-full'}"], run_dir=str(tmp_path / "full")) == 0

    train_step = OnlineJob.train_step

    def dies_at_step_3(self, *args, **kwargs):
        if self.step == 2:
            raise Killed
        return train_step(self, *args, **kwargs)

    interrupted = base + [f"checkpoint.dir={tmp_path / 'ck'}"]
    with monkeypatch.context() as patch:
        patch.setattr(OnlineJob, "train_step", dies_at_step_3)
        with pytest.raises(Killed):
            run_job(config, interrupted, run_dir=str(tmp_path / "killed"))
    assert run_job(config, interrupted, run_dir=str(tmp_path / "resumed")) == 0  # checkpoint.resume=auto
    full = steps(tmp_path / "full")
    assert_same_steps(steps(tmp_path / "killed"), full, [1, 2])
    assert_same_steps(steps(tmp_path / "resumed"), full, [3, 4])
    assert full[3]["train/reward"] != full[1]["train/reward"]  # not a run that repeats itself anyway


def forbid_rows_in_the_driver(monkeypatch) -> None:
    """The driver process cannot read a data row, load an image or collate a batch: the online
    driver holds references, tokens and numbers; the workers do the rest (these patches do not
    reach their processes)."""
    import vlrlhf.data.images
    import vlrlhf.data.shares
    import vlrlhf.models.base

    def forbidden(*args, **kwargs):
        raise AssertionError("the online driver touched prompt rows, images or batches")

    monkeypatch.setattr(vlrlhf.data.shares, "load_rows", forbidden)
    monkeypatch.setattr(vlrlhf.data.images, "load_image", forbidden)
    monkeypatch.setattr(vlrlhf.models.base, "collate_examples", forbidden)


def test_async_ppo_on_ray_actors_resumes_exactly(ray_cluster, tmp_path, tiny_path, monkeypatch):
    """PPO with every role on Ray actors (policy, critic, reference, reward model, two rollout
    engines sharing each step's prompts) and asynchronous rollouts: step 2's checkpoint carries
    step 3's samples, drawn before step 2's update. Resuming from it in a new job with fresh
    actors repeats step 3 exactly. Neither job's driver reads a prompt, an image or a batch."""
    reward_model = reward_model_folder(tiny_path, tmp_path)
    forbid_rows_in_the_driver(monkeypatch)
    group = "{num_workers: 1, cpus: 0.3}"
    overrides = ["trainer.max_steps=3", "online.prompts_per_step=4", "online.async_rollout=true",
                 "checkpoint.every=2", "checkpoint.keep_last=3", "trainer.lr=1e-3",
                 f"online.reward_model={{path: {reward_model}, weight: 0.5}}",
                 *[f"resources.{role}={group}" for role in ("policy", "critic", "reference", "reward")],
                 "resources.rollout={num_workers: 2, cpus: 0.2}"]
    config = str(ROOT / "configs" / "demo_ppo.yaml")
    assert run_job(config, overrides + [f"checkpoint.dir={tmp_path / 'ck'}"], run_dir=str(tmp_path / "full")) == 0
    resume = [f"checkpoint.resume={tmp_path / 'ck' / 'step-000002'}", f"checkpoint.dir={tmp_path / 'ck-resumed'}"]
    assert run_job(config, overrides + resume, run_dir=str(tmp_path / "resumed")) == 0
    full = steps(tmp_path / "full")
    assert_same_steps(steps(tmp_path / "resumed"), full, [3])
    assert full[3]["train/approx_kl"] > 0  # step 3 trained on samples of the weights before step 2's update
