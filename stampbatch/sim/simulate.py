"""Simulated survey stamps: a centred source or not, in a field of other sources.

A shift-and-stack search co-adds ``n_coadd`` exposures along each candidate trajectory;
every trajectory yields one stamp (21x21 by default), and every real cut-out lies in a
field of stars and galaxies. Class 1 is a source at the stamp centre (within
``max_centre_offset`` px); class 0 is anything else. **The label depends only on what sits
at the centre**: both classes carry the same field population (:mod:`stampbatch.sim.field`),
the same backgrounds and detector defects (:mod:`stampbatch.sim.backgrounds`), and negatives
may hold *hard negatives* — an off-centre source, a hot pixel, a cosmic ray, a partial
streak of a moving object, or a bright star badly subtracted in a difference image
(``dipole``). Source shapes come from :mod:`stampbatch.sim.profiles`.

Units and noise model
---------------------
Stamps are in electrons (gain 1) and are the *sum* of ``n_coadd`` exposures of sky ``s``
(e-/px) and read noise ``r`` (e-), so the per-pixel background noise is

    sigma = sqrt(n * (s + r**2))                      (Poisson sky + Gaussian read noise)

drawn as a Gaussian, white or (a ``correlated_noise_fraction`` of stamps) correlated as in
resampled co-adds. Every signal adds its own shot noise (``source_shot_noise``): the noise
there is ``sqrt(sigma^2 + |signal|)`` times the same unit noise.

Kinds of background (``meta["background"]``)
--------------------------------------------
* ``science``: the sky level ``n*s`` kept, plus a gradient (up to ``sky_gradient_max``
  sigma per px), the full field population.
* ``sky_subtracted``: the level removed imperfectly (a residual offset up to
  ``residual_sky_max`` sigma and a gradient), the full field population.
* ``difference``: a difference image: the static field is subtracted with a template
  misregistered by up to ``misregistration_max`` px and mis-scaled by up to
  ``flux_mismatch_max``, so field sources leave dipole residuals; positives here are
  point sources (transients, moving objects).

Centre sources (``meta["profile"]``: ``point``, ``galaxy``, ``saturated``; ``none`` for
negatives): a PSF; a compact Sérsic galaxy (``centre_galaxy_fraction`` of the positives
outside difference images, half-light radius ``galaxy_re_min``-``centre_galaxy_re_max``
px); or a saturated star (``centre_saturated_fraction``), clipped at the co-add's full well
``n * full_well`` (less the sky where it was subtracted) with a bleed trail along its
column and, for ``spike_fraction`` of them, diffraction-like spikes. Field sources are
point sources or, for ``field_galaxy_fraction``, Sérsic galaxies, from one number count up
to ``field_snr_max``: its bright end, the stars whose peak passes the full well, are the
saturated stars of the field (clipped and bled like the centre's; with spikes on the
``spike_fraction`` of stamps whose optics make them), so that their rate follows the field's
density as on the sky rather than a fixed share of the stamps.

PSF: per stamp a FWHM in ``[fwhm_min, fwhm_max]`` px and, with probability
``moffat_fraction``, a Moffat profile (``beta`` in ``[moffat_beta_min, moffat_beta_max]``),
otherwise a Gaussian; elliptical with ``(a-b)/(a+b)`` uniform in ``[0,
psf_ellipticity_max]`` at a random position angle (``psf_e``, ``psf_pa`` in ``/meta``; the
FWHM is the geometric mean of the axes'), as no real PSF is round. Every source on the
stamp — centre, companion, field star, galaxy (convolved with it), bright star — has the
stamp's PSF; trails are drawn with the round PSF of the same FWHM.

Field density and the PSF: the sky's sources are counted above a point-source SNR, and a
source's background-limited SNR falls as its light spreads over more noisy pixels
(``flux / (sigma * FWHM)`` up to a constant). So the density of sources above
``field_snr_min`` is not a property of the sky alone: drawn log-uniformly in
``[field_density_min, field_density_max]`` at the reference FWHM ``field_density_fwhm``, a
stamp of FWHM ``f`` sees ``(f / field_density_fwhm) ** -field_count_slope`` times that many
(``N(>S) ∝ S^-slope`` at the flux limit that SNR means there). Drawing the density
independently of the PSF, as earlier releases did, put ~3 sources above SNR 2 in every beam
of the widest PSFs of the most crowded fields, a sky no survey searches. ``field_density``
in ``/meta`` is the stamp's own density.

SNR (the meaning of the ``snr`` column)
---------------------------------------
The SNR of a signal of total flux ``F`` and unit-flux shape ``P`` as rendered on the
stamp is its matched-filter (optimal) SNR, ``F * sqrt(sum P**2 / var)`` — the expectation
of :func:`matched_filter_snr` for that shape on an empty sky, where ``var = sigma**2``. For
the centre source ``var`` is the variance *where it lies*: ``sigma**2`` plus the Poisson
variance of all the other light on the stamp (neighbours' wings, a bright star's halo), and
pixels that other light saturates or bleeds into carry no information (weight 0; a
pipeline's SAT/BLEED mask) — the flux over flux
error a photometry pipeline reports from its variance plane. So a source drawn at SNR 20 is
a 20-sigma source wherever it sits (on an empty sky the two definitions agree). The flux is
chosen from the SNR drawn (log-uniform in ``[snr_min, snr_max]``). For a saturated centre
star it is that of the unclipped star against the sky. It ignores the source's own shot
noise and pixel correlation: the significance against the true noise of that filter on
correlated-noise stamps is ``snr_eff``. Hard negatives and companions have their SNR
against the sky. Field sources have a *point-source* SNR (their flux times the norm
of the stamp's centred PSF over sigma), drawn from the number counts.

Kinds of stamp (``meta["kind"]``)
---------------------------------
``source`` (label 1); ``background`` (nothing at the centre); ``offcentre`` (a PSF source
farther than ``offcentre_min_distance`` px); ``hot_pixel`` (one pixel within
``artefact_max_offset`` px per axis of the centre); ``cosmic_ray`` (a 1-3 px track starting
there); ``streak`` (a trailed PSF whose midpoint lies at least ``streak_min_offset`` px from
the centre); ``dipole`` (a difference-image residual of a star within
``artefact_max_offset`` px of the centre). Hard-negative fractions are fractions of the
negatives; the rest are ``background``.

What lies *beside* the centre source must say nothing about the label, so off-centre
sources, streaks, hot pixels and cosmic-ray hits are not negatives' privilege: positives
carry one with the same probabilities (``offcentre_fraction``, ``streak_fraction``,
``hot_pixel_fraction``, ``cosmic_ray_fraction``), placed as the negatives' are (sharp
artefacts within ``artefact_max_offset`` px per axis of the centre, on or beside the
source) at their own SNR, drawn like the negatives' (``meta["companion"]``: ``none``,
``offcentre``, ``streak``, ``hot_pixel``, ``cosmic_ray``, in both classes). Were they
negative-only, "a bright source off the centre" or "a sharp pixel near the centre" would be
a sign of the negative class, and a network could learn to doubt every centred source with
a brighter neighbour, or with a cosmic ray or hot pixel beside it — which a single exposure
holds at its own rate whatever sits at the centre (measured: a vgg6 trained with
negative-only artefacts lost 0.04–0.08 of its completeness on positives given one,
BENCHMARKS.md). The kind of image says nothing about the label either: positives are
difference images as often as negatives, dipoles included. One kind stays the negatives':
a star's subtraction dipole within ``artefact_max_offset`` of the centre. Given to
difference-image positives as often as those negatives have one (27 % of them), it was
measured not to be a shortcut but a hard case — a vgg6 trained with it found 0.43 instead of
0.39 of such positives — and it cost 0.003–0.005 AUC on ordinary difference images (two
seeds; BENCHMARKS.md); a star that close to a real source is a blend the field itself does
not draw (``field_min_distance``). (``positive_companions = false`` restores the earlier
negative-only kinds and image mix; the neighbour-free preset does.)

Metadata columns (``/meta`` in the store; names in :mod:`stampbatch.store`)
---------------------------------------------------------------------------
``snr``, ``snr_eff``, ``kind``, ``profile``, ``background``, ``companion``, ``psf_fwhm``,
``psf_beta`` (NaN: Gaussian), ``dx``, ``dy`` (px from the centre of the signal that made the kind; NaN
for background), ``flux``, ``sky``, ``sky_subtracted``, ``sigma``, ``read_noise``,
``n_coadd``, ``noise_corr``, ``trail_length``, ``trail_angle``, ``half_light_radius``,
``sersic_n``, ``axis_ratio`` (centre galaxies; NaN otherwise), ``n_field`` (field sources
on the stamp, bright stars included), ``nn_distance`` and ``nn_snr`` (the field source
nearest the centre; NaN without one), ``field_density`` (per 100 px^2),
``saturation`` (the clip level in stamp units), ``bad_column`` (-1: none), ``n_masked``
(pixels with no data: a masked block, zero or NaN, and the NaN beyond a detector's edge for
the ``detector_edge_fraction`` of stamps cut within half a stamp of one).
Candidate files (no ``/labels``) also hold ``true_label``.

:func:`neighbour_free_config` gives the simulator of earlier releases (no field, no
galaxies, no saturation, no sky residuals or defects) for comparisons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import fileio, store
from stampbatch.errors import SimConfigError
from stampbatch.progress import Progress
from stampbatch.sim.config import MAX_SNR, SimConfig
from stampbatch.sim.field import nearest
from stampbatch.sim.profiles import render_psf, render_trail
from stampbatch.sim.scene import (
    BACKGROUNDS,
    COMPANIONS,
    KINDS,
    PROFILES,
    Scene,
    centre_sources,
    conditions,
    field_population,
    hard_negatives,
    observe,
)

__all__ = ["KINDS", "PROFILES", "BACKGROUNDS", "SimConfig", "SimConfigError", "SimulatedBatch",
           "matched_filter_snr", "neighbour_free_config", "render_psf", "render_trail",
           "simulate_stamps", "write_simulated", "block_rng", "iter_blocks"]

_KIND_BYTES = f"S{max(len(k) for k in KINDS + PROFILES + BACKGROUNDS + COMPANIONS)}"  # fixed width


# Stamps simulated per random block. Block b draws from SeedSequence(seed, spawn_key=(b,)),
# i.e. SeedSequence(seed).spawn(...)[b], so a file's contents depend on (seed, config, n)
# only — not on the HDF5 chunk size. Changing this constant changes every simulated file.
SIM_BLOCK_ROWS = 16384

NEIGHBOUR_FREE = {
    "sky_subtracted_fraction": 0.5, "difference_fraction": 0.0, "sky_gradient_max": 0.0,
    "residual_sky_max": 0.0, "field_density_min": 0.0, "field_density_max": 0.0,
    "centre_galaxy_fraction": 0.0, "centre_saturated_fraction": 0.0,
    "bad_column_fraction": 0.0, "masked_fraction": 0.0, "detector_edge_fraction": 0.0,
    "dipole_fraction": 0.0, "positive_companions": False, "psf_ellipticity_max": 0.0,
}


def neighbour_free_config(**changes: Any) -> SimConfig:
    """The earlier default simulator: isolated point sources on clean backgrounds."""
    return dataclasses.replace(SimConfig(), **{**NEIGHBOUR_FREE, **changes})


@dataclass
class SimulatedBatch:
    """Simulated stamps with their labels and per-stamp truth."""

    stamps: np.ndarray  # float32 (n, H, W), electrons
    labels: np.ndarray  # int8 (n,), 1 = centred source
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.stamps.shape[0])


def matched_filter_snr(stamps: np.ndarray, shapes: np.ndarray, sigma: np.ndarray,
                       background: np.ndarray | float = 0.0) -> np.ndarray:
    """The matched-filter statistic of each stamp for a known signal shape, in sigma units.

    ``sum_i P_i (stamp_i - background) / (sigma * sqrt(sum_i P_i**2))``; its expectation is
    the SNR this module defines, its spread 1 for white background noise.
    """
    stamps = np.asarray(stamps, np.float64)
    shapes = np.asarray(shapes, np.float64)
    bg = np.asarray(background, np.float64).reshape(-1, 1, 1) if np.ndim(background) else background
    resp = np.einsum("nij,nij->n", shapes, stamps - bg)
    snr: np.ndarray = resp / (np.asarray(sigma, np.float64) * np.sqrt(np.einsum("nij,nij->n", shapes, shapes)))
    return snr


def simulate_stamps(n: int, config: SimConfig | None = None,
                    rng: np.random.Generator | int | None = None, *,
                    stop: threading.Event | None = None) -> SimulatedBatch:
    """Simulate ``n`` stamps in memory (vectorised over stamps).

    ``rng`` is a numpy Generator (or a seed). See the module docstring for the model, the
    SNR definition and the metadata columns. Once ``stop`` is set the simulation ends within
    a fraction of a second, raising the internal :class:`stampbatch.errors.SimulationStopped`
    (:func:`iter_blocks` sets it when closed early).
    """
    config = SimConfig() if config is None else config
    config.validate()
    if n < 0:
        raise SimConfigError(f"number of stamps must be >= 0, got {n}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    shape = (int(config.stamp_shape[0]), int(config.stamp_shape[1]))
    cond = conditions(rng, n, config)
    scene = Scene(n, shape, cond, stop)
    truth = {name: np.full(n, np.nan)
             for name in (store.META_HALF_LIGHT_RADIUS, "sersic_n", "axis_ratio")}
    truth["trail_length"] = np.zeros(n)
    truth["trail_angle"] = np.full(n, np.nan)
    centre_sources(rng, scene, config, truth)
    scene.check()
    hard_negatives(rng, scene, config, truth)
    scene.check()
    fs = field_population(rng, scene, config)
    scene.place_centre(config.source_shot_noise, MAX_SNR)
    stamps = observe(rng, scene, config, truth)
    scene.check()
    n_field, nn_distance, nn_snr = nearest(fs, n)
    f32 = np.float32
    meta = {
        store.META_SNR: cond["snr"].astype(f32), store.META_KIND: np.asarray(KINDS)[cond["kind"]],
        store.META_PROFILE: np.asarray(PROFILES)[cond["profile"]],
        store.META_BACKGROUND: np.asarray(BACKGROUNDS)[cond["background"]],
        store.META_COMPANION: np.asarray(COMPANIONS)[cond["companion"]],
        "psf_fwhm": cond["fwhm"].astype(f32), "psf_beta": cond["beta"].astype(f32),
        "psf_e": cond["psf_e"].astype(f32), "psf_pa": cond["psf_pa"].astype(f32),
        "dx": scene.dx.astype(f32), "dy": scene.dy.astype(f32),
        "snr_eff": scene.snr_eff.astype(f32), "flux": scene.flux.astype(f32),
        "sky": cond["sky"].astype(f32), "sky_subtracted": cond["background"] != BACKGROUNDS.index("science"),
        "sigma": cond["sigma"].astype(f32), "read_noise": cond["read_noise"].astype(f32),
        "n_coadd": cond["n_coadd"].astype(np.int16), "noise_corr": cond["noise_corr"].astype(f32),
        store.META_N_FIELD: n_field.astype(np.int16), store.META_NN_DISTANCE: nn_distance.astype(f32),
        store.META_NN_SNR: nn_snr.astype(f32), store.META_FIELD_DENSITY: cond["density"].astype(f32),
        "saturation": cond["saturation"].astype(f32),
        **{k: (v.astype(f32) if v.dtype.kind == "f" else v) for k, v in truth.items()},
    }
    return SimulatedBatch(stamps=stamps, labels=cond["labels"], meta=meta)


def block_rng(seed: int, block: int) -> np.random.Generator:
    """The generator of simulation block ``block`` (SeedSequence(seed).spawn(...)[block])."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(block,)))


