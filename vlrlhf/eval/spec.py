"""EvalSpec: what `vlrlhf eval` runs, from YAML or from command-line flags.

    model: {path: runs/demo_dpo/checkpoints/step-000075}   # base, LoRA adapter folder or merged
    benchmarks: [mme, pope]                                 # names; files found in `data`
    data: /data/vlmevalkit                                  # folder of VLMEvalKit TSVs
    judge: {base_url: http://127.0.0.1:8000/v1, model: gpt-4o, api_key_env: OPENAI_API_KEY}
    rules: official                                         # or vlmevalkit: VLMEvalKit's exact matching
"""

from __future__ import annotations

import pathlib
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from vlrlhf.config import GroupSpec, ModelSpec, Section, SpecError, _format_error, apply_override


class GenerationSpec(Section):
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)  # prompts per generate call


class JudgeSection(Section):
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # the environment variable's NAME; keys never go in specs
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    concurrency: int = Field(4, gt=0)
    cache: str | None = None  # default: OUTPUT/judge_cache.jsonl


class EvalSpec(Section):
    name: str = "eval"
    model: ModelSpec
    benchmarks: list[str]
    data: str  # a folder of TSVs (each benchmark finds its file by name prefix) or one TSV
    limit: int | None = Field(None, gt=0)  # first N rows of each benchmark (smoke runs)
    generation: GenerationSpec = GenerationSpec()
    resources: GroupSpec = GroupSpec(num_workers=1)
    judge: JudgeSection | None = None
    on_bad_record: Literal["raise", "skip"] = "raise"
    output: str = "runs/eval"
    # official: each benchmark's own rules; vlmevalkit: VLMEvalKit's exact-matching extraction and
    # aggregation, for numbers comparable with its leaderboards (docs/evaluation.md)
    rules: Literal["official", "vlmevalkit"] = "official"


def load_eval_spec(path: str | pathlib.Path | None, overrides: list[str] = ()) -> EvalSpec:
    data: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise SpecError(f"eval spec {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        apply_override(data, override)
    if isinstance(data.get("benchmarks"), str):
        data["benchmarks"] = [b.strip() for b in data["benchmarks"].split(",") if b.strip()]
    try:
        spec = EvalSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_format_error(error, str(path or "command line"))) from None
    from vlrlhf.eval.benchmarks import BENCHMARKS

    unknown = [b for b in spec.benchmarks if b not in BENCHMARKS]
    if unknown:
        raise SpecError(f"benchmarks: unknown {', '.join(unknown)}; known: {', '.join(sorted(BENCHMARKS))}")
    here = path.resolve().parent if path is not None else pathlib.Path.cwd()
    given = {override.partition("=")[0] for override in overrides}

    def resolved(key: str, value: str) -> str:  # file paths: the spec's folder; command-line paths: cwd
        base = pathlib.Path.cwd() if key in given else here
        return value if "://" in value or pathlib.Path(value).is_absolute() else str((base / value).resolve())

    if spec.model.path.startswith("tiny:"):
        from vlrlhf.models.tiny import ensure_tiny_model

        spec.model.path = str(ensure_tiny_model(spec.model.path))
    spec.data = resolved("data", spec.data)
    spec.model.path = resolved("model.path", spec.model.path)
    spec.output = str((pathlib.Path.cwd() / spec.output).resolve())  # outputs: the working directory
    if not pathlib.Path(spec.data).exists():
        raise SpecError(f"data={spec.data}: no such folder or file")
    if not (pathlib.Path(spec.model.path) / "config.json").is_file() and \
            not (pathlib.Path(spec.model.path) / "adapter_config.json").is_file():
        raise SpecError(f"model.path={spec.model.path}: no config.json or adapter_config.json there")
    return spec
