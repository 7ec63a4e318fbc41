"""Online RL: the policy-gradient micro-step by hand, and GRPO / RLOO runs through `vlrlhf run`."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from actors.common import load_state_file
from actors.rollout import Sample, Sampling, TransformersEngine
from vlrlhf.rows import Row, collate_rl, rl_example
from jobs.run import run_job
from tests.actors.rollout_check import request
from vlrlhf.config import OnlineSpec
from vlrlhf.training import rl_micro_step

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_rl_micro_step_at_ratio_one_is_the_token_weighted_advantage(tiny_path):
    engine = TransformersEngine(str(tiny_path("llava")))
    req = request("red")
    prompt = engine.adapter.encode_prompt(req["messages"], req["images"])
    samples = engine.generate([req], Sampling(n=3, temperature=1.0, max_tokens=5, seed=1))
    advantages = [1.0, -0.5, 2.0]
    rows = [Row(rl_example(prompt, s.token_ids), 0, s.logprobs, advantages=[a] * s.length)
            for s, a in zip(samples, advantages, strict=True)]
    batch = collate_rl(engine.adapter, rows)
    lengths = [s.length for s in samples]
    online = OnlineSpec(rewards=[{"function": "exact_match"}], kl_coef=0.5)
    engine.model.train()
    loss, metrics = rl_micro_step(engine.adapter, engine.model, batch, None, online, float(sum(lengths)))
    # behaviour log-probs == current log-probs: ratio 1, no clipping; loss = -sum_i A_i |y_i| / sum_i |y_i|
    expected = -sum(a * n for a, n in zip(advantages, lengths, strict=True)) / sum(lengths)
    assert float(loss) == pytest.approx(expected, abs=1e-4)
    assert metrics["clip_fraction_sum"] == 0.0 and metrics["count"] == sum(lengths)
    # the KL term: against itself it is 0; against a shifted reference, k3 summed over tokens
    ref = engine.adapter.rollout_logprobs(engine.model, batch.batch).detach()
    same, _ = rl_micro_step(engine.adapter, engine.model, batch, ref, online, float(sum(lengths)))
    assert float(same) == pytest.approx(expected, abs=1e-4)
    shifted = ref - 0.1 * batch.batch.loss_mask
    kl_loss, kl_metrics = rl_micro_step(engine.adapter, engine.model, batch, shifted, online, float(sum(lengths)))
    k3 = math.exp(-0.1) - 1 + 0.1  # (r - 1) - log r with log r = -0.1 on every completion token
    assert kl_metrics["kl_sum"] == pytest.approx(k3 * sum(lengths), rel=1e-3)
    assert float(kl_loss) == pytest.approx(expected + 0.5 * k3, abs=1e-4)


def test_samples_become_rows_with_labels_on_the_completion_only(tiny_path):
    engine = TransformersEngine(str(tiny_path("qwen2_vl")))
    req = request("blue")
    prompt = engine.adapter.encode_prompt(req["messages"], req["images"])
    sample = Sample(0, [5, 6, 7], [-0.1, -0.2, -0.3], "length", "")
    row = rl_example(prompt, sample.token_ids)
    batch = collate_rl(engine.adapter, [Row(row, 0, sample.logprobs, advantages=[1.0, 2.0, 3.0])])
    assert batch.batch.loss_mask[0].nonzero().flatten().tolist() == [len(prompt.input_ids) + i for i in range(3)]
    assert batch.old_logps[0, len(prompt.input_ids):].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.advantages[0, len(prompt.input_ids):].tolist() == [1.0, 2.0, 3.0]
    assert float(batch.advantages.abs().sum()) == 6.0 and batch.ref_logps is None  # nothing off the completion
    assert all(len(v) == len(row.input_ids) for v in row.token_arrays.values())


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_online_smoke_run(ray_cluster, tmp_path, algorithm):
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=2", f"algorithm.name={algorithm}", f"checkpoint.dir={tmp_path / 'ck'}",
                 "online.prompts_per_step=4"]
    if algorithm == "grpo":  # benchmarks during training: after step 1, on its checkpoint, in the driver
        overrides.append(f"evaluation={{benchmarks: [shapes], data: {ROOT / 'data' / 'shapes'}, limit: 12, "
                         "max_new_tokens: 6, every_steps: 1, resources: {num_workers: 0}}")
    assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if algorithm == "grpo":
        (logged,) = [row for row in rows if "bench/shapes" in row]
        scores = json.loads((run_dir / "eval" / "step-000001" / "scores.json").read_text())["benchmarks"]["shapes"]
        assert logged["step"] == 1 and logged["bench/shapes"] == scores["metrics"][scores["headline"]]
        assert scores["counts"]["items"] == 12 and (tmp_path / "ck" / "step-000001").is_dir()
        assert (run_dir / "eval" / "scores.json").is_file()  # and the final checkpoint's
    steps = [row for row in rows if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert all(math.isfinite(row["train/reward"]) and row["time/rollout_s"] > 0 for row in steps)
    # each term's mean is logged; both weights are 1 in demo_grpo.yaml: they add up to the reward
    assert all(row["train/reward"] == pytest.approx(row["train/rewards/exact_match"]
                                                    + row["train/rewards/length_penalty"], abs=1e-6) for row in steps)
    assert any("train/loss" in row and row["train/synced_tensors"] > 0 for row in steps)  # trained and synced
    # every update scored its rows with the group forward: a prompt's 8 completions in one packed row
    assert all(row["train/packed_share"] == 1.0 for row in steps if "train/loss" in row)
    assert (tmp_path / "ck" / "step-000002" / "model.safetensors").is_file()
    assert load_state_file(tmp_path / "ck" / "step-000002" / "trainer_state.pt")["step"] == 2


def test_online_section_goes_with_the_online_algorithms():
    from vlrlhf.config import SpecError, load_spec

    with pytest.raises(SpecError, match="online section is required"):
        load_spec(ROOT / "configs" / "demo_grpo.yaml", ["online=null"])
    with pytest.raises(SpecError, match="online section is required"):
        load_spec(ROOT / "configs" / "demo_grpo.yaml", ["algorithm.name=dpo"])
    with pytest.raises(SpecError, match="online.n: Input should be greater than or equal to 2"):
        load_spec(ROOT / "configs" / "demo_grpo.yaml", ["online.n=1"])


def brute_gae(rewards, values, gamma, lam):
    """GAE over one completion, written out: A_t = sum_k (gamma lam)^k delta_{t+k}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


