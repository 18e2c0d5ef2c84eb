"""Planning a scoring run: which files and models, what is done, what must be (re)done.

Models are resolved and hashed, candidate files validated (a store, not being written by
another process, a writable target), each target locked for the run, and for each
(file, model) a :class:`Plan` chosen: score from scratch, resume a journal of this very
run, or nothing (complete scores of this model file and these stamps). Journals of another
input, model or backend are discarded; a journal with other settings is refused unless
``--force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import __version__, fileio, store
from stampbatch.errors import ScoreError, StampbatchError, UsageError
from stampbatch.score import inference
from stampbatch.score.candidates import chunk_rows, dir_problem, read_only_reason
from stampbatch.score.cluster import ClusterOptions
from stampbatch.score.inference import ModelSource, ModelSpec
from stampbatch.score.journal import (
    IDENTITY_KEYS,
    JOURNAL_FORMAT,
    SETTING_KEYS,
    Journal,
    journal_root,
)
from stampbatch.score.tasks import OcclusionMode

DEFAULT_CHUNK_SIZE = 4096


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- options


# Numeric precisions of inference. Reduced precision is offered only where it is >= 1.3x
# faster end to end and agrees with FP32 on the run's held-out split (issue 14); on every
# CPU measured none was (BENCHMARKS.md: int8 1.13x inference-only and 0.5 % of decisions
# moved; bf16 1.15x inference-only, 0.84x end to end), so FP32 is the only one, and "auto"
# is FP32.
PRECISIONS = ("fp32",)


@dataclass(frozen=True)
class ScoreOptions:
    """Everything a scoring run is asked to do besides which files and models (the CLI's flags)."""

    name: str | None = None              # /scores/<name> (one model only)
    occlusion: OcclusionMode | str = "none"
    patch: int = 5                       # occluding patch side, pixels
    chunk_size: int = DEFAULT_CHUNK_SIZE  # stamps per task (rounded to the HDF5 chunking)
    out_dir: Path | str | None = None    # side files instead of writing into the candidates
    backend: str = "auto"
    precision: str = "auto"              # one of PRECISIONS or auto (see PRECISIONS)
    force: bool = False                  # always start from scratch
    skip_bad: bool = False               # skip unusable files instead of stopping
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    client: Any = None                   # an existing distributed Client (overrides cluster)
    progress: bool = True
    log: Callable[[str], None] = log_stderr

    def __post_init__(self) -> None:
        occ = self.occlusion
        object.__setattr__(self, "occlusion",
                           occ if isinstance(occ, OcclusionMode) else OcclusionMode.parse(occ))
        if not _is_int(self.patch) or self.patch < 1:
            raise UsageError(f"occlusion patch must be a positive number of pixels, got "
                             f"{self.patch!r}")
        if not _is_int(self.chunk_size) or self.chunk_size < 1:
            raise UsageError(f"chunk size must be positive, got {self.chunk_size!r}")
        if self.backend not in inference.BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}; choose from "
                             f"{', '.join(inference.BACKENDS)}")
        if self.name is not None and not isinstance(self.name, str):
            raise UsageError(f"name {self.name!r}: give a model name (text) or None")
        if not isinstance(self.cluster, ClusterOptions):
            raise UsageError(f"cluster {self.cluster!r}: expected a ClusterOptions")
        if not callable(self.log):
            raise UsageError(f"log {self.log!r}: expected a function of one message")
        if self.precision == "auto":
            object.__setattr__(self, "precision", PRECISIONS[0])
        elif self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is not offered: only "
                             f"{', '.join(PRECISIONS)} (or auto) — no reduced precision was "
                             "faster end to end and as accurate (BENCHMARKS.md)")

    def with_fields(self, fields: Mapping[str, Any]) -> ScoreOptions:
        """These options with ``fields`` changed, checked as new ones are; a name that is
        not a field is refused (a UsageError naming it and the fields there are)."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise UsageError(f"unknown scoring option(s) {', '.join(unknown)}; the options are "
                             f"{known}")
        return dataclasses.replace(self, **fields)

    @property
    def occ(self) -> OcclusionMode:
        assert isinstance(self.occlusion, OcclusionMode)
        return self.occlusion

    @property
    def patch_used(self) -> int:
        """The patch recorded with the scores (0 when no maps are made)."""
        return int(self.patch) if self.occ.kind != "none" else 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


class Plan(enum.Enum):
    """What a run does for one (file, model)."""

    SCORE = "score"              # no usable journal: every chunk
    RESUME = "resume"            # a journal of this very run: the missing chunks
    UP_TO_DATE = "up to date"    # complete scores of this model file and these stamps


def lock_target(target: Path) -> fileio.FileLock:
    """The target's write lock for a whole run, or a ScoreError naming the other scorer."""
    return fileio.FileLock(
        target, store.LOCK_SUFFIX,
        busy=lambda pid: ScoreError(f"{target} is being scored by another stampbatch process "
                                    f"(pid {pid}); refusing to interleave"),
        failed=lambda exc: ScoreError(f"{target}: cannot create the lock file {exc.filename} "
                                      f"({exc.strerror}); use --out DIR")).acquire()


