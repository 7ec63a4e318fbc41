"""`vlrlhf demo`: the main job on its embedded defaults, then before/after numbers.

1. SFT of a tiny LLaVA on the bundled shapes data (configs/demo_sft.yaml), local Ray, CPU;
2. DPO from the SFT checkpoint on the shapes preference pairs (configs/demo_dpo.yaml);
3. GRPO from the SFT checkpoint on the shapes prompts with an exact-match reward
   (configs/demo_grpo.yaml): the mean sampled reward of its first and last 10 steps;
4. held-out metrics of the random base, SFT, DPO and GRPO models:
   - preference accuracy: share of test pairs where log pi(chosen) > log pi(rejected)
   - exact match: greedy answers equal to the reference answer on the test questions
   - hallucination: share of the test questions the SFT captions hallucinate on (the
     colour of a triangle or square; vlrlhf.data.synthetic.HALLUCINATIONS) answered
     with the hallucinated colour
   - shapes benchmark: the same questions as a multiple-choice benchmark TSV, run
     through `vlrlhf eval` (Ray Data generation, MMBench's circular scoring).

`vlrlhf demo --models` is the model-layer check instead: every tiny family encoded,
scored and generated with.
"""

from __future__ import annotations

import json
import pathlib
import time

import torch

from vlrlhf.bundle import bundle_root
from vlrlhf.data.images import load_image
from vlrlhf.data.reader import read_records
from vlrlhf.data.synthetic import HALLUCINATIONS
from vlrlhf.models.logprobs import sequence_logprobs
from vlrlhf.models.registry import load_adapter
from vlrlhf.models.tiny import FAMILIES, build_tiny_model

ROOT = bundle_root()  # configs/ and data/: the checkout's, or the installed package's copy
DATA = ROOT / "data" / "shapes"


# ---------------------------------------------------------------- held-out metrics

@torch.no_grad()
def preference_accuracy(adapter, model, records, image_root, batch_size: int = 32) -> float:
    wins = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        chosen, rejected = [], []
        for record in chunk:
            images = [load_image(s, image_root=image_root) for s in record.images]
            prompt = [m.model_dump() for m in record.prompt]
            chosen.append(adapter.encode(prompt + [{"role": "assistant", "content": record.chosen}], images))
            rejected.append(adapter.encode(prompt + [{"role": "assistant", "content": record.rejected}], images))
        scores = []
        for examples in (chosen, rejected):
            batch = adapter.collate(examples)
            scores.append(sequence_logprobs(adapter.token_logprobs(model, batch), batch.loss_mask))
        wins += int((scores[0] > scores[1]).sum())
    return wins / len(records)


@torch.no_grad()
def greedy_answers(adapter, model, records, image_root, batch_size: int = 32) -> list[str]:
    answers = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [adapter.encode_prompt([m.model_dump() for m in r.messages[:-1]],
                                         [load_image(s, image_root=image_root) for s in r.images]) for r in chunk]
        outputs = adapter.generate(model, adapter.collate(prompts, padding_side="left"), max_new_tokens=6)
        answers += [adapter.tokenizer.decode(tokens, skip_special_tokens=True).strip().lower() for tokens in outputs]
    return answers


def exact_match(records, answers: list[str]) -> float:
    hits = sum(a == r.messages[-1].content.strip().lower() for r, a in zip(records, answers, strict=True))
    return hits / len(records)


def hallucination_rate(records, answers: list[str]) -> float:
    """Share of the questions the SFT captioner hallucinates on (the colour of a triangle or a
    square that is not its prior colour) answered with the hallucination."""
    asked = [(a, HALLUCINATIONS[shape]) for r, a in zip(records, answers, strict=True)
             for shape in HALLUCINATIONS if r.messages[-2].content.endswith(f"colour is the {shape}?")
             and r.messages[-1].content != HALLUCINATIONS[shape]]
    return sum(answer == prior for answer, prior in asked) / max(1, len(asked))


def held_out_metrics(path: str) -> dict[str, float]:
    adapter = load_adapter(path)
    model = adapter.load_model().eval()
    pairs = read_records(str(DATA / "test_preference.json"), "plain_dpo")
    questions = read_records(str(DATA / "test_sft.json"), "llava")
    answers = greedy_answers(adapter, model, questions, DATA)
    return {"preference_accuracy": preference_accuracy(adapter, model, pairs, DATA),
            "exact_match": exact_match(questions, answers), "hallucination": hallucination_rate(questions, answers)}


# ---------------------------------------------------------------- the demo

