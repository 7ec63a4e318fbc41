"""DPO speed and memory: `vlrlhf run` against TRL's DPOTrainer, alternating runs in one invocation.

    pip install -c requirements/constraints-cpu.txt -r requirements/benchmarks.txt
    .venv/bin/python benchmarks/dpo_vs_trl.py [--models small,llava15] [--rounds 2] [--pairs 256]

Both sides train the same random LLaVA (built here, nothing downloaded) on the same
preference pairs of the bundled shapes data: full fine-tuning, fp32 on the CPU, batch 8,
AdamW at a constant lr, gradient clipping at 1.0, a separate frozen reference model, beta
0.1, sigmoid loss. vlrlhf runs through its real entry point (jobs.offline, the Ray Data
pipeline encoding on one CPU, policy and reference in the driver); TRL through
DPOTrainer.train (its collator processes each batch in the process). Each run is a fresh
process; samples/s counts the steps after the first (start-up, Ray, JIT excluded) by the
same clock on both sides. CPU-seconds per sample count the same steps over the whole
process tree (vlrlhf: the driver plus Ray's daemons and its Ray Data encoding worker; TRL:
its one process), a measure that other load on the machine disturbs less than wall time.
Peak RSS is the training process's ru_maxrss, at the end of the last step (training) and
at exit (vlrlhf also writes its final checkpoint and curves.png; TRL saves nothing); the
resident shared pages in it are vlrlhf's reads of Ray object-store blocks (encoded rows).

Models: `small` = CLIP 2 layers hidden 128 at 128 px / patch 16 (64 image tokens) + Llama
4 layers hidden 256; `llava15` = the same towers at LLaVA-1.5's geometry, 336 px / patch 14
(576 image tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "shapes"
TEXT = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, head_dim=64)
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2)
MODELS = {"small": dict(image_size=128, patch_size=16), "llava15": dict(image_size=336, patch_size=14)}
BATCH, LR, BETA, THREADS = 8, 1e-5, 0.1, 2


def build(name: str, folder: pathlib.Path) -> pathlib.Path:
    from vlrlhf.models.tiny import build_tiny_model

    if not (folder / "vlrlhf_tiny.json").is_file():
        build_tiny_model("llava", folder, text=TEXT, vision=VISION, **MODELS[name])
    return folder


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shared_rss_mb() -> float:
    """Resident shared-memory pages (vlrlhf: the Ray object store's blocks this process read)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssShmem")) / 1024


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants (Ray's daemons and workers)."""
    import psutil

    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


class StepClock:
    """Wall time, process-tree CPU time and peak RSS at the end of every training step."""

    def __init__(self):
        self.walls, self.cpus, self.losses, self.rss, self.shared = [], [], [], 0.0, 0.0

    def tick(self) -> None:
        self.walls.append(time.perf_counter())
        self.cpus.append(tree_cpu_seconds())
        self.rss, self.shared = peak_rss_mb(), shared_rss_mb()

    def result(self) -> dict:
        """Over the steps after the first (start-up excluded)."""
        samples = (len(self.walls) - 1) * BATCH
        return {"samples_per_s": samples / (self.walls[-1] - self.walls[0]),
                "cpu_s_per_sample": (self.cpus[-1] - self.cpus[0]) / samples,
                "first_loss": self.losses[0], "steps": len(self.walls), "training_peak_rss_mb": self.rss,
                "object_store_rss_mb": self.shared}


# ---------------------------------------------------------------- vlrlhf
def run_vlrlhf(model: pathlib.Path, work: pathlib.Path, pairs: int) -> dict:
    import torch
    import yaml

    torch.set_num_threads(THREADS)
    from jobs import offline
    from jobs.run import start_ray
    from vlrlhf.config import load_spec

    subset = work / "pairs.json"
    subset.write_text(json.dumps(json.loads((DATA / "preference.json").read_text())[:pairs]))
    spec_file = work / "vlrlhf.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "bench_dpo",
        "model": {"path": str(model), "freeze_vision": False},
        "data": {"format": "plain_dpo", "train": str(subset), "image_root": str(DATA), "max_length": 1024},
        "algorithm": {"name": "dpo", "loss_type": "sigmoid", "beta": BETA},
        "resources": {"policy": {"num_workers": 0}, "reference": {"num_workers": 0}},
        "reference": {"mode": "separate"},
        "trainer": {"lr": LR, "lr_schedule": "constant", "batch_size": BATCH, "micro_batch_size": BATCH,
                    "max_grad_norm": 1.0, "epochs": 1, "seed": 0, "log_every": 1000},
        "checkpoint": {"dir": str(work / "checkpoints"), "resume": "off"},
        "tracking": {"kind": "jsonl"},
    }))
    clock = StepClock()
    original = offline.OfflineJob.train_step

    def timed(self, *args, **kwargs):
        values = original(self, *args, **kwargs)
        clock.tick()
        clock.losses.append(values["train/loss"])
        return values

    offline.OfflineJob.train_step = timed
    start_ray(dashboard=False)
    offline.run_offline(load_spec(spec_file), work / "run")
    return clock.result()