# --------------------------------------------------------------------------- planning


@dataclass
class ModelWork:
    """One model's work on one file: its source, then (once prepared) the spec workers load."""

    source: ModelSource
    journal: Journal
    plan: Plan = Plan.SCORE
    spec: ModelSpec | None = None
    todo: set[int] = field(default_factory=set)      # chunk starts still to compute


@dataclass
class FileWork:
    """One candidate file: where its scores go and what remains to do."""

    candidates: Path
    target: Path
    n_stamps: int
    stamp_shape: tuple[int, int]
    chunk_rows: int
    identity: dict[str, Any]                         # the candidates' identity (manifest)
    lock: fileio.FileLock
    models: dict[str, ModelWork] = field(default_factory=dict)
    side_file: bool = False
    fresh_side: bool = False                         # a side file of other stamps: remade

    def chunks(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.chunk_rows, self.n_stamps))
                for lo in range(0, self.n_stamps, self.chunk_rows)]

    @property
    def fingerprint(self) -> str:
        return str(self.identity["stamps"])


@dataclass
class ModelSummary:
    name: str
    sha256: str
    backend: str
    stamps: int = 0
    above_half: int = 0
    unscorable: int = 0
    maps: int = 0


@dataclass
class ScoreSummary:
    """What a run did."""

    files: list[Path] = field(default_factory=list)
    targets: list[Path] = field(default_factory=list)
    models: dict[str, ModelSummary] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    up_to_date: list[tuple[Path, str]] = field(default_factory=list)
    stamps_scored: int = 0          # stamp rows computed in this run (each with every model)
    wall_s: float = 0.0
    scheduler: str = ""

    @property
    def stamps_per_s(self) -> float:
        return self.stamps_scored / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def unscorable(self) -> int:
        return max((m.unscorable for m in self.models.values()), default=0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": [str(p) for p in self.files], "targets": [str(p) for p in self.targets],
            "models": {k: asdict(v) for k, v in self.models.items()},
            "skipped": [[str(p), r] for p, r in self.skipped],
            "up_to_date": [[str(p), m] for p, m in self.up_to_date],
            "stamps_scored": self.stamps_scored, "wall_s": self.wall_s,
            "stamps_per_s": self.stamps_per_s, "scheduler": self.scheduler,
        }


class BadFiles:
    """Collects the files that cannot be scored: raises at once, or (``--skip-bad``) lists them."""

    def __init__(self, skip_bad: bool, log: Callable[[str], None]) -> None:
        self.skip_bad = skip_bad
        self.log = log
        self.skipped: list[tuple[Path, str]] = []

    def report(self, path: Path, problem: str | StampbatchError) -> None:
        message = str(problem)
        if not self.skip_bad:
            if isinstance(problem, StampbatchError):
                raise problem
            raise ScoreError(f"{path}: {message}")
        self.skipped.append((path, message))
        self.log(f"skipping {path}: {message}")

    def paths(self) -> set[Path]:
        return {p for p, _ in self.skipped}


