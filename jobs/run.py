"""`vlrlhf run SPEC [overrides]`: validate, start or join Ray, run the job.

A bad spec (unknown key, wrong type, missing data file, model folder without weights)
is one clear message and exit code 2, before Ray starts.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys

from vlrlhf.config import ONLINE_ALGORITHMS, SpecError, check_inputs, load_spec

RAY_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_env(environ, joining: bool) -> dict[str, str]:
    """What the job's workers get from the driver's environment. Settings of the job travel;
    DS_ACCELERATOR describes the driver's machine and travels only to a cluster this process
    starts: a driver in the CPU image (DS_ACCELERATOR=cpu) that joins a GPU cluster must not
    put DeepSpeed on CPU on every GPU worker, whose nodes set their own."""
    names = ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE") + (() if joining else ("DS_ACCELERATOR",))
    env = {name: environ[name] for name in names if name in environ}
    # Ray starts workers at niceness 15 and the driver at 0: a driver that trains (the policy
    # in-process) would starve the encode tasks that feed it; this job's workers run at its priority.
    env["RAY_worker_niceness"] = environ.get("RAY_worker_niceness", "0")
    return env


def start_ray(dashboard: bool | None = None) -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one with its dashboard on 127.0.0.1
    (`dashboard=False`, `--no-dashboard` or VLRLHF_DASHBOARD=0: without). Ray already
    initialised in this process (a test fixture, a notebook) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    for key, value in RAY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if dashboard is None:
        dashboard = os.environ.get("VLRLHF_DASHBOARD", "1").lower() not in ("0", "false", "no", "off")
    address = os.environ.get("RAY_ADDRESS")
    if not address and not _has_cuda():  # a local CPU cluster: DeepSpeed need not probe (and warn) per worker
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # nor in this process (roles in-process, checkpoints)
    runtime_env = {"env_vars": worker_env(os.environ, joining=bool(address))}
    if not address:  # a cluster this command starts keeps Ray's token authentication; the URL line says so
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DropAuthNotice())
    if address:
        context = ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
    else:
        context = ray.init(address="local", runtime_env=runtime_env, include_dashboard=dashboard,
                           dashboard_host="127.0.0.1", logging_level="WARNING")
    url = getattr(context, "dashboard_url", None)
    if url:
        url = url if "://" in url else f"http://{url}"
        # ray.init sets RAY_AUTH_MODE=token when the cluster uses token authentication
        token = " (it asks for the token `ray get-auth-token` prints)" \
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
        print(f"Ray dashboard: {url}{token}", flush=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if os.environ.get("VLRLHF_VERBOSE", "0").lower() in ("0", "false", "no", "off", ""):
        quiet_logs()


class _DropAuthNotice:
    """Ray announces that a local cluster uses token authentication (how to opt out); the
    dashboard line printed after start-up says what the token is for."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


class _DropProgressBarNotice:
    """Ray Data warns that its progress bars are off; we turned them off on purpose."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_logs() -> None:
    """One progress bar per stage in the driver log: Ray Data's console at WARNING (its
    ray-data.log in the session folder keeps everything), no execution-plan banners.
    VLRLHF_VERBOSE=1 (or `vlrlhf run --verbose`) leaves Ray Data's own logging as it is."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_DropProgressBarNotice())


def run_job(spec_path: str, overrides: list[str], run_dir: str | None = None) -> int:
    try:
        spec = load_spec(spec_path, overrides)
        check_inputs(spec)
        from jobs.plan_memory import memory_report

        problems = memory_report(spec)[1]  # GPU roles only: weights, optimizer and activations per GPU
        if problems:
            raise SpecError("the roles do not fit their GPUs (vlrlhf plan prints the plan):\n  "
                            + "\n  ".join(problems))
    except SpecError as error:
        print(f"vlrlhf: error: {error}", file=sys.stderr)
        return 2
    if spec.model.attention == "flash_attention_2" and spec.model.packing:
        print("model.attention=flash_attention_2: the packed pair and group forwards need a shared-prefix mask, "
              "which flash attention cannot take; the training roles run SDPA with the mask (model.packing=false "
              "keeps flash attention and runs separate forwards)", file=sys.stderr)
    folder = pathlib.Path(run_dir or pathlib.Path("runs") / spec.name).resolve()
    start_ray()
    from jobs.common import PipelineBudgetError

    try:
        if spec.algorithm.name in ONLINE_ALGORITHMS:
            from jobs.online import run_online

            summary = run_online(spec, folder)
        else:
            from jobs.offline import run_offline

            summary = run_offline(spec, folder)
    except PipelineBudgetError as error:  # the spec cannot run on this cluster: said before anything starts
        print(f"vlrlhf: error: {error}", file=sys.stderr)
        return 2
    if spec.evaluation is not None:  # benchmarks on the final checkpoint
        from jobs.benchmarks import run_benchmarks

        run_benchmarks(spec, summary["local_checkpoint"], folder / "eval")
    return 0
