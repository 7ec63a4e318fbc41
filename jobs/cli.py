"""The `vlrlhf` command."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_tiny_model(args) -> int:
    from vlrlhf.models.tiny import build_tiny_model

    path = build_tiny_model(args.family, args.out_dir, seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {path}")
    return 0


def cmd_demo(args) -> int:
    from jobs.demo import run_demo, run_model_demo

    if args.no_dashboard:
        os.environ["VLRLHF_DASHBOARD"] = "0"  # read by jobs.run.start_ray
    if args.verbose:
        os.environ["VLRLHF_VERBOSE"] = "1"  # read by jobs.run.start_ray: Ray Data's own log lines too

    if args.models:
        run_model_demo(f"{args.out_dir}/tiny")
    else:
        run_demo(args.out_dir, seed=args.seed)
    return 0


def cmd_data_synth(args) -> int:
    from vlrlhf.data.synthetic import KINDS, synthesize

    if args.kind == "agent":
        from vlrlhf.data.agent import synthesize_agent

        for path in synthesize_agent(args.out_dir, count=args.num_train or 64, seed=args.seed).values():
            print(f"wrote {path}")
        print(f"image_root: {args.out_dir} (agent.jsonl: prompts; agent_sft.json: llava)")
        return 0
    if args.kind == "geometry":
        from vlrlhf.data.geometry import synthesize_geometry

        for path in synthesize_geometry(args.out_dir, num_train=args.num_train or 200, num_test=args.num_test or 50,
                                        seed=args.seed).values():
            print(f"wrote {path}")
        print(f"image_root: {args.out_dir} (format: geometry3k; geometry_sft.json: llava)")
        return 0
    kinds = KINDS if args.kind == "all" else ("sft",) if args.kind == "bench" else (args.kind,)
    written = synthesize(args.out_dir, kinds, num_train=args.num_train or 400, num_test=args.num_test or 100,
                         seed=args.seed)
    for path in written.values():
        print(f"wrote {path}")
    if args.kind in ("all", "bench"):
        import pathlib

        from vlrlhf.eval.benchmarks.shapes import build_shapes_bench

        bench = pathlib.Path(args.out_dir) / "Shapes_MC.tsv"
        build_shapes_bench(args.out_dir, bench)
        print(f"wrote {bench} (vlrlhf eval --bench shapes --data {args.out_dir})")
    print(f"image_root: {args.out_dir}")
    return 0


def cmd_data_check(args) -> int:
    from jobs.data_check import check_data, print_report

    import pathlib

    image_root = args.image_root or str(pathlib.Path(args.paths[0]).parent)  # default: the first file's folder
    report = check_data(args.paths, args.format, model_path=args.model, task=args.task, image_root=image_root,
                        max_length=args.max_length, quarantine=args.quarantine, image_overflow=args.image_overflow)
    print_report(report)
    return 0


def cmd_run(args) -> int:
    from jobs.run import run_job

    if args.no_dashboard:
        os.environ["VLRLHF_DASHBOARD"] = "0"  # read by jobs.run.start_ray
    if args.verbose:
        os.environ["VLRLHF_VERBOSE"] = "1"  # read by jobs.run.start_ray: Ray Data's own log lines too
    return run_job(args.spec, args.overrides, run_dir=args.run_dir)


def cmd_plan(args) -> int:
    from jobs.plan import run_plan

    return run_plan(args.spec, args.overrides, args.cluster, args.records)


def cmd_eval(args) -> int:
    from jobs.evaluate import compare, run_eval
    from jobs.run import start_ray
    from vlrlhf.config import SpecError
    from vlrlhf.eval.spec import load_eval_spec

    if args.spec == "compare":
        if len(args.rest) != 2:
            raise ValueError("usage: vlrlhf eval compare RUN_A RUN_B (output folders or scores.json files)")
        print(compare(*args.rest))
        return 0
    if args.spec and "=" in args.spec and not os.path.exists(args.spec):  # flags only, then overrides
        args.rest, args.spec = [args.spec, *args.rest], None
    flags = [f"{key}={value}" for key, value in (("model.path", args.model), ("benchmarks", args.bench),
                                                 ("data", args.data), ("output", args.output),
                                                 ("limit", args.limit), ("rules", args.rules))
             if value is not None]
    try:
        spec = load_eval_spec(args.spec, flags + list(args.rest))
    except SpecError as error:
        print(f"vlrlhf: error: {error}", file=sys.stderr)
        return 2
    start_ray()
    run_eval(spec)
    return 0


def cmd_config(args) -> int:
    import json

    from vlrlhf.config import JobSpec, check_inputs, load_spec

    if args.config_command == "schema":
        print(json.dumps(JobSpec.model_json_schema(), indent=2))
        return 0
    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    import yaml

    print(yaml.safe_dump(spec.model_dump(), sort_keys=False), end="")
    return 0


def cmd_merge(args) -> int:
    from jobs.merge import merge_lora

    print(f"merged model written to {merge_lora(args.checkpoint, args.out_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vlrlhf.models.tiny import FAMILIES

    parser = argparse.ArgumentParser(
        prog="vlrlhf", description="Preference learning and RL for vision-language models on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny-model", help="write a tiny random checkpoint of a VLM family",
                               description="Write a tiny random checkpoint (HF layout, local tokenizer) "
                                           "of one VLM family; nothing is downloaded.")
    tiny.add_argument("family", choices=FAMILIES)
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)

    demo = commands.add_parser("demo", help="SFT, then DPO and GRPO, of a tiny VLM on the bundled data (CPU, minutes)",
                               description="Run the main job on its embedded defaults: SFT of a tiny LLaVA on the "
                                           "bundled shapes data on local Ray, then DPO and GRPO from the SFT "
                                           "checkpoint, then print held-out metrics of each model. --models instead "
                                           "checks every model family.")
    demo.add_argument("--out-dir", default=".demo", help="where checkpoints and logs go")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--models", action="store_true", help="encode/score/generate with every tiny family")
    demo.add_argument("--no-dashboard", action="store_true",
                      help="start local Ray without its dashboard (also: VLRLHF_DASHBOARD=0)")
    demo.add_argument("--verbose", action="store_true",
                      help="keep Ray Data's INFO lines in the log (also: VLRLHF_VERBOSE=1)")
    demo.set_defaults(func=cmd_demo)

    run = commands.add_parser("run", help="run a job spec (local Ray, or the cluster at RAY_ADDRESS)",
                              description="Run the job a YAML spec describes. Joins the Ray cluster at "
                                          "RAY_ADDRESS or starts a local one; the same command is what "
                                          "`ray job submit --working-dir . -- vlrlhf run SPEC` runs.")
    run.add_argument("spec")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides (value parsed as YAML)")
    run.add_argument("--run-dir", help="where logs, curves and the quarantine file go (default runs/NAME)")
    run.add_argument("--no-dashboard", action="store_true",
                     help="start local Ray without its dashboard (also: VLRLHF_DASHBOARD=0)")
    run.add_argument("--verbose", action="store_true",
                     help="keep Ray Data's INFO lines in the log (also: VLRLHF_VERBOSE=1)")
    run.set_defaults(func=cmd_run)

    plan = commands.add_parser("plan", help="bundles, peak GPUs/CPUs and token lengths of a spec on a cluster",
                               description="Show what a job needs before it starts: each group's bundles in "
                                           "creation order, GPUs/CPUs at the peak, CPUs left for the data pipeline "
                                           "and token lengths after image expansion against data.max_length. "
                                           "Exit code 2 when the spec cannot fit the cluster.")
    plan.add_argument("spec")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides (value parsed as YAML)")
    plan.add_argument("--cluster", help="NxGgpu:Ccpu per node kind (e.g. 2x8gpu:64cpu, joined with +), a KubeRay "
                                        "manifest or nodes YAML, or a cluster address (default: RAY_ADDRESS, else "
                                        "this machine)")
    plan.add_argument("--records", type=int, default=64, help="records whose token lengths are checked (0: none)")
    plan.set_defaults(func=cmd_plan)

    config = commands.add_parser("config", help="show the resolved spec, or its JSON schema",
                                 description="Validate a job spec and print it resolved, or print the schema.")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    show = config_commands.add_parser("show", help="validate and print the resolved spec",
                                      description="Validate a spec (with overrides) and print it resolved.")
    show.add_argument("spec")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=cmd_config)
    schema = config_commands.add_parser("schema", help="print the JSON schema of job specs",
                                        description="Print the JSON schema of job specs.")
    schema.set_defaults(func=cmd_config)

    merge = commands.add_parser("merge", help="merge a LoRA checkpoint into a full model",
                                description="Merge a LoRA adapter checkpoint into its base model and write a "
                                            "full Hugging Face folder.")
    merge.add_argument("checkpoint")
    merge.add_argument("out_dir")
    merge.set_defaults(func=cmd_merge)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint on benchmarks; `eval compare A B` puts two runs side by side",
        description="Generate answers for benchmark TSVs (VLMEvalKit layout) on Ray Data, score them by each "
                    "benchmark's rules, and write predictions, scores.json and results.md. "
                    "`vlrlhf eval compare RUN_A RUN_B` prints per-benchmark deltas.")
    evaluate.add_argument("spec", nargs="?", help="an eval spec (YAML), or 'compare'")
    evaluate.add_argument("rest", nargs="*", help="key=value overrides, or the two runs to compare")
    evaluate.add_argument("--model", help="checkpoint folder: base, LoRA adapter or merged")
    evaluate.add_argument("--bench", help="comma-separated benchmarks, e.g. mme,pope")
    evaluate.add_argument("--data", help="folder of benchmark TSVs (or one TSV)")
    evaluate.add_argument("--output", help="output folder (default runs/eval)")
    evaluate.add_argument("--limit", type=int, help="first N rows of each benchmark")
    evaluate.add_argument("--rules", choices=["official", "vlmevalkit"],
                          help="official (default): each benchmark's own scoring rules; vlmevalkit: VLMEvalKit's "
                               "exact matching, comparable with its leaderboards")
    evaluate.set_defaults(func=cmd_eval)

    data = commands.add_parser("data", help="synthetic data sets and data checks",
                               description="Work with data sets: generate the synthetic shapes data, "
                                           "or read a data set through the pipeline and report on it.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_commands.add_parser("synth", help="write the synthetic shapes data sets",
                                     description="Write coloured-shape images and SFT / preference / KTO / "
                                                 "prompt data sets (train and test) in public formats.")
    synth.add_argument("kind", choices=["all", "sft", "preference", "kto", "prompts", "bench", "geometry", "agent"],
                       help="bench: the test questions as a multiple-choice benchmark TSV (Shapes_MC.tsv); "
                            "geometry: maths problems on drawn figures (format geometry3k, and an SFT cold start)")
    synth.add_argument("out_dir")
    synth.add_argument("--num-train", type=int, help="default 400 (shapes), 200 (geometry)")
    synth.add_argument("--num-test", type=int, help="default 100 (shapes), 50 (geometry)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)
    check = data_commands.add_parser("check", help="read a data set through the pipeline and print counts",
                                     description="Count records, images, kept and skipped rows (by reason) "
                                                 "and, with --model, token lengths after image expansion.")
    check.add_argument("paths", nargs="+", help="JSON, JSONL or Parquet files (local or URI)")
    check.add_argument("--format", required=True, help="a built-in format or package.module:function")
    check.add_argument("--model", help="checkpoint folder: encode with its adapter and report token lengths")
    check.add_argument("--task", default="preference", choices=["sft", "preference", "kto", "prompt"])
    check.add_argument("--image-root", help="folder that image paths are relative to (default: the file's)")
    check.add_argument("--max-length", type=int)
    check.add_argument("--image-overflow", default="resize", choices=["resize", "skip", "raise"],
                       help="a record over --max-length: shrink its images until it fits, skip it, or stop")
    check.add_argument("--quarantine", help="where to write bad rows (JSONL)")
    check.set_defaults(func=cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:  # bad input: one clear message, exit code 2
        print(f"vlrlhf: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