def journal_manifest(spec: ModelSpec, options: ScoreOptions, *, source: Path,
                     identity: Any, n_stamps: int, stamp_shape: tuple[int, int],
                     chunk_rows: int) -> dict[str, Any]:
    """What identifies a journal: the input (``source`` and its ``identity``), the model and
    backend, the settings. The HDF5 scorer and the KBMOD pass journal alike."""
    return {
        "format": JOURNAL_FORMAT, "model": spec.name, "model_sha256": spec.sha256,
        "model_file": spec.keras_path, "architecture": spec.architecture,
        "backend": spec.backend, "precision": options.precision,
        "source": str(source.resolve()), "source_identity": identity, "n_stamps": n_stamps,
        "stamp_shape": list(stamp_shape), "chunk_rows": chunk_rows,
        "occlusion": str(options.occ), "occlusion_patch": options.patch_used,
        "started_at": fileio.utc_now(), "stampbatch_version": __version__,
    }


def _manifest(fw: FileWork, spec: ModelSpec, options: ScoreOptions) -> dict[str, Any]:
    return journal_manifest(spec, options, source=fw.candidates, identity=fw.identity,
                            n_stamps=fw.n_stamps, stamp_shape=fw.stamp_shape,
                            chunk_rows=fw.chunk_rows)


def _resolve_models(models: Sequence[str | Path], name: str | None) -> list[ModelSource]:
    """Models found, named and hashed (no TensorFlow yet)."""
    if not models:
        raise UsageError("give at least one model (--model RUN_DIR_OR_FILE)")
    if name is not None and len(models) > 1:
        raise UsageError(f"--name applies to one model only; got {len(models)} models")
    sources = [inference.resolve_model(m, name) for m in models]
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"two models would share the name {dupes[0]!r} (/scores/{dupes[0]}); "
                         "score them in separate runs with --name")
    return sources


def _plan_files(paths: list[Path], options: ScoreOptions, bad: BadFiles) -> list[FileWork]:
    """Candidate files that exist, are stores, are not being written, have writable targets."""
    if not paths:
        raise UsageError("no candidate files given")
    out = Path(options.out_dir) if options.out_dir is not None else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ScoreError(f"{out}: cannot create the output directory "
                             f"({exc.strerror})") from exc
    writers = fileio.writers_by_file()
    seen: dict[str, Path] = {}
    files = []
    for path in paths:
        target = _target(path, out, options.log)
        problem = _file_problem(path, target, out, writers, seen)
        if problem is not None:
            bad.report(path, problem)
            continue
        info = store.open_store(path)
        seen[os.path.realpath(target)] = path
        identity = {**fileio.file_identity(path), "stamps": store.stamps_fingerprint(path)}
        files.append(FileWork(path, target, info.n_stamps, info.stamp_shape,
                              chunk_rows(options.chunk_size, info.chunk_rows), identity,
                              fileio.FileLock(target, store.LOCK_SUFFIX),
                              side_file=target != path))
    return files


def _target(path: Path, out: Path | None, log: Callable[[str], None]) -> Path:
    """Where a file's scores go: ``--out``, or the file's own scores folder; a file that needs
    a folder of its own but would lose something to the copy-and-swap that gives it one
    (hard links, an owner we cannot give) is left untouched and scored to a side file beside
    it, as ``--out <its dir>`` does."""
    if out is not None or not path.is_file():
        return store.score_target(path, out)
    try:
        problem = store.home_problem(path) if store.needs_home(path) else None
    except (StampbatchError, OSError):
        return path
    if problem is None:
        return path
    side = store.score_target(path, path.parent)
    log(f"{path}: {problem}; left untouched, its scores go to {side}")
    return side


