"""Failure recovery: `trainer.max_failures`, with Ray Train's FailureConfig semantics.

    summary = run_with_recovery(spec, lambda attempt: OfflineJob(attempt, run_dir))

An attempt builds the job (its actor groups), runs it and tears it down. When a
worker or a node fails during an attempt (any Ray error from a call: a dead actor, a
lost node or object, an exception in a worker such as a collective's timeout; or
placement that timed out), the groups are torn down and, while the failures do not
exceed max_failures (-1: no limit), a new attempt recreates them where resources
allow and resumes from the last complete checkpoint: the newest one this run
committed, else whatever checkpoint.resume named. Nothing after that checkpoint is
kept, so the finished run equals a run resumed from it without failures.
What a restart cost is printed once the new attempt has trained its first step: the
seconds from the failure to that step (teardown, new groups, resume, the step) and the
steps it redid (those done after the checkpoint it resumed from).
Errors of the driver itself (a bad spec, bad data with on_bad_record: raise, a
budget that cannot fit) are not retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from actors.group import PlacementTimeout, cluster_settings
from vlrlhf.config import JobSpec


def retryable() -> tuple[type[BaseException], ...]:
    import ray.exceptions

    return ray.exceptions.RayError, PlacementTimeout


def resumed_spec(spec: JobSpec, checkpoint: str | None) -> JobSpec:
    """The spec of the next attempt: resume from `checkpoint` when this run committed one."""
    if checkpoint is None:
        return spec
    attempt = spec.model_copy(deep=True)
    attempt.checkpoint.resume = checkpoint
    return attempt


def run_with_recovery(spec: JobSpec, make_job: Callable[[JobSpec], object]) -> dict:
    """Run `make_job(spec).run()`, restarting after failures as trainer.max_failures allows.
    The job has `run()`, `shutdown()` and `checkpoints` (jobs.checkpoints)."""
    limit = spec.trainer.max_failures
    failures, last_checkpoint, attempt, restart = 0, None, spec, None
    while True:
        job = None
        try:
            with cluster_settings(spec.trainer):
                job = make_job(attempt)
                job.restart = restart
                return job.run()
        except retryable() as error:
            saved = getattr(getattr(job, "checkpoints", None), "last_saved", None)
            last_checkpoint = saved or last_checkpoint
            failures += 1
            # steps this attempt had finished, for the report (an attempt that failed before its
            # first step, e.g. while resuming, carries the earlier failure's count)
            unreported = job is None or getattr(job, "restart", None) is not None
            reached = (restart or {}).get("reached") if unreported else getattr(job, "step", None)
            restart = {"number": failures, "failed_at": time.perf_counter(), "reached": reached}
            summary = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            if limit != -1 and failures > limit:
                print(f"failure {failures}: {type(error).__name__}: {summary}; trainer.max_failures={limit} "
                      "reached, giving up", flush=True)
                raise
            attempt = resumed_spec(spec, last_checkpoint)
            print(f"failure {failures} of at most {'unlimited' if limit == -1 else limit}: "
                  f"{type(error).__name__}: {summary}; tearing the groups down and restarting from "
                  f"{last_checkpoint or 'checkpoint.resume=' + spec.checkpoint.resume}", flush=True)
        finally:
            if job is not None:
                job.shutdown()


def report_restart(job) -> None:
    """Called by a job after each step: the first step after a restart prints what it cost."""
    restart = getattr(job, "restart", None)
    if restart is None:
        return
    job.restart = None
    resumed_at = job.step - 1
    redone = max(0, (restart["reached"] or 0) - resumed_at)
    print(f"restart {restart['number']} cost {time.perf_counter() - restart['failed_at']:.1f} s from the failure to "
          f"the first step after it (step {job.step}); {redone} step(s) redone (reached {restart['reached']}, "
          f"resumed at {resumed_at})", flush=True)