# ---------------------------------------------------------------- TRL
def run_trl(model: pathlib.Path, work: pathlib.Path, pairs: int) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(THREADS)
    records = json.loads((DATA / "preference.json").read_text())[:pairs]

    def message(role, text, image=False):
        return [{"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}]

    dataset = Dataset.from_list([{"images": [Image.open(DATA / r["image"]).convert("RGB")],
                                  "prompt": message("user", r["prompt"], image=True),
                                  "chosen": message("assistant", r["chosen"]),
                                  "rejected": message("assistant", r["rejected"])} for r in records])
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(logs["loss"])

    config = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, num_train_epochs=1,
                       learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], logging_steps=1,
                       save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                       max_length=None, bf16=False, fp16=False, disable_tqdm=True)
    trainer = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(model),
                         ref_model=AutoModelForImageTextToText.from_pretrained(model), args=config,
                         train_dataset=dataset, processing_class=AutoProcessor.from_pretrained(model),
                         callbacks=[Clock()])
    trainer.train()
    return clock.result()


# ---------------------------------------------------------------- driver
def child(args) -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"{args.side}-", dir=args.work))
    runner = run_vlrlhf if args.side == "vlrlhf" else run_trl
    result = runner(pathlib.Path(args.model_dir), work, args.pairs)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,llava15")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--work", default=None)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="dpo_vs_trl-")
    if args.side:
        return child(args)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for name in args.models.split(","):
        folder = build(name, pathlib.Path(args.work) / f"model-{name}")
        results = {"vlrlhf": [], "trl": []}
        for _ in range(args.rounds):  # alternating, so that machine load hits both sides alike
            for side in ("vlrlhf", "trl"):
                command = [sys.executable, __file__, "--side", side, "--model-dir", str(folder),
                           "--pairs", str(args.pairs), "--work", args.work]
                out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
                lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                if out.returncode or not lines:
                    sys.exit(f"{side} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                results[side].append(json.loads(lines[-1][len("RESULT "):]))
                print(f"  {name} {side:7s} {results[side][-1]}", flush=True)
        report(name, results)


def report(name: str, results: dict) -> None:
    """Medians over the rounds (wall time swings with other load); peak RSS: the largest."""
    def median(key):
        return {side: statistics.median(r[key] for r in runs) for side, runs in results.items()}

    rate, cpu = median("samples_per_s"), median("cpu_s_per_sample")
    rss = {side: max(r["training_peak_rss_mb"] for r in runs) for side, runs in results.items()}
    exit_rss = {side: max(r["peak_rss_mb"] for r in runs) for side, runs in results.items()}
    shared = {side: max(r["object_store_rss_mb"] for r in runs) for side, runs in results.items()}
    loss = {side: runs[0]["first_loss"] for side, runs in results.items()}
    print(f"{name}: samples/s vlrlhf {rate['vlrlhf']:.2f}, TRL {rate['trl']:.2f}, "
          f"ratio {rate['vlrlhf'] / rate['trl']:.2f}x | "
          f"CPU-s/sample vlrlhf {cpu['vlrlhf']:.3f}, TRL {cpu['trl']:.3f}, ratio {cpu['trl'] / cpu['vlrlhf']:.2f}x | "
          f"peak RSS through training vlrlhf {rss['vlrlhf']:.0f} MB, TRL {rss['trl']:.0f} MB "
          f"(object-store pages in it {shared['vlrlhf']:.0f} / {shared['trl']:.0f}; "
          f"at exit {exit_rss['vlrlhf']:.0f} / {exit_rss['trl']:.0f}) | "
          f"step-1 loss vlrlhf {loss['vlrlhf']:.4f}, TRL {loss['trl']:.4f} (ln 2 = 0.6931)", flush=True)


if __name__ == "__main__":
    main()