def iter_blocks(n: int, config: SimConfig, seed: int, *,
                workers: int = 1) -> Generator[SimulatedBatch, None, None]:
    """The ``n`` stamps of (seed, config) as consecutive blocks of ``SIM_BLOCK_ROWS``.

    With ``workers`` > 1, blocks are simulated ahead in that many threads (numpy releases
    the GIL in the heavy loops) and still yielded in order; at most ``workers + 1`` blocks
    (the one yielded and those being simulated) are held at once, so memory stays bounded.
    The contents do not depend on ``workers``. Closed early (an error, SIGTERM, Ctrl-C), it
    stops the blocks in flight at their next check (:meth:`stampbatch.sim.scene.Scene.check`)
    and returns within about a second, rather than waiting for them to finish.
    """
    starts = range(0, n, SIM_BLOCK_ROWS)
    stop = threading.Event()

    def make(block: int) -> SimulatedBatch:
        return simulate_stamps(min(SIM_BLOCK_ROWS, n - starts[block]), config,
                               block_rng(seed, block), stop=stop)

    if workers <= 1 or len(starts) == 1:
        yield from map(make, range(len(starts)))
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simulate")
    try:
        pending: deque[Future[SimulatedBatch]] = deque()
        submitted = 0
        while submitted < len(starts) and len(pending) < workers:
            pending.append(pool.submit(make, submitted))
            submitted += 1
        while pending:
            batch = pending.popleft().result()
            if submitted < len(starts):
                pending.append(pool.submit(make, submitted))
                submitted += 1
            yield batch
    finally:
        stop.set()  # the blocks in flight raise SimulationStopped at their next check; nobody reads it
        pool.shutdown(wait=True, cancel_futures=True)