def _file_problem(path: Path, target: Path, out: Path | None,
                  writers: dict[tuple[int, int], int],
                  seen: dict[str, Path]) -> str | StampbatchError | None:
    """Why one candidate file cannot be scored (None: it can)."""
    if not path.exists():
        return "no such file"
    try:
        info = store.open_store(path)
    except StampbatchError as exc:
        return exc
    if info.is_score_file:
        return "is a score side file, not a candidate file"
    if os.path.realpath(target) in seen:
        return (f"writes to the same side file {target} as {seen[os.path.realpath(target)]}; "
                "score them into different --out directories")
    if out is None and (reason := read_only_reason(path)) is not None:
        return f"{reason}; write the scores to a side file with --out DIR"
    problem = dir_problem(target.parent)
    if problem is not None:
        return f"{problem} (the journal and lock live beside {target.name}); use --out DIR"
    for folder in _scores_folders(target):
        if (reason := read_only_reason(folder)) is not None:
            return f"scores folder {folder} {reason.removeprefix('is ')}; use --out DIR"
    st = os.stat(path)
    pid = writers.get((st.st_dev, st.st_ino))
    if pid is not None:
        return (f"is open for writing by another process (pid {pid}); score it when that "
                "process has finished")
    return None


def _scores_folders(target: Path) -> list[Path]:
    """The existing folders a run writes scores into (checked before any compute)."""
    if not target.exists():
        return []
    folder = store.scores_dir(target)
    return [p for p in (folder.parent, folder) if p.is_dir()]


def _lock_files(files: list[FileWork], options: ScoreOptions, bad: BadFiles,
                stack: contextlib.ExitStack) -> list[FileWork]:
    """Lock every target for the whole run; clear what killed runs left half-deleted; refuse
    a broken scores folder of the file's own (``--force``: rebuild it)."""
    locked = []
    for fw in files:
        try:
            fw.lock = lock_target(fw.target)
        except ScoreError as exc:
            bad.report(fw.candidates, exc)
            continue
        stack.callback(fw.lock.release)
        fileio.sweep_removed(journal_root(fw.target))
        store.sweep_partial(fw.target)
        try:
            if not fw.side_file:
                _check_folder(fw, options)
        except StampbatchError as exc:
            bad.report(fw.candidates, exc)
            continue
        locked.append(fw)
    return locked


def _check_folder(fw: FileWork, options: ScoreOptions) -> None:
    """A broken scores folder of the file's own is refused before any work (``--force``:
    rebuilt). A missing one (the file copied or moved without it, as a survey's candidate files
    are) is made anew, saying so: nothing wrong can be shown, and what it held elsewhere
    stays there."""
    report = store.check_scores(fw.target)
    if report.broken is not None and report.at_home:
        folder = report.folder
        missing = folder is not None and not folder.exists() and not folder.parent.is_file()
        if not options.force and not missing:
            raise ScoreError(report.broken)
        options.log(f"{fw.target}: its scores folder {folder} was missing; made anew" if missing
                    else f"{report.broken}: rebuilding (--force)")
        store.repair_scores(fw.target)


def _own_folder(fw: FileWork, options: ScoreOptions) -> None:
    """Give a file that will be scored a scores folder of its own if it lacks one (a copy, a
    renamed or foreign file), so that scoring it never changes what another file shows."""
    if store.needs_home(fw.target):
        carried = store.ensure_home(fw.target)
        options.log(f"{fw.target}: gave it a scores folder of its own ({store.scores_dir(fw.target)}"
                    f"{', carried over: ' + ', '.join(carried) if carried else ''}); the "
                    "folder it named before is unchanged")
        fw.identity = {**fileio.file_identity(fw.target), "stamps": fw.fingerprint}


