"""A quiet console: library chatter (TensorFlow's absl preamble, CUDA probing) stays off stderr.

TensorFlow 2.21 writes its start-up lines from C++ before absl logging is initialised, so
``TF_CPP_MIN_LOG_LEVEL`` cannot silence all of them: ``I0000 … oneDNN custom operations``,
``I0000 … Could not find cuda drivers`` and, on a machine without a GPU, ``E0000 … failed call
to cuInit`` — an ERROR line on a healthy run. :func:`import_tensorflow` imports TensorFlow and
probes its devices with file descriptor 2 captured, then writes back every captured line that is
not one of those known start-up lines, so a genuine error still shows. Nothing hides devices:
a GPU machine keeps its GPU. ``--verbose`` (``verbose=True``) leaves stderr untouched.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

# First imports that pull TensorFlow in (Keras 3 imports its TensorFlow backend itself).
_TRIGGERS = ("tensorflow", "keras", "tf2onnx", "tf_keras")
# Read by Dask in each worker process it starts (env vars override dask's config files).
_DASK_PRELOAD = "DASK_DISTRIBUTED__WORKER__PRELOAD"

# The start-up lines that say nothing is wrong (matched per line of captured stderr).
_BENIGN = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:. ]+\s+\d+ (port\.cc|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc"
    r"|cuda_diagnostics\.cc|cpu_feature_guard\.cc|cuda_fft\.cc|cuda_dnn\.cc|cuda_blas\.cc"
    r"|computation_placer\.cc)[:\]].*"
    r"|To enable the following instructions: .*|.*rebuild TensorFlow with the appropriate compiler flags\.)$"
)


def filter_startup_lines(text: str) -> str:
    """``text`` without TensorFlow's benign start-up lines."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not _BENIGN.match(line.rstrip("\n")))


@contextlib.contextmanager
def captured_stderr_fd() -> Iterator[list[str]]:
    """Capture what anything in this process (C++ included) writes to fd 2; yields a list that
    holds the captured text once the block ends."""
    result: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield result
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            result.append(sink.read().decode("utf-8", "replace"))


def import_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow and initialise its devices, keeping the benign start-up lines off stderr.

    Later imports of ``tensorflow`` are then free and silent. Without ``verbose`` TensorFlow's
    C++ log threshold defaults to warnings-and-errors only and Python-side absl/TF loggers to
    errors; a user's own ``TF_CPP_MIN_LOG_LEVEL`` is respected.
    """
    if verbose or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with captured_stderr_fd() as captured:
        import tensorflow as tf

        tf.config.list_physical_devices()
        tf.get_logger().setLevel("ERROR")
    rest = filter_startup_lines(captured[0])
    if rest:
        sys.stderr.write(rest)


def install_import_hook() -> Callable[[], None]:
    """From now on, the first ``import tensorflow`` (or keras, tf2onnx) goes through
    :func:`import_tensorflow`. Returns a function that removes the hook again (a no-op once
    the hook has fired)."""
    if "tensorflow" in sys.modules:
        return lambda: None
    original = builtins.__import__

    def hook(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".", 1)[0] in _TRIGGERS and "tensorflow" not in sys.modules:
            builtins.__import__ = original
            import_tensorflow()
        return original(name, *args, **kwargs)

    builtins.__import__ = hook

    def remove() -> None:
        if builtins.__import__ is hook:
            builtins.__import__ = original

    return remove


@contextlib.contextmanager
def quiet_tensorflow_imports(verbose: bool = False) -> Iterator[None]:
    """Within the block, TensorFlow is imported quietly on first use (:func:`install_import_hook`),
    so a command pays for TensorFlow only when it really uses it (bad input fails fast) and its
    start-up lines never reach stderr. Dask workers started meanwhile (local or Slurm) inherit
    the same hook through :func:`dask_setup`, unless a worker preload is configured already."""
    if verbose:
        yield
        return
    remove = install_import_hook()
    undo = _preload_in_dask_workers()
    try:
        yield
    finally:
        remove()
        undo()


def _preload_in_dask_workers() -> Callable[[], None]:
    """Have Dask workers started from this process run :func:`dask_setup` (a nanny passes its
    own process's config to the worker: set both the environment and the live config).
    Returns a function that undoes it."""
    if os.environ.get(_DASK_PRELOAD):
        return lambda: None  # the user configured a preload: leave it alone
    os.environ[_DASK_PRELOAD] = '["stampbatch.console"]'
    config_set = None
    if "dask" in sys.modules:  # dask read its config before the variable existed
        import dask

        if not dask.config.get("distributed.worker.preload", None):
            config_set = dask.config.set({"distributed.worker.preload": ["stampbatch.console"]})

    def undo() -> None:
        os.environ.pop(_DASK_PRELOAD, None)
        if config_set is not None:
            config_set.__exit__(None, None, None)

    return undo


def dask_setup(worker: object) -> None:
    """Dask worker preload (``distributed.worker.preload``): a worker that scores with the
    TensorFlow backend imports it quietly too; an ONNX worker never imports it."""
    install_import_hook()