def _default_workers() -> int:
    return min(4, fileio.cores())


def write_simulated(
    path: Path | str,
    n: int,
    *,
    config: SimConfig | None = None,
    seed: int = 0,
    candidates: bool = False,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> store.StoreInfo:
    """Simulate ``n`` stamps into a new HDF5 store, streamed in blocks (bounded memory).

    ``candidates=True`` writes an unlabelled candidate file; the truth stays in
    ``/meta`` (``true_label`` and the other columns) for evaluating completeness. The
    settings and seed go into the root attributes ``simulator_config`` (JSON) and
    ``seed``. The same (seed, config, n) gives identical contents whatever ``chunk_rows``
    or ``workers`` (threads simulating ahead; default: the usable cores, at most 4).
    The file appears only when complete; an existing one is refused unless ``overwrite``.
    """
    config = SimConfig() if config is None else config
    path = Path(path)
    try:
        config.validate()
    except SimConfigError as exc:
        raise SimConfigError(f"{path}: simulator settings: {exc}") from None
    if int(n) < 1:
        raise SimConfigError(f"{path}: number of stamps must be positive, got {n}")
    if int(seed) < 0:
        raise SimConfigError(f"{path}: seed must be >= 0, got {seed}")
    n, seed = int(n), int(seed)
    workers = _default_workers() if workers is None else max(1, int(workers))
    from stampbatch import __version__

    attrs = {
        "simulator": "stampbatch.simulate",
        "simulator_config": config.to_json(),
        "seed": seed,
        "simulator_block_rows": SIM_BLOCK_ROWS,
        "stampbatch_version": __version__,
    }
    shape = (int(config.stamp_shape[0]), int(config.stamp_shape[1]))
    with store.StoreWriter(path, labelled=not candidates, stamp_shape=shape,
                           chunk_rows=min(chunk_rows, n), compression=compression,
                           overwrite=overwrite, attrs=attrs) as writer, \
            Progress(n, "simulate", "stamps", enabled=progress) as bar, \
            contextlib.closing(iter_blocks(n, config, seed, workers=workers)) as blocks:
        for batch in blocks:
            meta = dict(batch.meta)
            for name in (store.META_KIND, store.META_PROFILE, store.META_BACKGROUND,
                         store.META_COMPANION):
                meta[name] = meta[name].astype(_KIND_BYTES)
            if candidates:
                meta[store.META_TRUE_LABEL] = batch.labels
                writer.append(batch.stamps, None, meta)
            else:
                writer.append(batch.stamps, batch.labels, meta)
            bar.update(len(batch))
    return store.open_store(path)
