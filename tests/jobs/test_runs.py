"""End-to-end runs through `vlrlhf run`: smoke runs of every demo spec, checkpoints, resume."""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import pytest
import torch

from jobs.checkpoints import Checkpoints, RemoteCheckpoints
from jobs.run import run_job

ROOT = pathlib.Path(__file__).resolve().parents[2]


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: pathlib.Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row}


@pytest.mark.parametrize("config", ["demo_sft.yaml", "demo_dpo.yaml", "demo_kto.yaml"])
def test_two_step_smoke_run_of_every_demo_spec(ray_cluster, tmp_path, config):
    run_dir = tmp_path / "run"
    # SFT checkpoints to a URI (pyarrow filesystem; s3:// and gs:// take the same path)
    directory = f"file://{tmp_path / 'bucket'}" if config == "demo_sft.yaml" else str(tmp_path / "ck")
    overrides = ["trainer.max_steps=2", f"checkpoint.dir={directory}", "trainer.eval_every=0"]
    if config == "demo_sft.yaml":  # its evaluation section, on the first 40 benchmark rows, also after step 1
        overrides += ["evaluation.limit=40", "evaluation.every_steps=1", "evaluation.resources={num_workers: 0}"]
    if config == "demo_dpo.yaml":  # a reference actor colocated on the policy's bundle
        overrides += ["resources.policy.cpus=0.5", "resources.reference={num_workers: 1, cpus: 0.5, colocate: policy}"]
    code = run_job(str(ROOT / "configs" / config), overrides, run_dir=str(run_dir))
    assert code == 0
    assert sorted(train_losses(run_dir)) == [1, 2]
    assert (run_dir / "curves.png").stat().st_size > 1000
    if "://" in directory:
        # demo_sft's `evaluation` section: the final checkpoint on the bundled shapes benchmark
        scores = json.loads((run_dir / "eval" / "scores.json").read_text())
        assert scores["benchmarks"]["shapes"]["counts"]["items"] == 40  # evaluation.limit rows
        remote = RemoteCheckpoints(directory, 2, tmp_path / "download")
        assert remote.complete() == ["step-000001", "step-000002"]  # step 1's written for its benchmarks
        checkpoint = remote.latest()
        # benchmarks during training: step 1's number is `vlrlhf eval`'s on step 1's checkpoint
        logged = [row for row in read_metrics(run_dir) if "bench/shapes" in row]
        assert [row["step"] for row in logged] == [1]
        at_step = json.loads((run_dir / "eval" / "step-000001" / "scores.json").read_text())["benchmarks"]["shapes"]
        assert logged[0]["bench/shapes"] == at_step["metrics"][at_step["headline"]]
        from jobs.evaluate import run_eval
        from vlrlhf.eval.spec import load_eval_spec

        again = run_eval(load_eval_spec(None, [f"model.path={remote.local_path(1)}", "benchmarks=shapes",
                                               f"data={ROOT / 'data' / 'shapes'}", "limit=40",
                                               "generation.max_new_tokens=6", "resources.num_workers=0",
                                               f"output={tmp_path / 'again'}"]))
        assert again["benchmarks"]["shapes"]["metrics"] == at_step["metrics"]
    else:
        (checkpoint,) = Checkpoints(directory, 2).complete()
        assert checkpoint.name == "step-000002"
    if (checkpoint / "adapter_config.json").is_file():  # LoRA: an adapter folder on the base model
        from peft import PeftModel

        from vlrlhf.models.registry import load_adapter

        base = json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(load_adapter(base).load_model(), checkpoint)
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_dpo_variants_run_end_to_end(ray_cluster, tmp_path, capfd):
    """DDPO weights, mDPO corrupted images and a precomputed reference, in one run."""
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=2", "trainer.eval_every=0", "resources.policy.num_workers=0",
                 f"checkpoint.dir={tmp_path / 'ck'}", "data.eval=[]", "algorithm.ddpo_gamma=5.0",
                 "algorithm.mdpo={image_weight: 1.0}", "reference.mode=precomputed"]
    assert run_job(str(ROOT / "configs" / "demo_dpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert all("train/image_loss" in row for row in read_metrics(run_dir) if "train/loss" in row)
    assert "reference log-probs precomputed in" in capfd.readouterr().out
    assert (tmp_path / "ck" / "reference_logps" / "_COMPLETE").is_file()  # next to the checkpoints


def test_resume_after_a_kill_continues_exactly(ray_cluster, tmp_path):
    spec = str(ROOT / "configs" / "demo_sft.yaml")
    common = ["trainer.max_steps=4", "trainer.eval_every=0", "trainer.batch_size=8", "trainer.micro_batch_size=8",
              "evaluation=null"]
    full = tmp_path / "full"
    assert run_job(spec, common + [f"checkpoint.dir={full / 'ck'}", "checkpoint.every=2"], run_dir=str(full)) == 0
    # The interrupted run: it wrote checkpoint 2 and was killed during step 3, mid-write of nothing newer.
    killed = tmp_path / "killed"
    shutil.copytree(full / "ck" / "step-000002", killed / "ck" / "step-000002")
    (killed / "ck" / "step-000004.tmp").mkdir(parents=True)  # a save cut short: never picked up
    assert run_job(spec, common + [f"checkpoint.dir={killed / 'ck'}", "checkpoint.resume=auto"],
                   run_dir=str(killed)) == 0
    expected, resumed = train_losses(full), train_losses(killed)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(full / "ck" / "step-000004" / "model.safetensors")
    b = load_file(killed / "ck" / "step-000004" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_save_that_fails_midway_leaves_the_last_checkpoint_loadable(tmp_path):
    checkpoints = Checkpoints(str(tmp_path), keep_last=2)

    def good(folder):
        (pathlib.Path(folder) / "trainer_state.pt").write_bytes(b"state")

    def crash(folder):
        (pathlib.Path(folder) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("node lost")

    checkpoints.save(2, good)
    with pytest.raises(RuntimeError):
        checkpoints.save(4, crash)
    assert checkpoints.latest() == tmp_path / "step-000002"
    checkpoints.save(4, good)
    checkpoints.save(6, good)
    assert [p.name for p in checkpoints.complete()] == ["step-000004", "step-000006"]  # keep_last=2


def test_pipeline_budget_is_what_the_groups_leave_free():
    from jobs.common import PipelineBudgetError, pipeline_budget, pipeline_resources
    from vlrlhf.config import load_spec
    from vlrlhf.data.pipeline import PipelineResources

    def budget(cpus: float, *overrides: str):
        spec = load_spec(ROOT / "configs" / "demo_dpo.yaml", list(overrides))
        return pipeline_budget(spec, ("policy", "reference"), cluster_cpus=cpus)

    # policy 1 x 1 CPU, reference in-process: 3 of 4 CPUs free, the pipeline takes data.pipeline_cpus=1:
    # a reader of 0.25 CPU and one encoder of the remaining 0.75
    assert budget(4) == PipelineResources(encoders=1, encoder_cpus=0.75, readers=1, reader_cpus=0.25)
    assert budget(4, "data.pipeline_cpus=3") == PipelineResources(3, 2.75 / 3, 1)
    assert budget(4, "data.pipeline_cpus=8") == PipelineResources(3, 2.75 / 3, 1)  # never more than is free
    assert budget(16, "data.pipeline_cpus=8") == PipelineResources(8, 7.5 / 8, 2)  # a reader per four CPUs
    assert budget(4, "data.pipeline_memory_mb=64").memory_mb == 64  # the object-store bound passes through
    assert budget(4).memory_mb == 256  # offline default: encoded rows
    assert budget(2, "resources.policy.cpus=0.5", "resources.reference={num_workers: 1, cpus: 0.5}") == \
        PipelineResources(1, 0.75, 1)
    for cpus in (1, 1.5, 2, 3.7, 8, 33):  # whatever is free: the pools' CPUs add up to it, or to less
        resources = pipeline_resources(cpus)
        assert resources.encoders * resources.encoder_cpus + resources.readers * resources.reader_cpus <= cpus + 1e-3
    with pytest.raises(PipelineBudgetError, match=r"reserve 2 of the cluster's 2 CPUs \(policy 1 x 1, reference "
                                                  r"1 x 1\), leaving 0 for the data pipeline, which needs 1"):
        budget(2, "resources.reference={num_workers: 1, cpus: 1}")
    with pytest.raises(PipelineBudgetError, match="leaving 0.5 for the data pipeline"):
        budget(2, "resources.policy.cpus=0.75", "resources.reference={num_workers: 1, cpus: 0.75}")
    # an online job's prompt stream: small blocks of records, a small default bound; a spec's value wins
    grpo = load_spec(ROOT / "configs" / "demo_grpo.yaml")
    assert pipeline_budget(grpo, ("policy",), cluster_cpus=4).memory_mb == 16
    grpo = load_spec(ROOT / "configs" / "demo_grpo.yaml", ["data.pipeline_memory_mb=64"])
    assert pipeline_budget(grpo, ("policy",), cluster_cpus=4).memory_mb == 64


class Alarm:
    """Fail the test instead of hanging the suite (the bug this guards against is a silent hang)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def fail(*_):
            raise TimeoutError(f"still running after {self.seconds}s: the job hangs")

        self.previous = signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def wait_for_idle_cluster(ray, timeout_s: float = 30.0) -> bool:
    """True once every CPU of the cluster is free (within timeout_s)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU"):
            return True
        time.sleep(0.1)
    return False


def test_groups_that_take_every_cpu_stop_before_training_and_fractional_groups_run(ray_cluster, tmp_path,
                                                                                      capsys):
    """On the 2-CPU test cluster: policy and reference at 1 CPU each used to hang in Ray Data
    forever; now the job refuses at once. At 0.5 + 0.5 the pipeline has its CPU and it trains
    (the reference as a pipeline stage: an actor pool beside the encode tasks)."""
    import ray

    spec = str(ROOT / "configs" / "demo_dpo.yaml")
    common = ["trainer.max_steps=2", "trainer.eval_every=0", "data.eval=[]", f"checkpoint.dir={tmp_path / 'ck'}"]
    assert wait_for_idle_cluster(ray)  # the previous test's groups are released asynchronously
    groups_before = set(ray.util.placement_group_table())
    with Alarm(120):
        code = run_job(spec, common + ["resources.reference={num_workers: 1, cpus: 1}"], run_dir=str(tmp_path / "a"))
    assert code == 2
    assert "reserve 2 of the cluster's 2 CPUs (policy 1 x 1, reference 1 x 1)" in capsys.readouterr().err
    assert set(ray.util.placement_group_table()) == groups_before  # refused before any group was placed
    assert ray.available_resources().get("CPU") == 2
    with Alarm(300):
        code = run_job(spec, common + ["resources.policy.cpus=0.5", "resources.reference={num_workers: 1, cpus: 0.5}"],
                       run_dir=str(tmp_path / "b"))
    assert code == 0
    assert sorted(train_losses(tmp_path / "b")) == [1, 2]


def live_actors() -> dict[str, int]:
    """Live actors by class, from the GCS (the session cluster runs no dashboard for the state API)."""
    import ray

    counts: dict[str, int] = {}
    for actor in ray._private.state.actors().values():
        if actor["State"] == "ALIVE":
            counts[actor["ActorClassName"]] = counts.get(actor["ActorClassName"], 0) + 1
    return counts


def test_shards_and_saved_datasets_train_while_the_driver_never_touches_a_row(ray_cluster, tmp_path, monkeypatch):
    """A folder of Parquet shards, a save_to_disk dataset and a JSON file train end to end with the
    policy on a Ray worker, while the driver process cannot read a row or collate a batch: rows
    are fetched and collated by the worker, which these patches do not reach. The three jobs run
    in this one process: the actors each creates (its policy, its pipeline's readers and
    encoders, its bad-record ledger) end with it, so none accumulate."""
    import time

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    import vlrlhf.data.pipeline
    import vlrlhf.data.shares

    rows = json.loads((ROOT / "data" / "shapes" / "preference.json").read_text())[:48]
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(3):
        pq.write_table(pa.Table.from_pylist(rows[index * 16:(index + 1) * 16]), shards / f"train-{index:05d}.parquet")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    (tmp_path / "rows.json").write_text(json.dumps(rows))

    def forbidden(*args, **kwargs):
        raise AssertionError("the driver touched training rows")

    monkeypatch.setattr(vlrlhf.data.shares, "load_rows", forbidden)
    monkeypatch.setattr(vlrlhf.data.pipeline, "collate_items", forbidden)
    after = []
    for name, source in (("shards", shards), ("saved", saved), ("json", tmp_path / "rows.json")):
        run_dir = tmp_path / name
        code = run_job(str(ROOT / "configs" / "demo_dpo.yaml"), [
            f"data.train={source}", "data.eval=[]", f"data.image_root={ROOT / 'data' / 'shapes'}",
            "trainer.max_steps=2", f"checkpoint.dir={run_dir / 'ck'}", "resources.policy.cpus=0.5"],
            run_dir=str(run_dir))
        assert code == 0
        metrics = [row for row in read_metrics(run_dir) if "train/loss" in row]
        assert [row["step"] for row in metrics] == [1, 2]
        assert all(row["time/data_wait_s"] >= 0 for row in metrics)  # logged on every step
        deadline = time.monotonic() + 30  # ray.kill is asynchronous
        while time.monotonic() < deadline and not set(live_actors()).isdisjoint(JOB_ACTORS):
            time.sleep(0.2)
        after.append(live_actors())
    assert all(set(actors).isdisjoint(JOB_ACTORS) for actors in after), after
    assert after[0] == after[1] == after[2]  # what is left (Ray Data's own bookkeeping) does not grow


JOB_ACTORS = {"Ledger", "PolicyWorker", "MapWorker(MapBatches(WindowReader))", "MapWorker(MapBatches(Encoder))"}
