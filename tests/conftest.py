"""Shared fixtures: small stamp arrays built on the fly, and the real local Slurm."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

# submitit configures logging when first imported (logging.config.dictConfig), which shuts
# down every handler that exists by then. If TensorFlow came first, absl's handler is among
# them, and it closes its stream when that is not the current sys.stderr: under pytest, the
# capture stream of an earlier test, so a later test that first imports submitit (any
# `launch`) ended the whole run ("lost sys.stderr") in orders that imported keras first
# (tests/train/test_models.py before tests/test_bad_input.py). Import it before any test can.
import submitit  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


# Tests that submit jobs to the one local Slurm node share its two CPU slots, and the
# preemption tests take the whole node: under pytest-xdist (`make test`) they form one group,
# run by one worker in file order, while the other workers run the CPU-bound tests.
SLURM_GROUP = "slurm"


# Tests sharing an expensive module fixture (a trained run, a Dask cluster, a traced
# uninterrupted run) form one xdist group, so the fixture is built once rather than once per
# worker that happens to get one of them (up to three times before). Whole modules by file
# name; in test_train.py and test_jobs.py by the fixture (their other tests spread freely).
# A Slurm test always joins the Slurm group instead: its jobs must not race the others'.
MODULE_GROUPS = {"test_score.py": "score", "test_kbmod.py": "kbmod", "test_models.py": "models",
                 "test_precision_gate.py": "precision-gate", "test_export.py": "export",
                 "test_evaluate.py": "evaluate", "test_cluster.py": "cluster"}
FIXTURE_GROUPS = {"exact_data": "train-exact", "tiny_exact": "train-exact",
                  "vgg6_run": "train-vgg6", "tiny_model": SLURM_GROUP}
# The order in which work reaches the xdist workers (Makefile: --no-loadscope-reorder keeps
# it): the Slurm group first, the other groups longest first, then the slow and kill tests,
# then the rest. A long unit handed out last would leave one worker running alone at the end.
GROUP_ORDER = (SLURM_GROUP, "train-exact", "score", "train-vgg6", "kbmod", "models",
               "precision-gate", "export", "evaluate", "cluster")


def uses_slurm(item: pytest.Item) -> bool:
    return "slurm_cluster" in getattr(item, "fixturenames", ()) or \
        item.get_closest_marker("slurm") is not None


def _group_of(item: pytest.Item) -> str | None:
    if uses_slurm(item):
        return SLURM_GROUP
    fixtures = getattr(item, "fixturenames", ())
    for fixture, group in FIXTURE_GROUPS.items():
        if fixture in fixtures:
            return group
    return MODULE_GROUPS.get(item.path.name)


def _rank(item: pytest.Item, group: str | None) -> int:
    if group is not None:
        return GROUP_ORDER.index(group)
    if item.get_closest_marker("kill") or item.get_closest_marker("slow"):
        return len(GROUP_ORDER)
    return len(GROUP_ORDER) + 1


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that submits real Slurm jobs ``slurm``; give each test its xdist group
    (MODULE_GROUPS, FIXTURE_GROUPS, the Slurm group). Under xdist, order the work as
    GROUP_ORDER says: the Slurm group first (its jobs mostly wait on ``--time=2`` limits and
    requeues, so the other workers' CPU-bound tests fill those waits), then the groups that
    share a fixture, then slow tests, then the rest."""
    groups = {}
    for item in items:
        if uses_slurm(item):
            item.add_marker(pytest.mark.slurm)
        group = groups[id(item)] = _group_of(item)
        if group is not None:
            assert group in GROUP_ORDER, f"{group} missing from GROUP_ORDER"
            item.add_marker(pytest.mark.xdist_group(group))
    if hasattr(config, "workerinput"):  # an xdist worker: every worker sorts the same way
        items.sort(key=lambda item: _rank(item, groups[id(item)]))  # stable: file order kept


