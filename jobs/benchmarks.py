"""The job's `evaluation` benchmarks on a checkpoint: the final one, and every
`evaluation.every_steps` steps during training (offline and online jobs alike).

Each run goes through `vlrlhf eval`'s own path (jobs.evaluate.run_eval) on the step's saved
checkpoint folder, so a number logged during training is the number `vlrlhf eval` gives for
that checkpoint. Results land in RUN/eval/step-NNNNNN/ (RUN/eval/ for the final one), and
each benchmark's headline metric is logged as `bench/<name>` at its step, beside the
training metrics and in the curves.
"""

from __future__ import annotations

import pathlib

from vlrlhf.config import JobSpec


def eval_spec_for(spec: JobSpec, checkpoint: str, output: pathlib.Path):
    from vlrlhf.eval.spec import EvalSpec

    evaluation = spec.evaluation
    return EvalSpec(name=f"{spec.name}-eval", model=spec.model.model_copy(update={"path": checkpoint, "lora": None}),
                    benchmarks=evaluation.benchmarks, data=evaluation.data, limit=evaluation.limit,
                    generation={"max_new_tokens": evaluation.max_new_tokens}, judge=evaluation.judge,
                    rules=evaluation.rules, resources=evaluation.resources, output=str(output))


def headlines(result: dict) -> dict[str, float]:
    """bench/<name>: each benchmark's headline metric."""
    return {f"bench/{name}": float(score["metrics"].get(score["headline"], 0.0))
            for name, score in result["benchmarks"].items()}


def run_benchmarks(spec: JobSpec, checkpoint: str, output: pathlib.Path) -> dict[str, float]:
    from jobs.evaluate import run_eval

    return headlines(run_eval(eval_spec_for(spec, checkpoint, output)))


def due(spec: JobSpec, step: int, total_steps: int) -> bool:
    """Benchmarks at this step during training (the final step has its own run)."""
    every = spec.evaluation.every_steps if spec.evaluation is not None else None
    return bool(every) and step % every == 0 and step < total_steps


def step_output(run_dir: pathlib.Path, step: int) -> pathlib.Path:
    return run_dir / "eval" / f"step-{step:06d}"
