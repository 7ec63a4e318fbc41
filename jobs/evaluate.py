"""`vlrlhf eval`: generate answers for benchmark files on Ray Data, score, report.

    benchmark TSVs -> BenchItems (images resolved)  -> unique (prompt, image) requests
      -> ray.data.from_items(...).map_batches(Generator, pool of N)       greedy, one model per actor
      -> predictions per index -> Benchmark.score (rules; a judge where they do not suffice)
      -> OUTPUT/<bench>/predictions.{jsonl,tsv}, OUTPUT/scores.json, OUTPUT/results.md

Identical requests (MMBench rotations under a bare prompt, repeated questions) are
generated once. Greedy decoding with fixed settings: a rerun gives the same answers.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time

from vlrlhf.data.pipeline import NO_RESTARTS, quiet_remote_args
from vlrlhf.data.reader import BadRecords
from vlrlhf.eval.benchmarks import find_file, get_benchmark
from vlrlhf.eval.judge import JudgeSpec, make_judge
from vlrlhf.eval.spec import EvalSpec
from vlrlhf.eval.tsv import write_tsv


def request_key(prompt: str, images: list[bytes]) -> str:
    digest = hashlib.sha256(prompt.encode())
    for image in images:
        digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()


def generate_all(spec: EvalSpec, requests: dict[str, tuple[str, list[bytes]]]) -> dict[str, tuple[str, str]]:
    """key -> (prediction, error) for every request, on Ray Data with `resources.num_workers` actors,
    or in this process with `num_workers: 0` (no Ray; what a driver that already holds torch uses
    for a small benchmark: no worker process to start)."""
    from actors.generator import Generator

    if not requests:
        return {}
    rows = [{"key": key, "prompt": prompt, "images": images} for key, (prompt, images) in requests.items()]
    settings = {"model_path": spec.model.path, "adapter": spec.model.adapter, "dtype": spec.model.dtype,
                "max_new_tokens": spec.generation.max_new_tokens, "micro_batch_size": spec.generation.batch_size,
                "trust_remote_code": spec.model.trust_remote_code}
    if spec.resources.num_workers == 0:
        generator, out = Generator(**settings), {}
        for start in range(0, len(rows), spec.generation.batch_size):
            chunk = rows[start:start + spec.generation.batch_size]
            batch = generator({name: [row[name] for row in chunk] for name in ("key", "prompt", "images")})
            out.update(zip(batch["key"], zip(batch["prediction"], batch["error"], strict=True), strict=True))
        return out
    import ray

    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // spec.generation.batch_size,
                                                                       64)))
    resources = spec.resources
    with quiet_remote_args():  # a lost generator fails the evaluation instead of a warning per run
        out = dataset.map_batches(
            Generator, batch_size=spec.generation.batch_size,
            compute=ray.data.ActorPoolStrategy(size=resources.num_workers),
            num_cpus=resources.cpus, num_gpus=resources.gpus or None, fn_constructor_kwargs=settings, **NO_RESTARTS)
    return {row["key"]: (row["prediction"], row["error"]) for row in out.take_all()}


def judge_for(spec: EvalSpec, output: pathlib.Path):
    if spec.judge is None:
        return make_judge(None)
    settings = spec.judge.model_dump()
    settings["cache"] = settings["cache"] or str(output / "judge_cache.jsonl")
    return make_judge(JudgeSpec(**settings))


def run_eval(spec: EvalSpec) -> dict:
    output = pathlib.Path(spec.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    bad = BadRecords(spec.on_bad_record, output / "quarantine.jsonl")
    started = time.perf_counter()
    loaded, requests = {}, {}
    for name in spec.benchmarks:
        bench = get_benchmark(name, spec.rules)
        path = pathlib.Path(spec.data)
        path = find_file(bench, path) if path.is_dir() else path
        items = bench.read(path, bad)[: spec.limit]
        keyed = []
        for item in items:
            prompt = bench.prompt(item)
            key = request_key(prompt, item.images)
            requests[key] = (prompt, item.images)
            keyed.append((item, key))
        loaded[name] = (bench, path, keyed)
    print(f"eval: {sum(len(k) for _, _, k in loaded.values())} questions, {len(requests)} distinct requests "
          f"from {len(loaded)} benchmark(s)", flush=True)
    answers = generate_all(spec, requests)
    judge = judge_for(spec, output)
    scores = {}
    for name, (bench, path, keyed) in loaded.items():
        items, predictions = [], {}
        for item, key in keyed:
            prediction, error = answers[key]
            if error:
                bad.handle(f"{path}:row {item.row} (index {item.index})", error.split(":", 1)[0], error,
                           stage="eval")
                continue
            items.append(item)
            predictions[item.index] = prediction
        score = bench.score(items, predictions, judge)
        write_predictions(output / name, score, {item.index: bench.prompt(item) for item in items})
        scores[name] = score.to_json() | {"file": str(path)}
        print(f"{name}: {score.headline}={score.metrics.get(score.headline, 0.0):.2f} {score.counts}", flush=True)
    result = {"model": spec.model.path, "rules": spec.rules, "benchmarks": scores, "bad_records": bad.summary(),
              "judge": None if spec.judge is None else JudgeSpec(**spec.judge.model_dump()).public(),
              "seconds": round(time.perf_counter() - started, 1)}
    (output / "scores.json").write_text(json.dumps(result, indent=1))
    (output / "results.md").write_text(markdown_table(result))
    print(markdown_table(result))
    return result


def write_predictions(folder: pathlib.Path, score, prompts: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.jsonl").open("w") as handle:
        for detail in score.details:
            handle.write(json.dumps({**detail, "prompt": prompts.get(detail["index"], "")}, default=str) + "\n")
    if score.details:
        write_tsv(folder / "predictions.tsv", [{"index": d["index"], "prediction": d["prediction"]}
                                               for d in score.details])


def markdown_table(result: dict) -> str:
    lines = [f"model: `{result['model']}`, rules: {result.get('rules', 'official')}", "",
             "| benchmark | metric | value | items | notes |",
             "|---|---|---|---|---|"]
    for name, score in result["benchmarks"].items():
        counts = dict(score["counts"])
        items = counts.pop("items", "")
        notes = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        lines.append(f"| {name} | {score['headline']} | {score['metrics'].get(score['headline'], 0.0):.2f} | "
                     f"{items} | {notes} |")
    return "\n".join(lines) + "\n"


def compare(run_a: str, run_b: str) -> str:
    """Per benchmark and top-level metric: A, B and B - A."""
    def load(run):
        path = pathlib.Path(run)
        path = path / "scores.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"{run}: no scores.json (an output folder of `vlrlhf eval`)")
        return json.loads(path.read_text())

    a, b = load(run_a), load(run_b)
    lines = [f"A: {a['model']}", f"B: {b['model']}", "", "| benchmark | metric | A | B | B - A |",
             "|---|---|---|---|---|"]
    rules_a, rules_b = a.get("rules", "official"), b.get("rules", "official")
    if rules_a != rules_b:  # the same answers score differently under the two rule sets
        lines.insert(2, f"warning: A was scored with rules={rules_a}, B with rules={rules_b}")
    for name in [n for n in a["benchmarks"] if n in b["benchmarks"]]:
        metrics_a, metrics_b = a["benchmarks"][name]["metrics"], b["benchmarks"][name]["metrics"]
        headline = a["benchmarks"][name]["headline"]
        names = [headline] + sorted(m for m in metrics_a if m in metrics_b and m != headline and "/" not in m)
        for metric in names:
            if metric in metrics_a and metric in metrics_b:
                delta = metrics_b[metric] - metrics_a[metric]
                lines.append(f"| {name} | {metric} | {metrics_a[metric]:.2f} | {metrics_b[metric]:.2f} | "
                             f"{delta:+.2f} |")
    only = sorted(set(a["benchmarks"]) ^ set(b["benchmarks"]))
    if only:
        lines.append(f"\nin one run only: {', '.join(only)}")
    return "\n".join(lines) + "\n"