def run_demo(out_dir: str | pathlib.Path = ".demo", seed: int = 0) -> dict[str, dict[str, float]]:
    from jobs.evaluate import run_eval
    from jobs.offline import run_offline
    from jobs.online import run_online
    from jobs.run import start_ray
    from vlrlhf.config import check_inputs, load_spec
    from vlrlhf.eval.benchmarks.shapes import build_shapes_bench
    from vlrlhf.eval.spec import load_eval_spec

    out = pathlib.Path(out_dir).resolve()
    started = time.perf_counter()
    start_ray()
    sft_spec = load_spec(ROOT / "configs" / "demo_sft.yaml",
                         [f"checkpoint.dir={out / 'sft' / 'checkpoints'}", f"trainer.seed={seed}"])
    check_inputs(sft_spec)
    base = sft_spec.model.path
    sft = run_offline(sft_spec, out / "sft")
    dpo_spec = load_spec(ROOT / "configs" / "demo_dpo.yaml",
                         [f"model.path={sft['checkpoint']}", f"checkpoint.dir={out / 'dpo' / 'checkpoints'}",
                          f"trainer.seed={seed}"])
    dpo = run_offline(dpo_spec, out / "dpo")
    grpo_spec = load_spec(ROOT / "configs" / "demo_grpo.yaml",
                          [f"model.path={sft['checkpoint']}", f"checkpoint.dir={out / 'grpo' / 'checkpoints'}",
                           f"trainer.seed={seed}", "trainer.log_every=10"])
    grpo = run_online(grpo_spec, out / "grpo")
    rewards = [row["train/reward"] for row in map(json.loads, (out / "grpo" / "metrics.jsonl").open())
               if "train/reward" in row]
    models = (("base (random)", base), ("after SFT", sft["checkpoint"]), ("after DPO", dpo["checkpoint"]),
              ("after GRPO", grpo["checkpoint"]))
    results = {name: held_out_metrics(path) for name, path in models}
    build_shapes_bench(DATA, out / "bench" / "Shapes_MC.tsv")
    for number, (name, path) in enumerate(models):
        spec = load_eval_spec(None, [f"model.path={path}", "benchmarks=[shapes]", f"data={out / 'bench'}",
                                     f"output={out / 'eval' / str(number)}", "generation.max_new_tokens=6",
                                     "resources.num_workers=0"])  # in this process: no worker to start per model
        scores = run_eval(spec)["benchmarks"]["shapes"]["metrics"]
        results[name]["shapes_bench"] = scores["overall"] / 100
    print()
    print(f"held-out shapes test set ({len(read_records(str(DATA / 'test_preference.json'), 'plain_dpo'))} pairs, "
          f"{len(read_records(str(DATA / 'test_sft.json'), 'llava'))} questions)")
    print(f"{'model':<16}{'preference accuracy':>22}{'exact match':>14}{'hallucination':>15}{'shapes bench':>15}")
    for name, metrics in results.items():
        print(f"{name:<16}{metrics['preference_accuracy']:>22.2f}{metrics['exact_match']:>14.2f}"
              f"{metrics['hallucination']:>15.2f}{metrics['shapes_bench']:>15.2f}")
    reward_accuracy = dpo["eval"].get("eval/reward_accuracy", 0.0)
    print(f"DPO reward accuracy on the test pairs (implicit reward vs its SFT reference): {reward_accuracy:.2f}")
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    results["grpo_reward"] = {"first_10_steps": first, "last_10_steps": last}
    print(f"GRPO mean sampled reward over {len(rewards)} steps: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; checkpoints under {out}")
    return results


# ---------------------------------------------------------------- the model-layer check

def check_family(family: str, path: pathlib.Path) -> dict:
    from PIL import Image, ImageDraw

    started = time.perf_counter()
    adapter = load_adapter(path)
    model = adapter.load_model().eval()
    image = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(image).polygon([(28, 6), (6, 50), (50, 50)], fill="red")
    conversation = [{"role": "user", "content": "<image>\nWhat colour is the triangle?"},
                    {"role": "assistant", "content": "red"}]
    batch = adapter.collate([adapter.encode(conversation, [image])])
    with torch.no_grad():
        logps = sequence_logprobs(adapter.token_logprobs(model, batch), batch.loss_mask)
    prompt = adapter.collate([adapter.encode_prompt(conversation[:1], [image])], padding_side="left")
    generated = adapter.generate(model, prompt, max_new_tokens=6)[0]
    return {"family": family, "model_type": adapter.config.model_type,
            "params": sum(p.numel() for p in model.parameters()),
            "tokens": batch.input_ids.shape[1], "label_tokens": int(batch.loss_mask.sum()),
            "answer_logp": float(logps[0]), "generated": len(generated),
            "seconds": time.perf_counter() - started}


def run_model_demo(out_dir: str | pathlib.Path = ".demo/tiny") -> list[dict]:
    rows = [check_family(family, build_tiny_model(family, pathlib.Path(out_dir) / family)) for family in FAMILIES]
    header = (f"{'family':<14}{'model_type':<14}{'params':>9}{'tokens':>8}{'labels':>8}"
              f"{'log p(answer)':>15}{'gen':>5}{'s':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['family']:<14}{row['model_type']:<14}{row['params']:>9,}{row['tokens']:>8}"
              f"{row['label_tokens']:>8}{row['answer_logp']:>15.3f}{row['generated']:>5}{row['seconds']:>6.1f}")
    return rows
