"""Checks of what ships for containers and conda, since apptainer cannot be installed here.

* ``Singularity.def`` is parsed with spython's recipe parser and its sections checked; its
  ``%test``, ``%runscript`` and ``%environment`` bodies are run as shell on this host with the
  package installed, so the commands inside the image are known to work.
* ``containers/build.sh`` and ``containers/run.sh`` are run against a stand-in ``apptainer``
  that records its arguments, and without any apptainer at all.
* ``environment.yml`` is generated from ``pyproject.toml`` by ``tools/sync_environment.py``:
  the committed file must equal the generated one and name the same packages and bounds.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from spython.main.parse.parsers import SingularityParser

REPO = Path(__file__).resolve().parents[1]
DEF_FILE = REPO / "Singularity.def"
VENV_BIN = Path(sys.executable).parent          # where the installed `stampbatch` lives
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def def_sections(path: Path = DEF_FILE) -> dict[str, str]:
    """Raw text of each %section of a definition file, as apptainer hands it to /bin/sh."""
    sections: dict[str, list[str]] = {"header": []}
    current = "header"
    for line in path.read_text().splitlines():
        m = re.match(r"^%(\w+)\b", line)
        if m:
            current = m.group(1).lower()
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = []
        else:
            sections[current].append(line)
    return {name: "\n".join(lines) + "\n" for name, lines in sections.items()}


def significant(body: str) -> list[str]:
    """Non-blank, stripped lines (how spython stores a section)."""
    return [s for s in (line.strip() for line in body.splitlines()) if s]


@pytest.fixture(scope="module")
def recipe():
    parser = SingularityParser(str(DEF_FILE))
    return parser.recipe[parser.active_layer]


def host_env(**extra: str) -> dict[str, str]:
    """The environment for running recipe bodies on this host: the venv's bin first."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="1", MPLBACKEND="Agg")
    env.update(extra)
    return env


def lower_bound(requirement: str) -> tuple[str, Version | None]:
    req = Requirement(requirement)
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    return req.name.lower(), (max(bounds) if bounds else None)


# --------------------------------------------------------------------------- Singularity.def


def test_base_image_is_a_pinned_gpu_tensorflow_matching_pyproject(recipe):
    header = def_sections()["header"]
    assert re.search(r"^Bootstrap:\s*docker\s*$", header, re.M | re.I)
    image = recipe.fromHeader
    repo, _, tag = image.partition(":")
    assert repo == "tensorflow/tensorflow", image
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-gpu", tag)
    assert m, f"base image tag {tag!r} is not a pinned <major.minor.patch>-gpu release"
    assert "latest" not in tag and "nightly" not in tag
    tf_floor = dict(lower_bound(r) for r in PYPROJECT["project"]["dependencies"])["tensorflow"]
    assert Version(".".join(m.groups())) >= tf_floor, "image TensorFlow older than pyproject's"
    # Keras 3 arrived with TensorFlow 2.16; the image must not fall back to tf.keras 2.
    assert Version(".".join(m.groups())) >= Version("2.16")
    # The same tag is recorded in the labels, so `apptainer inspect` shows it.
    assert f"org.opencontainers.image.base.name {image}" in recipe.labels