def _plan_models(files: list[FileWork], sources: list[ModelSource], options: ScoreOptions,
                 bad: BadFiles, summary: ScoreSummary) -> list[FileWork]:
    """What each model must do on each file; files with nothing to do are let go. A file
    with work that has no scores folder of its own (a copy, a renamed or foreign file) gets
    one first, carrying over what it showed; one with none is never rewritten."""
    busy = []
    for fw in files:
        if fw.side_file and fw.target.exists() and not _side_file_matches(fw, options, bad):
            fw.lock.release()
            continue
        up_to_date = []
        for src in sources:
            work = _model_plan(fw, src, options, bad)
            if work is None:
                fw.models.clear()
                break
            if work.plan is Plan.UP_TO_DATE:
                up_to_date.append(src.name)
                summary.up_to_date.append((fw.target, src.name))
            else:
                fw.models[src.name] = work
        if up_to_date and fw.candidates not in bad.paths():
            shown = store.list_scores(fw.target)
            if any(m not in shown for m in up_to_date):   # a run killed before linking them
                store.link_scores(fw.target, up_to_date)
        if fw.models and fw.candidates not in bad.paths() and not fw.side_file:
            try:
                _own_folder(fw, options)
            except StampbatchError as exc:
                bad.report(fw.candidates, exc)
        if fw.models and fw.candidates not in bad.paths():
            busy.append(fw)
        else:
            fw.lock.release()          # nothing to do here: let others have the file
    return busy


def _side_file_matches(fw: FileWork, options: ScoreOptions, bad: BadFiles) -> bool:
    try:
        attrs = store.read_attrs(fw.target)
    except StampbatchError as exc:
        bad.report(fw.candidates, exc)
        return False
    src = str(attrs.get("source_file", ""))
    if src and src != str(fw.candidates.resolve()):
        bad.report(fw.candidates, f"side file {fw.target} belongs to {src}")
        return False
    made_from = (attrs.get("source_store_id"), attrs.get("source_fingerprint"))
    now = (store.store_id(fw.candidates), fw.fingerprint)
    if any(a is not None and b is not None and str(a) != str(b) for a, b in zip(made_from, now)):
        options.log(f"{fw.target}: scores in {store.scores_dir(fw.target)} belong to other "
                    f"stamps than {fw.candidates} holds now; starting the side file afresh")
        fw.fresh_side = True
    return True


def _model_plan(fw: FileWork, src: ModelSource, options: ScoreOptions,
                bad: BadFiles) -> ModelWork | None:
    """SCORE, RESUME or UP_TO_DATE for one model on one file (None: refused)."""
    journal = Journal(fw.target, src.name)
    if options.force:
        journal.remove()
        return ModelWork(src, journal, Plan.SCORE)
    if journal.manifest() is not None:
        return ModelWork(src, journal, Plan.RESUME)
    if fw.fresh_side:
        return ModelWork(src, journal, Plan.SCORE)
    status = store.score_status(fw.target, src.name) if fw.target.exists() else None
    if status is None:
        foreign = store.check_scores(fw.target).problems.get(src.name) \
            if fw.target.exists() else None
        if foreign is not None:
            options.log(f"{foreign}; rescoring")
        return ModelWork(src, journal, Plan.SCORE)
    old_sha = str(status.get("model_sha256", ""))
    if old_sha != src.sha256:
        bad.report(fw.candidates, ScoreError(
            f"{fw.target}: /scores/{src.name} was made by a different model file (sha256 "
            f"{old_sha[:12]}, now {src.sha256[:12]}); use --force to replace it or --name "
            "to score under another name"))
        return None
    if status.get("source_fingerprint", fw.fingerprint) != fw.fingerprint:
        options.log(f"{fw.target}: /scores/{src.name} was made from other stamps than "
                    f"{fw.candidates} holds now; rescoring")
        return ModelWork(src, journal, Plan.SCORE)
    options.log(f"{fw.target}: already scored by {src.name} (sha256 {old_sha[:12]}, "
                f"occlusion {status.get('occlusion_mode', 'none')}); nothing to do "
                "(--force rescores)")
    return ModelWork(src, journal, Plan.UP_TO_DATE)


