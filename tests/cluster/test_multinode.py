"""Multi-node runs on a `ray.cluster_utils.Cluster` (0-CPU head, worker nodes with their own
logical GPUs and disks), with workers killed and a node removed on purpose.

The runs happen in one subprocess (tests/cluster/scenario.py: one cluster for all of
them, and no clash with the session's Ray); the tests below read what it left.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUCKET = "s3://vlrlhf"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "tests.cluster.scenario", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return out, json.loads((out / "results.json").read_text())


def ok(result: dict) -> dict:
    assert "error" not in result, result["error"]
    return result


def model_tensors(folder: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_offline_dpo_spreads_the_policy_and_puts_the_reference_on_a_third_node(runs):
    out, results = runs
    offline = ok(results["offline"])
    nodes = offline["policy_nodes"]
    assert len(set(nodes)) == 2 and results["head"] not in nodes  # SPREAD over A and B, nothing on the head
    # `vlrlhf plan` predicted the placement group the job made
    placed = {name: list(bundles.values()) for name, bundles in offline["placement"].items()}
    assert placed["vlrlhf-policy"] == offline["planned"]["policy"]
    assert "vlrlhf-reference" not in placed  # the reference is a pipeline stage (Ray Data actors on node C)


def test_killed_workers_and_a_lost_node_are_survived_with_nothing_lost(runs):
    """A reference worker, then a policy worker are killed, then the node of policy rank 0 is
    removed: the run restarts from its newest complete checkpoint each time and its final
    weights equal those of a run resumed from step 2 that never failed."""
    out, results = runs
    offline, resumed = ok(results["offline"]), ok(results["resumed"])
    assert offline["events"] == ["reference", "policy", "node"]
    summary = offline["summary"]
    assert summary["code"] == 0, summary["log"][-3000:]
    log = summary["log"]
    assert f"restarting from {BUCKET}/dpo/step-000002" in log  # the policy worker killed during step 3
    assert f"restarting from {BUCKET}/dpo/step-000003" in log  # the node lost during step 4
    assert f"resumed from {BUCKET}/dpo/step-000003" in log and "finished after 5 steps" in log
    assert resumed["code"] == 0, resumed["log"][-3000:]
    failed = model_tensors(out / "s3" / "step-000005")
    clean = model_tensors(out / "shared" / "dpo" / "step-000005")  # the shared-folder run
    assert failed.keys() == clean.keys()
    assert max((failed[k] - clean[k]).abs().max().item() for k in failed) <= 1e-6
    assert any(not torch.equal(failed[k], model_tensors(out / "s3" / "step-000002")[k]) for k in failed)  # it trained


def test_uri_checkpoints_hold_the_weights_written_from_the_workers_node(runs):
    out, results = runs
    offline = ok(results["offline"])
    final = out / "s3" / "step-000005"
    manifest = json.loads((final / "_COMPLETE").read_text())
    writer = next(w for w in manifest["writers"] if "model.safetensors" in w["files"])
    assert writer["node"] not in (results["head"], offline["removed_node"])  # rank 0, on the replacement node
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every weight came from the folder
    loaded = model.state_dict()
    clean = AutoModelForImageTextToText.from_pretrained(out / "shared" / "dpo" / "step-000005").state_dict()
    assert loaded.keys() == clean.keys()
    assert all(torch.allclose(loaded[name], clean[name], atol=1e-6) for name in loaded)
    # the driver (on the 0-CPU head) staged none of the saves; it only downloaded the final
    # checkpoint afterwards, as the run summary's local copy
    staged = {p.parent.relative_to(out / "run-a").as_posix() for p in (out / "run-a").rglob("*.safetensors")}
    assert staged <= {"staging/step-000005"}


def test_online_grpo_with_rollout_and_policy_on_different_nodes(runs):
    out, results = runs
    online = ok(results["online"])
    assert online["code"] == 0, online["log"][-3000:]
    assert online["nodes"]["policy"] != online["nodes"]["rollout"]
    rows = [json.loads(line) for line in (out / "run-online" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/reward" in row] == [1, 2]
    assert all(row["train/synced_tensors"] > 0 for row in rows if "train/reward" in row)  # weights crossed nodes
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(out / "s3" / "grpo-step-000002") is not None


def restarts_in(log: str) -> list[str]:
    """The driver's restart reports; found by pattern, since Ray's log forwarding can write its
    own messages onto the same line of the job's output."""
    return re.findall(r"restart \d+ cost [\d.]+ s .*?resumed at \d+\)", log)


@pytest.mark.parametrize("name, events, resumes", [
    ("grpo_failures", ["rollout", "policy", "node"], [2, 4, 6]),
    ("ppo_failures", ["rollout"], [2]),
])
def test_online_runs_survive_a_killed_engine_a_killed_policy_and_a_lost_engine_node(runs, name, events, resumes):
    """Each fault costs one restart (trainer.max_failures is the number of faults), from the
    newest complete checkpoint; the log says what each restart cost; the final policy (and
    PPO's critic) equal those of the same spec resumed by hand from that checkpoint."""
    out, results = runs
    result = ok(results[name])
    assert result["events"] == events
    failed, manual = result["failed"], result["manual"]
    assert failed["code"] == 0, failed["log"][-3000:]
    assert manual["code"] == 0, manual["log"][-3000:]
    log = failed["log"]
    folder = pathlib.Path(result["folder"])
    restarting = re.findall(r"tearing the groups down and restarting from \S*step-(\d{6})", log)
    assert restarting == [f"{step:06d}" for step in resumes]
    costs = restarts_in(log)
    assert len(costs) == len(events)
    for line, resumed in zip(costs, resumes, strict=True):  # the fault came one step after the checkpoint
        assert f"1 step(s) redone (reached {resumed + 1}, resumed at {resumed})" in line, line
        assert float(line.split(" cost ")[1].split(" s ")[0]) > 0
    if "node" in events:
        assert result["removed_node"] not in (results["head"], None)
    last = max(int(p.name.split("-")[1]) for p in (folder / "failed").glob("step-*"))
    assert last == max(int(p.name.split("-")[1]) for p in (folder / "manual").glob("step-*"))
    from safetensors.torch import load_file

    final = folder / "failed" / f"step-{last:06d}"
    parts = sorted(p.relative_to(final) for p in final.rglob("*.safetensors"))
    assert pathlib.Path("model.safetensors") in parts
    if name.startswith("ppo"):
        assert any(part.parts[0] == "critic" for part in parts)  # the critic and its value head
    for part in parts:
        a, b = load_file(final / part), load_file(folder / "manual" / f"step-{last:06d}" / part)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, part
    a = model_tensors(final)
    start = model_tensors(folder / "failed" / f"step-{result['resumed_at']:06d}")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained after the restart