KL_TERMS = {"k1": lambda lr: -lr, "k2": lambda lr: 0.5 * lr ** 2,  # of log r = ref - logp, by hand
            "k3": lambda lr: math.exp(lr) - 1 - lr}


@pytest.mark.parametrize("estimator", [None, "k2", "k3"])
def test_ppo_advantages_are_whitened_gae_of_kl_shaped_rewards(estimator):
    from jobs.online import advantages_for

    online = OnlineSpec(rewards=[{"function": "exact_match"}], n=2, kl_coef=0.1, gamma=0.9, lam=0.8,
                        kl_estimator=estimator)
    kl = KL_TERMS[estimator or "k1"]  # the reward's default is k1
    rows = [Row(None, 0, [-0.5, -1.0, -0.2], ref_logprobs=[-0.7, -0.9, -0.2], values=[0.1, 0.2, 0.3]),
            Row(None, 0, [-2.0, -0.1], ref_logprobs=[-1.0, -0.3], values=[-0.4, 0.5])]
    scores = torch.tensor([1.0, -0.5])
    advantages, returns = advantages_for("ppo", online, scores, rows)
    raw, targets = [], []
    for row, score in zip(rows, scores.tolist(), strict=True):
        rewards = [-0.1 * kl(ref - lp) for lp, ref in zip(row.logprobs, row.ref_logprobs, strict=True)]
        rewards[-1] += score  # the sequence score on the last token
        gae = brute_gae(rewards, row.values, 0.9, 0.8)
        raw.append(gae)
        targets.append([a + v for a, v in zip(gae, row.values, strict=True)])
    flat = torch.tensor([a for r in raw for a in r], dtype=torch.float64)
    whitened = ((flat - flat.mean()) / flat.std(unbiased=False)).tolist()
    assert [a for r in advantages for a in r] == pytest.approx(whitened, abs=1e-4)
    assert returns == [pytest.approx(t, abs=1e-5) for t in targets]
    # GRPO: the group-normalised score on every token of the completion, no returns
    grpo, none = advantages_for("grpo", online, scores, rows)
    # mean 0.25; unbiased std of {1, -0.5}: sqrt(2 * 0.75^2 / 1) = sqrt(1.125)
    assert none is None and grpo[0] == pytest.approx([0.75 / math.sqrt(1.125)] * 3, abs=1e-4)
    assert grpo[1] == pytest.approx([-0.75 / math.sqrt(1.125)] * 2, abs=1e-4)


