"""GRPO step throughput: `vlrlhf` (jobs.online) against TRL's GRPOTrainer, alternating runs in one invocation.

    .venv/bin/pip install -c requirements/constraints-cpu.txt -r requirements/benchmarks.txt  # TRL, not for tests
    .venv/bin/python benchmarks/grpo_vs_trl.py [--rounds 2] [--steps 6] [--prompts 8] [--group 8] [--tokens 32]
        [--geometry small|llava15] [--sides vlrlhf vlrlhf-separate trl]

Both sides train the same random LLaVA (built here: CLIP 2 layers hidden 128 at 128 px /
patch 16, 64 image tokens, or with --geometry llava15 at LLaVA-1.5's 336 px / patch 14,
576 image tokens; Llama 4 layers hidden 256), fp32 on the CPU with 1 thread, on
the same shapes prompts: `--prompts` prompts per step, `--group` samples each, at most
`--tokens` sampled tokens, temperature 1, no KL (TRL's default beta 0: no reference model on
either side), one optimizer step per rollout, AdamW at a constant lr, clipping at 1.0, every
group trained (vlrlhf's skip_equal_groups off), the same length reward (-0.01 per character,
so that groups differ). Rollouts: transformers `generate` on both sides (TRL's default without
vLLM; vlrlhf's `online.engine: transformers`), roles in one process on both sides.
Each run is a fresh process; prompts/s and sampled tokens/s count the steps after the first,
timed at the end of each optimizer step on both sides, by the wall clock and by the process's
CPU time (one torch thread per side, so CPU seconds measure the work done and stay meaningful
on a machine shared with other jobs, where wall-clock rates swing with the load).
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
LR, THREADS, PENALTY = 1e-5, 1, 0.01


GEOMETRY = {"small": dict(image_size=128, patch_size=16), "llava15": dict(image_size=336, patch_size=14)}


def build(folder: pathlib.Path, geometry: str) -> pathlib.Path:
    from vlrlhf.models.tiny import build_tiny_model

    if not (folder / "vlrlhf_tiny.json").is_file():
        build_tiny_model("llava", folder, text=TEXT, vision=VISION, **GEOMETRY[geometry])
    return folder


def prompts_file(work: pathlib.Path, count: int) -> pathlib.Path:
    path = work / "prompts.jsonl"
    path.write_text("".join((DATA / "prompts.jsonl").read_text().splitlines(keepends=True)[:count]))
    return path


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rates(marks: list[tuple[float, float]], prompts: int, tokens: list[float]) -> dict:
    """Prompts and sampled tokens per second (wall and CPU) over the steps after the first."""
    wall, cpu = (marks[-1][0] - marks[0][0]), (marks[-1][1] - marks[0][1])
    done, sampled = prompts * (len(marks) - 1), sum(tokens[1:])
    return {"prompts_per_s": done / wall, "tokens_per_s": sampled / wall,
            "prompts_per_cpu_s": done / cpu, "tokens_per_cpu_s": sampled / cpu}


# ---------------------------------------------------------------- vlrlhf
def run_vlrlhf(model: pathlib.Path, work: pathlib.Path, args) -> dict:
    import torch
    import yaml

    torch.set_num_threads(THREADS)
    from jobs import online
    from vlrlhf.config import load_spec

    spec_file = work / "vlrlhf.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "bench_grpo",
        "model": {"path": str(model), "freeze_vision": False},
        "data": {"format": "prompts", "train": str(prompts_file(work, args.prompts * args.steps)),
                 "image_root": str(DATA), "max_length": 1024},
        "algorithm": {"name": "grpo"},
        "online": {"engine": "transformers", "n": args.group, "temperature": 1.0, "max_tokens": args.tokens,
                   "prompts_per_step": args.prompts, "kl_coef": 0.0, "skip_equal_groups": False,
                   "rewards": [{"function": "length_penalty", "options": {"max_chars": 0,
                                                                          "penalty_per_char": PENALTY}}]},
        "resources": {"policy": {"num_workers": 0}, "rollout": {"num_workers": 0}},
        "trainer": {"lr": LR, "lr_schedule": "constant", "micro_batch_size": args.prompts * args.group,
                    "max_grad_norm": 1.0, "max_steps": args.steps, "seed": 0, "log_every": 1000},
        "checkpoint": {"dir": str(work / "checkpoints"), "resume": "off"},
    }))
    marks, tokens, rewards = [], [], []
    original = online.OnlineJob.train_step

    splits = []

    def timed(self, result, timings, progress):
        values = original(self, result, timings, progress)
        marks.append(clocks())
        tokens.append(float(sum(s.length for s in result.samples)))
        rewards.append(values["train/reward"])
        splits.append({key: timings.get(key, 0.0) for key in ("rollout_s", "score_s", "train_s")})
        return values

    online.OnlineJob.train_step = timed
    if args.side == "vlrlhf-separate":  # the group forward off: every completion its own row
        from vlrlhf.models.base import Adapter

        Adapter._group_inputs = lambda self, *a, **k: (None, None)
    from jobs.run import start_ray

    start_ray(dashboard=False)  # the prompt stream is a Ray Data pipeline; every role runs in this process
    online.OnlineJob(load_spec(spec_file), work / "run").run()
    later = splits[1:]
    return rates(marks, args.prompts, tokens) | {"mean_length": statistics.mean(tokens) / (args.prompts * args.group),
                                                 "steps": len(marks), "first_reward": rewards[0],
                                                 **{key: sum(x[key] for x in later) / len(later) for key in later[0]}}


# ---------------------------------------------------------------- TRL
def run_trl(model: pathlib.Path, work: pathlib.Path, args) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(THREADS)
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines()[:args.prompts * args.steps]]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": r["prompt"]}]}],
                                  "images": [Image.open(DATA / r["image"]).convert("RGB")]} for r in rows])

    def length_reward(completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [-PENALTY * len(text) for text in texts]

    marks, lengths, rewards = [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(clocks())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])
                rewards.append(logs.get("reward", float("nan")))

    completions = args.prompts * args.group
    config = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=completions,
                        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
                        num_generations=args.group, max_completion_length=args.tokens, temperature=1.0, top_p=1.0,
                        top_k=0, beta=0.0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                        weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps, logging_steps=1,
                        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                        bf16=False, fp16=False, disable_tqdm=True, shuffle_dataset=False)
    trainer = GRPOTrainer(model=AutoModelForImageTextToText.from_pretrained(model), reward_funcs=[length_reward],
                          args=config, train_dataset=dataset, processing_class=AutoProcessor.from_pretrained(model),
                          callbacks=[Clock()])
    trainer.train()
    tokens = [length * completions for length in lengths]
    return rates(marks, args.prompts, tokens) | {"mean_length": statistics.mean(lengths), "steps": len(marks),
                                                 "first_reward": rewards[0]}


# ---------------------------------------------------------------- driver
def child(args) -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"{args.side}-", dir=args.work))
    runner = run_trl if args.side == "trl" else run_vlrlhf
    result = runner(pathlib.Path(args.model_dir), work, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the driver (kB on Linux)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--geometry", choices=sorted(GEOMETRY), default="small",
                        help="small: 128 px / patch 16 (64 image tokens); llava15: 336 px / patch 14 (576)")
    parser.add_argument("--sides", nargs="+", default=["vlrlhf", "vlrlhf-separate", "trl"],
                        help="vlrlhf-separate: vlrlhf with the group forward off")
    parser.add_argument("--work", default=None)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="grpo_vs_trl-")
    if args.side:
        return child(args)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    folder = build(pathlib.Path(args.work) / f"model-{args.geometry}", args.geometry)
    results = {side: [] for side in args.sides}
    for _ in range(args.rounds):  # alternating, so that machine load hits every side alike
        for side in args.sides:
            command = [sys.executable, __file__, "--side", side, "--model-dir", str(folder), "--work", args.work,
                       *[f"--{k}={getattr(args, k)}" for k in ("steps", "prompts", "group", "tokens")]]
            out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{side} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            results[side].append(json.loads(lines[-1][len("RESULT "):]))
            print(f"  {side:7s} {results[side][-1]}", flush=True)
    keys = ("prompts_per_s", "tokens_per_s", "prompts_per_cpu_s", "tokens_per_cpu_s", "mean_length", "peak_rss_mb")
    median = {side: {key: statistics.median(r[key] for r in runs) for key in keys} for side, runs in results.items()}
    print(f"GRPO {args.prompts} prompts x {args.group} samples, <= {args.tokens} tokens, {args.geometry} geometry, "
          f"medians of {args.rounds} runs each:")
    for side, m in median.items():
        print(f"  {side:7s} {m['prompts_per_s']:.2f} prompts/s, {m['tokens_per_s']:.0f} tokens/s (wall); "
              f"{m['prompts_per_cpu_s']:.2f} prompts/CPU-s, {m['tokens_per_cpu_s']:.0f} tokens/CPU-s; "
              f"mean length {m['mean_length']:.1f}; peak RSS {m['peak_rss_mb']:.0f} MB (the side's main process)")
    for side in (s for s in args.sides if s.startswith("vlrlhf")):
        split = {key: statistics.median(r[key] for r in results[side]) for key in ("rollout_s", "score_s", "train_s")}
        print(f"  {side} step split (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
        if "trl" in median:
            ratio = {key: median[side][key] / median["trl"][key] for key in keys[:4]}
            print(f"  {side} / TRL: " + ", ".join(f"{value:.2f}x {key}" for key, value in ratio.items()), flush=True)


if __name__ == "__main__":
    main()
