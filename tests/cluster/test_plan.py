"""`vlrlhf plan`: bundles, peak resources, fit on a cluster, token lengths after image expansion."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from jobs.cli import main
from tests.model_configs import config_folder
from jobs.plan import parse_cluster, plan_spec, token_lengths
from vlrlhf.config import load_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "configs").glob("*.yaml"))


def declared_cluster(path: pathlib.Path) -> str:
    """The cluster a template's header declares: `# vlrlhf plan configs/X.yaml --cluster C`."""
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    found = [m.group(1) for line in header if (m := re.search(r"vlrlhf plan configs/\S+ --cluster (\S+)", line))]
    assert found, f"{path.name}: the header must declare its cluster (# vlrlhf plan ... --cluster ...)"
    return found[0]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_every_template_fits_the_cluster_its_header_declares(path):
    spec = load_spec(path)
    plan = plan_spec(spec, parse_cluster(declared_cluster(path)))
    assert plan.fits, plan.problems


@pytest.mark.parametrize("path", [p for p in TEMPLATES if "7b" in p.name], ids=lambda p: p.name)
def test_every_gpu_template_fits_its_gpus_memory(path, tmp_path, capsys):
    """With its model's config.json (the only file the memory plan reads), each 7B template's
    roles fit 80 GB GPUs: weights, gradients and optimizer state by strategy and LoRA, activations
    at its micro-batch and max_length, vLLM's share, colocated roles added up."""
    spec = load_spec(path)
    folder = config_folder(tmp_path, pathlib.Path(spec.model.path).name)
    assert main(["plan", str(path), f"model.path={folder}", "--cluster", declared_cluster(path),
                 "--records", "0"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "memory per GPU" in out and re.search(r"  policy +\d+\.\d", out), out


def test_a_template_that_does_not_fit_its_gpus_is_refused_with_the_fixes(tmp_path, capsys):
    """The reward-model template without its LoRA: full fine-tuning of 7B on ddp keeps fp32
    weights, gradients and AdamW moments, ~102 GiB a GPU."""
    path = ROOT / "configs" / "llava15_7b_rm.yaml"
    folder = config_folder(tmp_path, "llava-1.5-7b-hf")
    def args(*overrides):
        return ["plan", str(path), f"model.path={folder}", *overrides, "--cluster", "1x8gpu:64cpu", "--records", "0"]

    assert main(args("model.lora=null")) == 2
    out = capsys.readouterr().out
    assert "DOES NOT FIT: resources.policy: 106.9 GiB per GPU exceeds 80 GiB; fixes: model.lora" in out
    assert main(args("model.lora=null", "resources.gpu_memory_gb=141")) == 0  # an H200 holds it
    assert main(args("trainer.micro_batch_size=64")) == 2  # the activations of 64 rows of 2048 tokens
    assert "activations" in capsys.readouterr().out
    # `vlrlhf run` refuses it too, before Ray starts
    from jobs.run import run_job

    (folder / "model.safetensors").write_bytes(b"")  # the input check wants weights to exist
    shapes = ROOT / "data" / "shapes"
    assert run_job(str(path), [f"model.path={folder}", "model.lora=null", f"data.train={shapes / 'preference.json'}",
                               "data.format=plain_dpo", f"data.image_root={shapes}"]) == 2
    assert "the roles do not fit their GPUs" in capsys.readouterr().err


def test_a_spec_that_cannot_fit_is_refused(capsys):
    spec = str(ROOT / "configs" / "qwen25vl_7b_rlaifv_dpo.yaml")
    assert main(["plan", spec, "--cluster", "2x8gpu:64cpu", "--records", "0"]) == 0
    assert main(["plan", spec, "--cluster", "1x8gpu:64cpu", "--records", "0"]) == 2  # 8 + 8 GPUs on 8
    out = capsys.readouterr().out
    assert "peak: GPU 16 of 8" in out and "DOES NOT FIT: resources.reference" in out


def test_peak_counts_colocated_roles_inside_the_policys_bundles():
    spec = load_spec(ROOT / "configs" / "llava15_7b_ppo.yaml")
    plan = plan_spec(spec, parse_cluster("1x8gpu:64cpu"))
    policy = plan.groups[0]
    assert (policy.role, policy.count) == ("policy", 4)
    assert policy.bundle == {"CPU": 12.0, "GPU": 1.0}  # policy 0.5 + rollout 0.25 + critic 0.25 GPU
    assert [g.role for g in plan.groups] == ["policy", "reward"] and plan.peak == {"CPU": 52.0, "GPU": 5.0}


def test_placement_strategies_and_the_data_pipeline_budget():
    spec = load_spec(ROOT / "configs" / "demo_dpo.yaml",
                     ["resources.policy={num_workers: 2, cpus: 1, gpus: 1, placement: STRICT_SPREAD}"])
    assert not plan_spec(spec, parse_cluster("1x2gpu:4cpu")).fits  # two bundles, one node
    assert plan_spec(spec, parse_cluster("2x1gpu:2cpu")).fits
    tight = plan_spec(spec, parse_cluster("2x1gpu:1cpu"))  # the groups take every CPU: Ray Data would hang
    assert any("data pipeline" in problem for problem in tight.problems)


def test_token_lengths_after_image_expansion_against_max_length(ray_cluster, tiny_path, tmp_path):
    """LLaVA-NeXT with llava-v1.6-mistral-7b's image processing (336 px tiles, its grid
    pinpoints): a 640x480 image becomes ~2,340 tokens, so the DDPO template's max_length
    must exceed 2048 (it skipped nearly every record before)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextImageProcessor

    model = tmp_path / "llava-next"
    import shutil

    shutil.copytree(tiny_path("llava_next"), model)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    processor = AutoProcessor.from_pretrained(model)
    processor.image_processor = LlavaNextImageProcessor(size={"shortest_edge": 336},
                                                        crop_size={"height": 336, "width": 336},
                                                        image_grid_pinpoints=pinpoints)
    processor.save_pretrained(model)
    processor.image_processor.save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config["image_grid_pinpoints"] = pinpoints
    config["vision_config"]["image_size"] = 336
    (model / "config.json").write_text(json.dumps(config))
    Image.new("RGB", (640, 480), "white").save(tmp_path / "photo.png")
    rows = [{"text": json.dumps({"question": f"<image>\nWhat is shown? ({i})", "chosen": "A white wall.",
                                 "rejected": "A red car."}), "image_path": "photo.png"} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = [f"model.path={model}", f"data.train={tmp_path / 'train.jsonl'}", f"data.image_root={tmp_path}"]
    template = ROOT / "configs" / "llava_next_7b_rlhfv_ddpo.yaml"
    tokens = token_lengths(load_spec(template, overrides), limit=10)
    assert tokens["records"] == tokens["encoded"] == 3
    assert 2048 < tokens["max"] <= tokens["limit"] == 4096 and tokens["too_long"] == 0
    assert tokens["image_tokens"]["max"] > 2000 and 0 < tokens["text_tokens"]["max"] < 100
    tight = token_lengths(load_spec(template, overrides + ["data.max_length=2048"]), 10)
    assert tight["too_long"] == 3  # a smaller image takes a smaller tile grid: resize fits every one
    assert tight["overflow"] == {"resize": {"resized": 3, "skipped": 0}, "skip": {"skipped": 3},
                                 "raise": {"stops": True}}


def test_kuberay_manifests_describe_their_nodes():
    nodes = parse_cluster(str(ROOT / "configs" / "kuberay" / "raycluster.yaml"))
    assert nodes[0] == {"CPU": 0.0, "GPU": 0.0}  # the head: the driver only
    assert nodes[1:] == [{"CPU": 64.0, "GPU": 8.0}] * 4  # the autoscaler's maximum
