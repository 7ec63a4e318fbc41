"""Job specs: every shipped YAML validates; bad specs give one clear message and exit 2 before Ray."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from vlrlhf.config import JobSpec, SpecError, load_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if "kuberay" not in p.parts], ids=lambda p: p.name)
def test_every_shipped_spec_validates(path):
    from vlrlhf.eval.spec import EvalSpec

    first_line = path.read_text().splitlines()[0]
    command = "vlrlhf eval" if "eval" in path.parent.parts[-1:] else "vlrlhf run"
    assert first_line.startswith("#") and command in first_line  # the launch command comes first
    data = yaml.safe_load(path.read_text())
    (EvalSpec if command == "vlrlhf eval" else JobSpec).model_validate(data)


def minimal(tmp_path, **changes) -> pathlib.Path:
    data = {"model": {"path": "tiny:llava"}, "data": {"format": "plain_dpo", "train": str(
        ROOT / "data/shapes/preference.json")}, "algorithm": {"name": "dpo"}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        data.setdefault(section, {})[name] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_parsed_as_yaml_and_paths_resolved(tmp_path):
    spec = load_spec(minimal(tmp_path), ["algorithm.beta=0.25", "algorithm.loss_type={sigmoid: 0.8, sft: 1.0}",
                                         "trainer.max_steps=3", "data.eval=[]"])
    assert spec.algorithm.beta == 0.25 and spec.algorithm.loss_type == {"sigmoid": 0.8, "sft": 1.0}
    assert spec.trainer.max_steps == 3
    assert pathlib.Path(spec.model.path, "config.json").is_file()  # tiny:llava was built
    assert spec.data.image_root == str(ROOT / "data/shapes")


def test_paths_in_the_file_resolve_against_it_and_paths_on_the_command_line_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    path = minimal(tmp_path / "specs", reference__path="ref_model")
    monkeypatch.chdir(tmp_path)
    spec = load_spec(path, ["model.path=runs/sft/step-1"])
    assert spec.model.path == str(tmp_path / "runs/sft/step-1")  # typed in a shell at tmp_path
    assert spec.reference.path == str(tmp_path / "specs" / "ref_model")  # written in the file


@pytest.mark.parametrize("override, message", [
    ("trainer.learning_rate=1e-4", "trainer.learning_rate: unknown key"),
    ("trainer.batch_size=many", "trainer.batch_size: Input should be a valid integer"),
    ("trainer.strategy=fsdp", "trainer.strategy: must be one of 'ddp' or 'deepspeed' (got 'fsdp')"),
    ("algorithm.loss_type=dpoo", "algorithm.loss_type 'dpoo' is not one of"),
    ("algorithm.name=a2c", "algorithm.name: must be one of"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(SpecError) as info:
        load_spec(minimal(tmp_path), [override])
    assert message in str(info.value)


MANY = """
import contextlib, io, json, sys
import ray
from jobs.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    results.append({"rc": rc, "ray": ray.is_initialized(), "stderr": err.getvalue(), "stdout": out.getvalue()})
print("RESULTS " + json.dumps(results))
"""


BAD_SPECS = {"unknown_key": (["model.colour=red"], "model.colour: unknown key"),
             "wrong_type": (["trainer.epochs=two"], "trainer.epochs"),
             "missing_data": (["data.train={folder}/nope.json"], "nope.json does not exist"),
             "no_weights": (["model.path={folder}"], "no weights")}


def run_many(argvs: list[list[str]]) -> list[dict]:
    """Several CLI calls in one fresh interpreter (imports dominate a call's cost)."""
    out = subprocess.run([sys.executable, "-c", MANY, json.dumps(argvs)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[0][len("RESULTS "):])


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The bad specs, `config show` and `config schema`, all in one interpreter."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    spec = str(minimal(folder))
    argvs = [["run", spec, *(o.format(folder=folder) for o in overrides)] for overrides, _ in BAD_SPECS.values()]
    argvs += [["config", "show", spec, "algorithm.beta=0.3"], ["config", "schema"]]
    results = run_many(argvs)
    return dict(zip([*BAD_SPECS, "show", "schema"], results, strict=True))


def test_bad_spec_exits_2_with_one_message_and_no_ray(cli_runs):
    for problem, (_, expected) in BAD_SPECS.items():
        result = cli_runs[problem]
        assert result["rc"] == 2 and not result["ray"], problem  # exit code 2, Ray never started
        errors = [line for line in result["stderr"].splitlines() if line.startswith("vlrlhf: error:")]
        assert len(errors) == 1 and expected in result["stderr"], (problem, result["stderr"])


def test_config_show_and_schema(cli_runs):
    show, schema = cli_runs["show"], cli_runs["schema"]
    assert show["rc"] == 0 and schema["rc"] == 0, show["stderr"] + schema["stderr"]
    shown = yaml.safe_load(show["stdout"])
    assert shown["algorithm"]["beta"] == 0.3 and shown["trainer"]["strategy"] == "ddp"
    assert json.loads(schema["stdout"])["title"] == "JobSpec"
    assert not show["ray"] and not schema["ray"]  # neither starts Ray


def test_cross_field_rules(tmp_path):
    with pytest.raises(SpecError, match="must divide evenly over resources.policy.num_workers=3"):
        load_spec(minimal(tmp_path), ["resources.policy.num_workers=3", "trainer.batch_size=8"])
    with pytest.raises(SpecError, match="reference.mode=policy needs model.lora"):
        load_spec(minimal(tmp_path), ["reference.mode=policy"])
    with pytest.raises(SpecError, match="kto needs trainer.batch_size >= 2"):
        load_spec(minimal(tmp_path), ["algorithm.name=kto", "trainer.batch_size=1"])
    colocated = ["resources.policy.num_workers=1", "resources.rollout.num_workers=1",
                 "resources.rollout.colocate=policy", "online.weight_sync=collective"]
    grpo = ROOT / "configs" / "demo_grpo.yaml"
    with pytest.raises(SpecError, match="same GPU, which NCCL refuses"):
        load_spec(grpo, colocated + ["resources.policy.gpus=1", "resources.rollout.gpus=1"])
    assert load_spec(grpo, colocated).online.weight_sync == "collective"  # gloo on CPU takes both ranks


@pytest.mark.parametrize("typed, resume", [("off", "off"), ("false", "off"), ("no", "off"), ("'off'", "off"),
                                           ("auto", "auto"), ("true", "auto")])
def test_resume_off_spelled_as_typed(tmp_path, typed, resume):
    # YAML reads a bare off/no/false as a boolean: checkpoint.resume=off must still mean off
    assert load_spec(minimal(tmp_path), [f"checkpoint.resume={typed}"]).checkpoint.resume == resume
    path = minimal(tmp_path)
    path.write_text(path.read_text() + f"checkpoint:\n  resume: {typed}\n")
    assert load_spec(path).checkpoint.resume == resume


def test_the_evaluation_section_takes_the_scoring_rules():
    spec = load_spec(ROOT / "configs" / "demo_sft.yaml", ["evaluation.rules=vlmevalkit"])
    assert spec.evaluation.rules == "vlmevalkit"
    assert load_spec(ROOT / "configs" / "demo_sft.yaml").evaluation.rules == "official"
    with pytest.raises(SpecError, match="evaluation.rules: must be one of"):
        load_spec(ROOT / "configs" / "demo_sft.yaml", ["evaluation.rules=lenient"])


def test_a_vllm_engine_gets_as_many_gpus_as_it_shards_over():
    grpo = ROOT / "configs" / "demo_grpo.yaml"
    engine = ["online.engine=vllm", "resources.rollout={num_workers: 1, gpus: 1}"]
    with pytest.raises(ValueError, match="must equal online.tensor_parallel_size=2"):
        load_spec(grpo, engine + ["online.tensor_parallel_size=2"])
    assert load_spec(grpo, engine).online.tensor_parallel_size == 1
    assert load_spec(grpo, ["online.engine=vllm", "online.tensor_parallel_size=2",
                            "resources.rollout={num_workers: 1, gpus: 2}"]).resources.rollout.gpus == 2
    # two engines sharing a GPU (gpu_memory_utilization each) are fine; half a GPU cannot hold a TP-2 engine
    assert load_spec(grpo, ["online.engine=vllm", "resources.rollout={num_workers: 2, gpus: 0.5}"])
    with pytest.raises(ValueError, match="must equal"):
        load_spec(grpo, ["online.engine=vllm", "online.tensor_parallel_size=2",
                         "resources.rollout={num_workers: 1, gpus: 0.5}"])