class _GroupIds:
    """Make ``--dist loadgroup`` group again under pytest 9. xdist (3.8) tags a grouped test by
    setting ``item._nodeid = "<id>@<group>"``, but pytest 9's ``Node.nodeid`` reads ``_id``,
    so the tag never reached the controller and the Slurm group spread over every worker (two
    time-limit batches then raced for the node). Runs after xdist's own hook and copies the
    tag into ``_id``; a no-op where xdist already sets what ``nodeid`` reads."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            tagged = getattr(item, "_nodeid", None)
            if isinstance(tagged, str) and "@" in tagged and "@" not in item.nodeid:
                from _pytest.nodeid import coerce_node_id

                item._id = coerce_node_id(tagged)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(_GroupIds(), "stampbatch-xdist-group-ids")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """With STAMPBATCH_TEST_CPU_LOG=PATH, append "nodeid, wall s, CPU s" per test (setup,
    call and teardown; CPU of this process and of the children it waited for, not of Slurm
    jobs) to PATH.<xdist worker>: on a shared machine CPU time says what a test costs."""
    log = os.environ.get("STAMPBATCH_TEST_CPU_LOG")
    if not log:
        yield
        return
    t0, cpu0 = time.monotonic(), _cpu_s()
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"{log}.{worker}", "a") as fh:
        fh.write(f"{item.nodeid}\t{time.monotonic() - t0:.2f}\t{_cpu_s() - cpu0:.2f}\n")


def _cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


SLOW_S = 20.0  # a test whose call takes longer says why in its docstring
_undocumented_slow: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.duration > SLOW_S:
        doc = getattr(getattr(item, "function", None), "__doc__", None)
        if not doc:  # carried to the xdist controller with the report
            report.user_properties.append(("undocumented_slow", round(report.duration, 1)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, seconds in report.user_properties:
        if key == "undocumented_slow":
            _undocumented_slow.append(f"{report.nodeid} ({seconds} s)")


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the tests that took over SLOW_S without a docstring saying why. Reported, not
    failed: a loaded machine stretches any test, so the wall clock cannot be a verdict."""
    if _undocumented_slow:
        terminalreporter.section(f"over {SLOW_S:.0f} s without a docstring saying why")
        for line in _undocumented_slow:
            terminalreporter.line(line)


def gaussian_stamps(n: int, *, seed: int = 0, shape: tuple[int, int] = (21, 21),
                    amplitude: float = 8.0, sources: np.ndarray | None = None) -> np.ndarray:
    """Unit-noise stamps; rows flagged in ``sources`` get a centred Gaussian (sigma 1.5 px)."""
    rng = np.random.default_rng(seed)
    stamps = rng.normal(0.0, 1.0, size=(n, *shape)).astype(np.float32)
    if sources is not None:
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
        psf = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2)).astype(np.float32)
        stamps[np.asarray(sources, bool)] += amplitude * psf
    return stamps


def write_labelled_store(path: Path, n: int = 300, *, seed: int = 1, nan_rows=()) -> Path:
    """A labelled store: half bright centred sources, ``snr`` and ``kind`` metadata
    (negatives cycle through background, offcentre, hot_pixel), optional unusable rows
    (``nan_rows``: a NaN at the centre, where no fill can stand in for the pixel)."""
    from stampbatch import store

    labels = (np.arange(n) % 2).astype(np.int8)
    stamps = gaussian_stamps(n, seed=seed, sources=labels == 1)
    stamps[list(nan_rows), stamps.shape[1] // 2, stamps.shape[2] // 2] = np.nan
    rng = np.random.default_rng(seed)
    snr = np.where(labels == 1, rng.uniform(3.0, 100.0, n), 0.0)
    kinds = np.array(["background", "offcentre", "hot_pixel"])
    kind = np.where(labels == 1, "source", kinds[np.arange(n) // 2 % 3])
    store.create_store(path, stamps, labels, {"snr": snr, "kind": kind}, chunk_rows=64)
    return path


@pytest.fixture
def labelled_arrays() -> tuple[np.ndarray, np.ndarray]:
    """300 stamps, half with a bright centred source: (stamps float32 (N,21,21), labels int8)."""
    labels = (np.arange(300) % 2).astype(np.int8)
    return gaussian_stamps(300, seed=1, sources=labels == 1), labels


def _slurm_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = out.stdout.split()
    # "completing": a cancelled job is still within KillWait (5 s); the node is fine.
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated",
                                                           "completing") for s in states)


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A running single-node Slurm (started with tests/slurm/up.sh when needed).

    In CI a cluster that cannot start fails the test; elsewhere the test is skipped with
    the reason, so a developer without root still runs everything else.
    """
    if not _slurm_ready() and os.geteuid() == 0:
        subprocess.run(["bash", str(REPO / "tests" / "slurm" / "up.sh")], check=False,
                       timeout=600)
    if not _slurm_ready():
        message = "the local Slurm is not running and tests/slurm/up.sh could not start it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return "debug"


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody can write to, root included: a read-only tmpfs mount when we are
    root (root ignores mode bits), mode 0555 otherwise. Yields (path, populate) where
    ``populate(src_files)`` copies files in first (the mount is remounted read-only after)."""
    target = tmp_path / "readonly"
    target.mkdir()
    mounted = False

    def populate(*files: Path) -> Path:
        nonlocal mounted
        if os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target)], check=True)
            mounted = True
            for f in files:
                shutil.copy(f, target / Path(f).name)
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        else:
            for f in files:
                shutil.copy(f, target / Path(f).name)
                (target / Path(f).name).chmod(0o444)
            target.chmod(0o555)
        return target

    yield populate
    if mounted:
        subprocess.run(["umount", str(target)], check=False)
    else:
        target.chmod(0o755)