def test_files_copy_the_package_and_post_installs_it_keeping_tensorflow(recipe):
    copied = dict(line.split() for line in recipe.files)
    assert copied == {
        "pyproject.toml": "/opt/stampbatch/pyproject.toml",
        "README.md": "/opt/stampbatch/README.md",      # pyproject's readme: the build needs it
        "stampbatch": "/opt/stampbatch/stampbatch",
    }
    for source in copied:
        assert (REPO / source).exists(), f"%files source {source} is missing: the build would fail"
    post = significant(def_sections()["post"])
    assert post[0] == "set -eu"
    installs = [line for line in post if re.search(r"\bpip install\b", line)]
    assert len(installs) == 1, installs
    install = installs[0]
    assert '"/opt/stampbatch[slurm]"' in install        # this package, with dask-jobqueue
    assert "--no-cache-dir" in install
    # TensorFlow pinned to the image's own build through a constraint file ...
    assert "--constraint /opt/stampbatch/constraints.txt" in install
    assert 'echo "tensorflow==${tf_version}" > /opt/stampbatch/constraints.txt' in post
    # ... and the build fails if pip replaced it anyway.
    assert 'if [ "$after" != "$tf_version" ]; then' in post
    # What spython parsed as the install steps is what the raw section holds.
    assert [line for line in recipe.install
            if not line.endswith(">> /tests.sh") and line != "chmod u+x /tests.sh"] == post


def test_sections_read_by_spython_match_the_raw_sections(recipe):
    sections = def_sections()
    # spython turns %test into `echo "<line>" >> /tests.sh` install steps.
    test_lines = [m.group(1) for line in recipe.install
                  if (m := re.fullmatch(r'echo "(.*)" >> /tests\.sh', line))]
    assert test_lines == significant(sections["test"])
    assert recipe.test == "/bin/bash /tests.sh"
    assert recipe.cmd == significant(sections["runscript"])[0]
    assert recipe.files == significant(sections["files"])
    assert set(sections) == {"header", "files", "post", "environment", "runscript", "test",
                             "labels", "help"}


