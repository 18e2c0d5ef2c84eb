"""The settings of one training run (:class:`TrainConfig`).

Its own module because the training stages all read it: the split (``dataset``), the run
directory's ``config.toml`` (``rundir``), the evaluation (``train_eval``), the Slurm launcher
and the CLI. Kept beside the loop in ``train`` it made each of them import ``train``, which
imports them: an import cycle. It imports nothing of stampbatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZERS = ("sgd", "adam")
CLASS_WEIGHTS = ("balanced", "none")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Settings of one training run.

    The optimiser defaults to Adam at learning rate 0.003 decayed to zero by a cosine over
    the run: on the populated-sky defaults (30,000 stamps, 15 epochs) it reaches a lower
    validation loss than the notebook's SGD (0.01, here with momentum 0.9, which stays
    available as ``optimizer="sgd"``) and +0.004-0.007 ROC AUC on the shifted sky of
    ``benchmarks/bench_quality.py`` (BENCHMARKS.md); ``adam`` ignores ``momentum``.
    ``class_weight="balanced"`` weights each class by N / (2 N_class) of the training split.
    ``patience`` is the number of epochs without a lower validation loss before stopping
    early (0: never stop early); the best weights are restored at the end either way.
    ``augment`` applies random flips and rotations by multiples of 90 degrees to training
    stamps. ``lr_schedule`` is ``constant`` or ``cosine`` (decay to zero over the run, see
    :func:`stampbatch.train.loop.compile_model`). ``train_stamps`` > 0 trains on that many stamps of the training
    split (a seeded subset, stratified by class and shared among the stores in proportion),
    for a quick run of a costly architecture; validation and test splits stay whole.
    """

    epochs: int = 20
    batch_size: int = 256
    optimizer: str = "adam"
    learning_rate: float = 0.003
    momentum: float = 0.9
    class_weight: str = "balanced"
    patience: int = 5
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    target_fpr: float = 0.01
    augment: bool = True
    lr_schedule: str = "cosine"
    train_stamps: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}, "
                             f"got {self.class_weight!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if self.train_stamps < 0:
            raise ValueError(f"train_stamps must be 0 (the whole training split) or more, "
                             f"got {self.train_stamps}")
        if self.patience < 0:
            raise ValueError(f"patience must be 0 (no early stopping) or more, got {self.patience}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got "
                             f"{self.val_fraction} + {self.test_fraction}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be between 0 and 1, got {self.target_fpr}")
