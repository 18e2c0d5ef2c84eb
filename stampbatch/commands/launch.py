"""CLI for cluster training: launch (one job per architecture), status, collect."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stampbatch.commands._types import positive_float, positive_int
from stampbatch.errors import UsageError

EXECUTOR_CHOICES = ("auto", "slurm", "local")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", help="train every architecture as Slurm jobs (or local jobs), one command",
        description="Submit one training job per architecture, as one Slurm job array "
                    "(submitit), and return at once; the jobs checkpoint and requeue "
                    "themselves on preemption or time-out. Writes RUNS/launch-manifest.json. "
                    "Options given here override the job file.")
    p.add_argument("spec", type=Path, nargs="?", metavar="SPEC.toml",
                   help="job specification (see jobs/train_all.toml); optional when --data "
                        "is given")
    p.add_argument("--data", type=Path, metavar="FILE.h5", help="labelled stamp store")
    p.add_argument("--arch", action="extend", nargs="+", metavar="NAME", dest="architectures",
                   help="architectures to train (repeatable; default: the file's, or all)")
    p.add_argument("--epochs", type=positive_int, metavar="N",
                   help="epochs for every architecture (overrides per-architecture epochs)")
    p.add_argument("--runs", type=Path, metavar="DIR", help="runs directory")
    p.add_argument("--executor", choices=EXECUTOR_CHOICES,
                   help="slurm, local (submitit's local executor), or auto (default: the "
                        "file's, else slurm when sbatch is on PATH)")
    p.add_argument("--time", type=_time_limit, metavar="LIMIT", dest="time_min",
                   help="time limit per job, as sbatch reads it: a bare number is minutes "
                        "(30 = half an hour), or HH:MM:SS, D-HH:MM:SS (overrides [slurm] "
                        "time_min); a job that reaches it checkpoints and is requeued")
    p.add_argument("--wait", action="store_true",
                   help="follow the jobs with a live status line until all end, then print a "
                        "summary and write the report")
    p.add_argument("--dry-run", action="store_true",
                   help="list the jobs and print the sbatch script Slurm would be given (whatever "
                        "the executor); submit nothing")
    p.add_argument("--poll", type=positive_float, default=5.0, metavar="SECONDS",
                   help="with --wait: seconds between status checks (default 5)")
    p.set_defaults(func=run_launch)

    p = sub.add_parser(
        "status", help="state, epoch, best metric and log of each launched job",
        description="For the latest job of each architecture launched into RUNS_DIR: the "
                    "scheduler's state (asked afresh), epoch/epochs and best validation "
                    "metrics from the run directory, the log path, and the error line of a "
                    "failed job. Exit status 1 when a job failed.")
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR")
    p.set_defaults(func=run_status)

    p = sub.add_parser(
        "collect", help="write the side-by-side report of the finished runs",
        description="Write RUNS_DIR/report.html comparing every finished run and list the "
                    "launched jobs that have not completed.")
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR")
    p.set_defaults(func=run_collect)


def _time_limit(text: str) -> int:
    from stampbatch.slurm.launch import slurm_minutes

    try:
        return slurm_minutes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_launch(args: argparse.Namespace) -> int:
    from stampbatch.slurm import job_status, launch

    if args.spec is not None:
        spec = launch.load_spec(args.spec)
    elif args.data is not None:
        spec = launch.LaunchSpec()
    else:
        raise UsageError("give a job file (SPEC.toml) or at least --data")
    spec = launch.apply_options(spec, data=args.data, architectures=args.architectures,
                                epochs=args.epochs, runs=args.runs, executor=args.executor,
                                time_min=args.time_min)
    source = str(args.spec) if args.spec is not None else "command line"
    plans = launch.resolve(spec, source)
    if args.dry_run:
        runs = spec.runs.expanduser().absolute()
        folder = runs / launch.SUBMITIT_DIR / "LAUNCH_ID" / "%j"
        kind = launch.choose_executor(spec.executor) if spec.executor != "slurm" else "slurm"
        print(f"dry run: {len(plans)} job(s) for executor {kind}; nothing submitted",
              file=sys.stderr)
        for i, plan in enumerate(plans):
            print(f"  task {i}: {plan.arch} -> {plan.run_dir} ({plan.config.epochs} epochs, "
                  f"data {plan.data})", file=sys.stderr)
        print(launch.sbatch_script(spec, plans, folder), end="")
        return 0
    record = launch.launch(spec, spec_file=args.spec, plans=plans)
    runs = Path(record["spec"]["runs"])
    ids = ", ".join(f"{j['arch']} {j['job_id']}" for j in record["jobs"])
    print(f"launched {len(record['jobs'])} job(s) ({record['executor']}): {ids}")
    print(f"manifest: {job_status.manifest_path(runs)}")
    if not args.wait:
        print(f"follow with: stampbatch status {runs}")
        return 0
    statuses = job_status.wait_for_jobs(record, poll_s=args.poll)
    return _summarise(runs, statuses)


def _summarise(runs: Path, statuses) -> int:
    from stampbatch.slurm import job_status, launch

    print(job_status.format_status(statuses))
    done = [s for s in statuses if s.completed]
    if done:
        from stampbatch.report import html as report

        print(f"report: {report.write_report(runs)}")
    failed = [s for s in statuses if not s.completed]
    if failed:
        names = ", ".join(f"{s.arch} ({s.state})" for s in failed)
        raise launch.LaunchError(f"{len(failed)} of {len(statuses)} job(s) did not complete: "
                                 f"{names}; error lines and logs above")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from stampbatch.slurm import job_status

    if not args.runs_dir.is_dir():
        raise UsageError(f"{args.runs_dir}: no such runs directory")
    if not job_status.manifest_path(args.runs_dir).exists():
        raise UsageError(f"{args.runs_dir}: no {job_status.MANIFEST_NAME} (nothing was launched "
                         f"into this directory)")
    statuses = job_status.job_statuses(args.runs_dir)
    print(job_status.format_status(statuses))
    return 1 if any(s.error for s in statuses) else 0


def run_collect(args: argparse.Namespace) -> int:
    from stampbatch.slurm import job_status

    path, unfinished = job_status.collect(args.runs_dir)
    print(f"report: {path}")
    if unfinished:
        print("not completed:")
        for s in unfinished:
            line = f"  {s.arch} job {s.job_id}: {s.state}, epoch {s.epoch}/{s.epochs}, log {s.log}"
            print(line + (f"\n    error: {s.error}" if s.error else ""))
    return 0