def test_runscript_hands_its_arguments_to_the_cli(recipe, tmp_path):
    assert recipe.cmd == 'exec stampbatch "$@"'
    body = def_sections()["runscript"]
    out = subprocess.run(["sh", "-c", body, "runscript", "--version"], env=host_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"stampbatch {PYPROJECT['project']['version']}"
    # Arguments with spaces and quotes arrive intact, and the exit status comes through.
    odd = tmp_path / "odd dir 'x'"
    odd.mkdir()
    out = subprocess.run(["sh", "-c", body, "runscript", "simulate", str(odd / "c d.h5"),
                          "--n", "20", "--candidates", "--quiet"], env=host_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (odd / "c d.h5").is_file()
    out = subprocess.run(["sh", "-c", body, "runscript", "inspect", str(odd / "missing.h5")],
                         env=host_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "missing.h5" in out.stderr and "Traceback" not in out.stderr


def environment_after(body: str, tmp_path: Path, **host: str) -> dict[str, str]:
    """Source the %environment body in a clean sh, as apptainer does, and return the result."""
    script = tmp_path / "environment.sh"
    script.write_text(body)
    env = {"PATH": "/usr/bin:/bin", **host}
    out = subprocess.run(["sh", "-c", '. "$1" && env', "sh", str(script)], env=env,
                         capture_output=True, text=True, timeout=30, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def test_environment_sets_logging_threads_and_isolation(recipe, tmp_path):
    body = def_sections()["environment"]
    env = environment_after(body, tmp_path)
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert env["PYTHONNOUSERSITE"] == "1"
    assert env["MPLBACKEND"] == "Agg"
    assert env["TF_NUM_INTEROP_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in env            # outside Slurm: libraries pick themselves
    # Inside a Slurm task the thread pools follow --cpus-per-task ...
    env = environment_after(body, tmp_path, SLURM_CPUS_PER_TASK="3")
    assert env["OMP_NUM_THREADS"] == "3" and env["TF_NUM_INTRAOP_THREADS"] == "3"
    # ... and an explicit value from the host wins, as does a louder log level for debugging.
    env = environment_after(body, tmp_path, SLURM_CPUS_PER_TASK="3", OMP_NUM_THREADS="1",
                            TF_CPP_MIN_LOG_LEVEL="0")
    assert env["OMP_NUM_THREADS"] == "1" and env["TF_NUM_INTRAOP_THREADS"] == "3"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "0"
    # spython sees the same variables.
    names = {entry.split("=", 1)[0] for entry in recipe.environ}
    assert {"TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS",
            "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "PYTHONNOUSERSITE"} <= names


def test_labels_and_help(recipe):
    labels = dict(line.split(" ", 1) for line in recipe.labels)
    assert labels["Version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.title"] == "stampbatch"
    help_text = def_sections()["help"]
    assert "apptainer run --nv stampbatch.sif" in help_text
    assert "apptainer test" in help_text


@pytest.mark.slow
def test_test_section_runs_on_this_host(tmp_path):
    """The image's %test (import, GPUs seen, simulate -> train 1 epoch -> score) on a CPU host."""
    body = def_sections()["test"]
    assert body.lstrip().startswith("set -eu")
    out = subprocess.run(["sh", "-c", body], cwd=tmp_path, env=host_env(TMPDIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"%test failed:\n{out.stdout}\n{out.stderr}"
    assert re.search(r"^stampbatch \S+ imports$", out.stdout, re.M)
    # This host has no GPU: the %test says so and carries on.
    assert re.search(r"^TensorFlow \S+ sees 0 GPU\(s\): none", out.stdout, re.M), out.stdout
    assert re.search(r"^round trip ok: 200 candidates scored by \S+", out.stdout, re.M)
    assert "scores/" in out.stdout                 # inspect showed the new scores
    assert list(tmp_path.iterdir()) == [], "%test left files behind in TMPDIR"


# --------------------------------------------------------------------------- containers/*.sh


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of stand-in executables (name -> sh body) plus the basics the scripts use."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "sh", "dirname", "sed", "env", "pwd", "cat", "printf"):
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return bin_dir


RECORDER = 'pwd > "$RECORD.cwd"; for a in "$@"; do printf "%s\\n" "$a"; done > "$RECORD"\n'


def run_script(script: str, args: list[str], bin_dir: Path, **env: str):
    environment = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/root"), **env}
    return subprocess.run([str(bin_dir / "bash"), str(REPO / "containers" / script), *args],
                          env=environment, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ["build.sh", "run.sh"])
def test_scripts_without_apptainer_print_one_clear_line(script, tmp_path):
    bin_dir = fake_bin(tmp_path)                   # no apptainer, no singularity
    args = [] if script == "build.sh" else ["--", "inspect", "x.h5"]
    out = run_script(script, args, bin_dir)
    assert out.returncode != 0
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"containers/{script}: error: neither apptainer nor singularity")


@pytest.mark.parametrize("uid, fakeroot", [("0", False), ("1000", True)])
def test_build_calls_apptainer_from_the_repo_root(uid, fakeroot, tmp_path):
    record = tmp_path / "args"
    bin_dir = fake_bin(tmp_path, apptainer=RECORDER, id=f'echo {uid}\n')
    out = run_script("build.sh", ["--force", "out.sif"], bin_dir, RECORD=str(record))
    assert out.returncode == 0, out.stderr
    args = record.read_text().splitlines()
    expected = ["build", "--force", *(["--fakeroot"] if fakeroot else []),
                str(Path.cwd() / "out.sif"), str(DEF_FILE)]
    assert args == expected
    assert Path(f"{record}.cwd").read_text().strip() == str(REPO)


def test_build_prefers_apptainer_then_singularity_and_checks_arguments(tmp_path):
    record = tmp_path / "args"
    bin_dir = fake_bin(tmp_path, singularity=RECORDER, id="echo 0\n")
    out = run_script("build.sh", [str(tmp_path / "img.sif"), str(DEF_FILE), "--",
                                  "--sandbox"], bin_dir, RECORD=str(record))
    assert out.returncode == 0, out.stderr
    assert record.read_text().splitlines() == ["build", "--sandbox", str(tmp_path / "img.sif"),
                                               str(DEF_FILE)]
    out = run_script("build.sh", ["img.sif", str(tmp_path / "nope.def")], bin_dir)
    assert out.returncode == 2 and "nope.def does not exist" in out.stderr
    out = run_script("build.sh", ["--bogus"], bin_dir)
    assert out.returncode == 2 and "unknown option '--bogus'" in out.stderr


@pytest.mark.parametrize("gpu", [True, False])
def test_run_passes_gpu_binds_and_arguments(gpu, tmp_path):
    record = tmp_path / "args"
    image = tmp_path / "stampbatch.sif"
    image.write_bytes(b"")
    data, runs = tmp_path / "my data", tmp_path / "runs"
    data.mkdir()
    runs.mkdir()
    smi = {"nvidia-smi": "echo 'GPU 0: NVIDIA H100'\n" if gpu else "exit 9\n"}
    bin_dir = fake_bin(tmp_path, apptainer=RECORDER, **smi)
    out = run_script("run.sh", ["--data", str(data), "--runs", str(runs), "--bind", "/x:/y:ro",
                                "--", "score", str(data / "c 1.h5"), "--model", str(runs / "v")],
                     bin_dir, RECORD=str(record), STAMPBATCH_IMAGE=str(image),
                     STAMPBATCH_BINDS="/scratch,/lustre:/lustre")
    assert out.returncode == 0, out.stderr
    expected = ["run", *(["--nv"] if gpu else []), "--bind", str(data), "--bind", str(runs),
                "--bind", "/x:/y:ro", "--bind", "/scratch", "--bind", "/lustre:/lustre",
                str(image), "score", str(data / "c 1.h5"), "--model", str(runs / "v")]
    assert record.read_text().splitlines() == expected
    # STAMPBATCH_NV overrides the detection both ways.
    out = run_script("run.sh", ["--image", str(image), "inspect", "c.h5"], bin_dir,
                     RECORD=str(record), STAMPBATCH_NV="0" if gpu else "1")
    assert out.returncode == 0, out.stderr
    assert ("--nv" in record.read_text().splitlines()) is not gpu


def test_run_reports_a_missing_image_or_directory(tmp_path):
    bin_dir = fake_bin(tmp_path, apptainer="exit 0\n")
    out = run_script("run.sh", ["--image", str(tmp_path / "none.sif"), "--", "inspect", "c.h5"],
                     bin_dir)
    assert out.returncode == 2 and "none.sif does not exist" in out.stderr
    out = run_script("run.sh", ["--data", str(tmp_path / "nodir"), "inspect", "c.h5"], bin_dir)
    assert out.returncode == 2 and "is not a directory" in out.stderr
    out = run_script("run.sh", [], bin_dir)
    assert out.returncode == 2 and "no stampbatch command given" in out.stderr


# --------------------------------------------------------------------------- environment.yml


def load_sync():
    spec = importlib.util.spec_from_file_location("sync_environment",
                                                  REPO / "tools" / "sync_environment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_environment_yml_is_the_generated_one():
    sync = load_sync()
    assert (REPO / "environment.yml").read_text() == sync.render(REPO / "pyproject.toml"), \
        "environment.yml is stale: run python tools/sync_environment.py"


def test_environment_yml_names_pyproject_dependencies_with_the_same_bounds():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["name"] == "stampbatch"
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda: dict[str, tuple[str, str]] = {}
    pip: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
            continue
        name, *rest = dep.split()
        conda[name] = (rest[0] if rest else "", rest[1] if len(rest) > 1 else "")
    assert pip == ["-e ."]                          # the package itself, nothing else from PyPI
    # Python: the container's 3.11, inside requires-python.
    assert conda.pop("python") == ("3.11.*", "")
    assert "3.11" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert conda.pop("pip") == ("", "")
    # GPU TensorFlow: the CUDA build is required.
    assert conda["tensorflow"][1] == "cuda*"
    names = load_sync().CONDA_NAMES
    project = PYPROJECT["project"]
    wanted = project["dependencies"] + [r for g in project["optional-dependencies"].values()
                                        for r in g]
    seen = {"numpy"}                                # also dask[array]'s extra
    for requirement in wanted:
        name, floor = lower_bound(requirement)
        conda_name = names.get(name, name)
        assert conda_name in conda, f"{requirement} missing from environment.yml"
        spec = SpecifierSet(conda[conda_name][0])
        conda_floor = max(Version(s.version) for s in spec if s.operator in (">=", "=="))
        assert conda_floor == floor, f"{conda_name}: {conda_floor} vs pyproject {floor}"
        seen.add(conda_name)
    assert set(conda) == seen, f"not in pyproject.toml: {set(conda) - seen}"


def test_sync_check_reports_a_stale_file_and_rewrites_it(tmp_path):
    sync = load_sync()
    pyproject = tmp_path / "pyproject.toml"
    text = (REPO / "pyproject.toml").read_text().replace('"h5py>=3.10"', '"h5py>=3.12"')
    pyproject.write_text(text)
    out = tmp_path / "environment.yml"
    out.write_text((REPO / "environment.yml").read_text())
    assert sync.main(["--pyproject", str(pyproject), "--out", str(out), "--check"]) == 1
    assert sync.main(["--pyproject", str(pyproject), "--out", str(out)]) == 0
    assert "  - h5py >=3.12\n" in out.read_text()
    assert sync.main(["--pyproject", str(pyproject), "--out", str(out), "--check"]) == 0


def test_sync_refuses_what_conda_cannot_express(tmp_path, capsys):
    sync = load_sync()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["numpy~=1.26"]\n')
    assert sync.main(["--pyproject", str(pyproject), "--out", str(tmp_path / "e.yml")]) == 2
    err = capsys.readouterr().err
    assert "numpy~=1.26" in err and "'~='" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e.yml").exists()
    assert sync.conda_packages(["dask[array]>=2024.1", "numpy>=1.26", "Foo_Bar<2,>=1"]) == {
        "dask-core": ">=2024.1", "numpy": ">=1.26", "foo-bar": "<2,>=1"}


# --------------------------------------------------------------------------- the Slurm tests' container


def test_container_standin_hides_the_slurm_client(tmp_path):
    """tests/slurm/fake-apptainer, the container of the preemption tests, really leaves the
    job without Slurm: no scontrol/sbatch/srun on PATH or at their paths, no munge socket,
    while the job's own Python and environment work as in an image."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the stand-in needs root and unshare (a private mount namespace)")
    image = tmp_path / "stampbatch.sif"
    image.write_bytes(b"")
    probe = ("import os, shutil, subprocess\n"
             "print([shutil.which(n) for n in ('scontrol', 'sbatch', 'srun', 'squeue')])\n"
             "try:\n    subprocess.run(['/usr/bin/scontrol', 'ping'])\n"
             "except OSError as exc:\n    print(type(exc).__name__)\nelse:\n    print('ran')\n"
             "print(os.listdir('/run/munge') if os.path.isdir('/run/munge') else 'no munge')\n"
             "print(os.environ['PROBE'])\n")
    out = subprocess.run([str(REPO / "tests" / "slurm" / "fake-apptainer"), "exec", "--nv",
                          "--bind", str(tmp_path), str(image), sys.executable, "-c", probe],
                         capture_output=True, text=True, env={**os.environ, "PROBE": "passed"},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "[None, None, None, None]"
    # hidden (not executable), not merely off PATH
    assert lines[1] == ("PermissionError" if Path("/usr/bin/scontrol").exists()
                        else "FileNotFoundError")
    assert lines[2] in ("[]", "no munge") and lines[3] == "passed"
    missing = subprocess.run([str(REPO / "tests" / "slurm" / "fake-apptainer"), "exec",
                              str(tmp_path / "none.sif"), "true"], capture_output=True, text=True)
    assert missing.returncode == 255 and "does not exist" in missing.stderr