def _prepare_models(files: list[FileWork], sources: list[ModelSource],
                    options: ScoreOptions, summary: ScoreSummary) -> dict[str, ModelSpec]:
    """Prepare the models that have work (ONNX export once, output checks)."""
    needed = {name for fw in files for name in fw.models}
    slurm = options.cluster.slurm
    gpu = slurm is not None and slurm.gpus > 0
    prepared = {src.name: inference.prepare_model(src, options.backend, gpu=gpu)
                for src in sources if src.name in needed}
    for spec in prepared.values():
        summary.models[spec.name] = ModelSummary(spec.name, spec.sha256, spec.backend)
    for fw in files:
        for name, mw in fw.models.items():
            mw.spec = prepared[name]
    return prepared


def _shape_problem(fw: FileWork, options: ScoreOptions) -> str | None:
    for mw in fw.models.values():
        spec = mw.spec
        assert spec is not None
        if tuple(spec.stamp_shape) != tuple(fw.stamp_shape):
            return (f"stamps are {fw.stamp_shape[0]}x{fw.stamp_shape[1]} but model {spec.name} "
                    f"({spec.keras_path}) takes {spec.stamp_shape[0]}x{spec.stamp_shape[1]}")
    if options.occ.kind != "none" and options.patch > min(fw.stamp_shape):
        return (f"occlusion patch {options.patch} is larger than the "
                f"{fw.stamp_shape[0]}x{fw.stamp_shape[1]} stamps")
    return None


def _start_journals(files: list[FileWork], options: ScoreOptions,
                    bad: BadFiles) -> list[FileWork]:
    """Journals checked against this run (kept, discarded or refused); side files created."""
    ready = []
    for fw in files:
        problem = _shape_problem(fw, options)
        if problem is not None:
            bad.report(fw.candidates, problem)
            continue
        try:
            if not all(_start_journal(fw, mw, options, bad) for mw in fw.models.values()):
                continue
            if fw.side_file and (fw.fresh_side or not fw.target.exists()):
                store.create_score_file(fw.target, fw.candidates, fw.n_stamps, fw.stamp_shape,
                                        overwrite=True)
        except StampbatchError as exc:
            bad.report(fw.candidates, exc)
            continue
        ready.append(fw)
    return ready


def _start_journal(fw: FileWork, mw: ModelWork, options: ScoreOptions, bad: BadFiles) -> bool:
    """Keep a journal of this very run, discard one of another input/model/backend."""
    assert mw.spec is not None
    manifest = _manifest(fw, mw.spec, options)
    journal = mw.journal
    settings = journal.difference(manifest, SETTING_KEYS)
    if settings is not None and journal.manifest():
        if not options.force:
            bad.report(fw.candidates, ScoreError(
                f"{fw.target}: an unfinished run of {mw.spec.name} with other settings is "
                f"journaled in {journal.dir} ({settings}); rerun with those settings or use "
                "--force to discard it"))
            return False
        journal.remove()
    changed = journal.difference(manifest, IDENTITY_KEYS)
    if changed is not None:
        options.log(f"{fw.target}: discarding the journal of {mw.spec.name} ({changed}); "
                    "scoring from scratch")
        journal.remove()
    journal.start(manifest)
    journal.drop_unreadable(options.log)
    done = journal.finished_chunks()
    mw.todo = {lo for lo, hi in fw.chunks() if done.get(lo) != hi}
    return True


def _raise_open_file_limit() -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def plan_run(paths: list[Path], models: Sequence[str | Path], options: ScoreOptions,
             bad: BadFiles, summary: ScoreSummary,
             stack: contextlib.ExitStack) -> tuple[list[FileWork], dict[str, ModelSpec]]:
    """The files with work (locked until ``stack`` closes) and the prepared models."""
    sources = _resolve_models(models, options.name)
    _raise_open_file_limit()      # one lock per target file is held for the whole run
    files = _plan_files(paths, options, bad)
    files = _lock_files(files, options, bad, stack)
    files = _plan_models(files, sources, options, bad, summary)
    prepared = _prepare_models(files, sources, options, summary)
    files = _start_journals(files, options, bad)
    summary.files = [fw.candidates for fw in files]
    summary.targets = [fw.target for fw in files]
    return files, prepared
