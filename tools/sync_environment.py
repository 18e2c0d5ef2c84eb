#!/usr/bin/env python3
"""Generate ``environment.yml`` (conda-forge) from ``pyproject.toml``, the one source of truth.

    python tools/sync_environment.py           # rewrite environment.yml
    python tools/sync_environment.py --check   # exit 1 when environment.yml is out of date

Every runtime dependency and every optional extra (``slurm``, ``test``) of pyproject.toml
becomes a conda-forge package with the same version bounds. PyPI and conda-forge names
agree except for the few in ``CONDA_NAMES``; a new dependency whose names agree needs no
edit here. TensorFlow is required as a ``cuda*`` build (see ``TENSORFLOW_NOTE``).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

# PyPI name -> conda-forge name, where they differ (or where conda-forge has a lighter split).
CONDA_NAMES = {
    "dask": "dask-core",               # "dask" on conda-forge also pulls bokeh, pandas, pyarrow ...
    "matplotlib": "matplotlib-base",   # "matplotlib" adds the Qt GUI backend a cluster never uses
}
# (PyPI name, extra) -> conda-forge packages that provide that extra.
CONDA_EXTRAS = {
    ("dask", "array"): ["numpy"],
}
# Packages whose conda-forge build must be chosen explicitly: name -> build string pattern.
CONDA_BUILDS = {
    "tensorflow": "cuda*",
}
PYTHON = "3.11.*"   # the Python of the container image (tensorflow/tensorflow:*-gpu)
CONDA_OPERATORS = (">=", "<=", "==", "!=", ">", "<")

TENSORFLOW_NOTE = """\
# TensorFlow comes from conda-forge as a CUDA build ("cuda*"), not from pip: one solver then
# picks TensorFlow together with the numpy, h5py/HDF5, protobuf and CUDA/cuDNN libraries it
# was built against (pip's tensorflow[and-cuda] on top of conda's numpy/h5py lets pip replace
# conda-owned packages, TF pins h5py and protobuf). Requiring the CUDA build makes a machine
# without a visible NVIDIA driver refuse loudly instead of silently installing the CPU build:
# on such a machine (a login node) tell the solver the CUDA version of the GPU nodes, e.g.
#   CONDA_OVERRIDE_CUDA=12.4 conda env create -f environment.yml
# On a laptop without an NVIDIA GPU use pip instead: pip install -e '.[test]'."""


class SyncError(Exception):
    """pyproject.toml declares something this generator cannot express for conda."""


def conda_spec(req: Requirement) -> str:
    """The conda version constraint of one requirement, e.g. ``>=2024.1`` ('' for none)."""
    parts = []
    for spec in sorted(req.specifier, key=str):
        if spec.operator not in CONDA_OPERATORS:
            raise SyncError(f"pyproject.toml: '{req}' uses '{spec.operator}', which conda "
                            f"specs do not have; use >=, <=, ==, !=, > or <")
        parts.append(f"{spec.operator}{spec.version}")
    return ",".join(parts)


def conda_packages(requirements: list[str]) -> dict[str, str]:
    """conda-forge name -> version constraint for PEP 508 requirement strings (merged)."""
    out: dict[str, str] = {}

    def add(name: str, spec: str) -> None:
        previous = out.get(name, "")
        if previous and spec and previous != spec:
            raise SyncError(f"pyproject.toml: '{name}' is required as both {previous} and {spec}")
        out[name] = previous or spec

    for text in requirements:
        req = Requirement(text)
        if req.marker is not None or req.url is not None:
            raise SyncError(f"pyproject.toml: '{text}': environment markers and URLs are not "
                            f"translated to conda; add the package to environment.yml by hand "
                            f"and teach tools/sync_environment.py about it")
        pypi = req.name.lower().replace("_", "-")
        add(CONDA_NAMES.get(pypi, pypi), conda_spec(req))
        for extra in sorted(req.extras):
            for name in CONDA_EXTRAS.get((pypi, extra), []):
                add(name, "")
    return out


def render(pyproject: Path) -> str:
    """The text of environment.yml for this pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    runtime = conda_packages(project.get("dependencies", []))
    extras = project.get("optional-dependencies", {})
    optional = conda_packages([r for group in extras.values() for r in group])

    def line(name: str, spec: str) -> str:
        build = CONDA_BUILDS.get(name)
        if build:
            return f"  - {name} {spec or '*'} {build}"
        return f"  - {name}{' ' + spec if spec else ''}"

    rel = pyproject.resolve().relative_to(REPO) if pyproject.resolve().is_relative_to(REPO) \
        else pyproject.name
    lines = [
        f"# GENERATED from {rel} by tools/sync_environment.py -- do not edit by hand;",
        "# change pyproject.toml and run: python tools/sync_environment.py",
        "#",
        "# conda environment for stampbatch on Linux with GPU TensorFlow, the test tools included:",
        "#   conda env create -f environment.yml && conda activate stampbatch",
        "#   pytest -m 'not slurm'",
        "#",
        TENSORFLOW_NOTE,
        "name: stampbatch",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
        f"  - python {PYTHON}",
        "  - pip",
        f"  # [project] dependencies (requires-python {project.get('requires-python', '?')})",
    ]
    lines += [line(n, s) for n, s in runtime.items()]
    names = ", ".join(sorted(extras))
    lines.append(f"  # [project.optional-dependencies] {names}")
    lines += [line(n, s) for n, s in optional.items() if n not in runtime]
    lines += [
        "  # stampbatch itself, editable, from this checkout; its dependencies are all above,",
        "  # so pip installs nothing else",
        "  - pip:",
        "      - -e .",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    parser.add_argument("--out", type=Path, default=REPO / "environment.yml")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when --out differs from what would be written")
    args = parser.parse_args(argv)
    try:
        text = render(args.pyproject)
    except (SyncError, OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"sync_environment: error: {exc}", file=sys.stderr)
        return 2
    current = args.out.read_text() if args.out.exists() else None
    if args.check:
        if current != text:
            print(f"sync_environment: {args.out} is out of date with {args.pyproject}; "
                  f"run: python tools/sync_environment.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    if current != text:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(f"{args.out} already up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