def reward_model_folder(tiny_path, tmp_path) -> pathlib.Path:
    import shutil

    from vlrlhf.models.registry import load_adapter
    from vlrlhf.models.value_head import ScalarHead, save_head

    folder = tmp_path / "rm"
    shutil.copytree(tiny_path("llava"), folder)
    torch.manual_seed(0)
    save_head(ScalarHead.create(load_adapter(folder).load_model()), folder)
    return folder


@pytest.mark.parametrize("variant", ["ppo", "ppo_reward_model"])
def test_ppo_smoke_run(ray_cluster, tmp_path, tiny_path, variant):
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=2", f"checkpoint.dir={tmp_path / 'ck'}", "online.prompts_per_step=4"]
    if variant == "ppo_reward_model":  # the reward model alone prices the completions
        overrides += ["online.rewards=[]", f"online.reward_model={{path: {reward_model_folder(tiny_path, tmp_path)}}}"]
    assert run_job(str(ROOT / "configs" / "demo_ppo.yaml"), overrides, run_dir=str(run_dir)) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        assert row["train/synced_tensors"] > 0 and math.isfinite(row["critic/value_loss"])
        assert row["time/score_s"] > 0 and row["time/train_s"] > 0
    if variant == "ppo_reward_model":
        assert all(row["train/reward"] == pytest.approx(row["train/reward_model"]) for row in steps)
        assert len({row["train/reward"] for row in steps}) == 2  # real, varying scores
    ck = tmp_path / "ck" / "step-000002"
    assert (ck / "model.safetensors").is_file() and (ck / "critic" / "value_head.safetensors").is_file()


def test_async_rollouts_are_one_step_off_and_weights_travel_by_broadcast(ray_cluster, tmp_path):
    """Policy and rollout on Ray workers; weights by gloo broadcast. Step 1 trains on samples of
    the weights it starts from (ratio 1); step 2's samples were drawn before step 1's update."""
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=3", f"checkpoint.dir={tmp_path / 'ck'}", "online.prompts_per_step=4",
                 "online.mini_batches=1", "online.async_rollout=true", "online.weight_sync=collective",
                 "trainer.lr=1e-3", "resources.policy={num_workers: 1, cpus: 0.5}",
                 "resources.rollout={num_workers: 1, cpus: 0.5}"]
    assert run_job(str(ROOT / "configs" / "demo_ppo.yaml"), overrides, run_dir=str(run_dir)) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert steps[0]["train/ratio"] == pytest.approx(1.0, abs=1e-3)
    assert steps[0]["train/approx_kl"] < 1e-4
    assert steps[1]["train/approx_kl"] > 10 * steps[0]["train/approx_kl"]  # off by one update
    assert all(row["train/synced_tensors"] > 0 for row in steps)


@pytest.mark.parametrize("truncated", ["keep", "mask"])
def test_truncated_completions_can_be_left_out_of_the_loss(ray_cluster, tmp_path, truncated):
    """Two-token answers of a random model are all cut at max_tokens: kept, they train; masked
    (DAPO's overlong filtering), nothing does, though they are still rewarded and logged."""
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=1", "algorithm.name=reinforce_pp", f"checkpoint.dir={tmp_path / 'ck'}",
                 "online.prompts_per_step=2", "online.n=2", "online.max_tokens=2", f"online.truncated={truncated}"]
    assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train/reward" in line]
    assert row["train/truncated"] == 1.0
    assert row["train/trained_samples"] == (4.0 if truncated == "keep" else 0.0)
    assert ("train/loss" in row) == (truncated == "keep")
