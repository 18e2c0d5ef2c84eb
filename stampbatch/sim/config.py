"""The settings of the stamp simulator (:class:`SimConfig`) and their checks.

Its own module because both halves of the simulator read it: ``scene`` draws each stamp's
contents from it and ``simulate`` drives the blocks and writes the store (which imports
``scene``); ``inject`` and the CLI load it from TOML. It imports nothing of stampbatch but
``errors``, so none of them needs another to know the settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from stampbatch.errors import SimConfigError

# SimConfig fields giving each hard negative's share of the negatives, in scene.KINDS order.
HARD_FRACTIONS = ("offcentre_fraction", "hot_pixel_fraction", "cosmic_ray_fraction",
                  "streak_fraction", "dipole_fraction")
_FRACTIONS = ("source_fraction", "moffat_fraction", "sky_subtracted_fraction",
              "difference_fraction", "correlated_noise_fraction", "field_galaxy_fraction",
              "galaxy_devaucouleurs_fraction", "centre_galaxy_fraction",
              "centre_saturated_fraction", "spike_fraction",
              "bad_column_fraction", "masked_fraction", "masked_nan_fraction",
              "detector_edge_fraction",
              *HARD_FRACTIONS)
_HARD = HARD_FRACTIONS


MAX_STAMP_SIDE = 1024  # a bigger stamp is a typo (one 1024x1024 stamp is 4 MiB)
MAX_SNR = 1e6  # far brighter sources overflow the float32 pixels


@dataclass
class SimConfig:
    """Settings of the stamp simulator; every field has a default and is checked by validate().

    Where the defaults come from: FWHM 2-6 px spans ZTF (1"/px, 2" seeing) to DECam
    (0.263"/px) in poor seeing; field densities 0.02-3 sources per 100 px^2, i.e. ~0.1 to
    ~13 sources per 21x21 stamp, log-uniform, are 2.6e3-3.9e5/deg^2 in ZTF's 1" pixels and
    3.7e4-5.6e6/deg^2 in DECam's: from below the ~1e4/deg^2 of high latitude at ZTF's depth
    to half the ~1e7/deg^2 of the Galactic bulge at DECam's (training on densities up to 6,
    1.1e7/deg^2 in DECam pixels, changed nothing measurable: BENCHMARKS.md, ninth session);
    ``N(>S) ∝ S^-0.6`` (d log N / dm =
    0.24) is the faint star counts' slope away from the plane (Euclidean would be 1.5);
    galaxy half-light radii 0.5-4 px are faint galaxies at 0.26-1"/px; a
    full well of 1e5 e- per exposure is typical of thick CCDs. Run on through saturation
    (an SNR of ~4e3-3e5 here: ~10 mag above the SNR-2 floor, as for a survey's single
    epochs), that count puts a saturated star on ~0.5 % of the stamps, from ~0.03 % in the
    sparsest fields to ~2 % in the most crowded (measured on 20,000 default stamps).
    """

    RETIRED_OPTIONS: ClassVar[dict[str, str]] = {
        "bright_star_fraction": "saturated field stars are the bright end of the field's "
                                "number counts (field_density_*, field_count_slope, "
                                "field_snr_max, full_well); delete the line"}

    stamp_shape: tuple[int, int] = (21, 21)  # stamp height, width in px
    source_fraction: float = 0.5  # fraction of stamps with a centred source (label 1)
    snr_min: float = 3.0  # lowest matched-filter SNR of injected signals (log-uniform)
    snr_max: float = 100.0  # highest matched-filter SNR of injected signals
    fwhm_min: float = 2.0  # narrowest PSF FWHM, px (ZTF-like seeing)
    fwhm_max: float = 6.0  # widest PSF FWHM, px (DECam in bad seeing)
    moffat_fraction: float = 0.5  # fraction of stamps with a Moffat PSF (rest Gaussian)
    moffat_beta_min: float = 2.5  # Moffat beta range (must exceed 1 for finite flux)
    moffat_beta_max: float = 5.0  # 4.765 is the Kolmogorov-turbulence value
    psf_ellipticity_max: float = 0.1  # PSF ellipticity (a-b)/(a+b), uniform 0..max per stamp
    # (position angle uniform): guiding, wind shake and optics; 0.02-0.1 is typical (0: round)
    max_centre_offset: float = 0.5  # largest offset of a positive from the centre, px
    sky_subtracted_fraction: float = 0.6  # stamps with the sky level removed
    difference_fraction: float = 0.5  # of the sky-subtracted stamps: difference images
    sky_min: float = 50.0  # sky per exposure, e-/px, log-uniform (must be > 0)
    sky_max: float = 5000.0  # sky per exposure, e-/px
    read_noise_min: float = 2.0  # read noise per exposure, e-, uniform
    read_noise_max: float = 10.0  # read noise per exposure, e-
    n_coadd_min: int = 3  # fewest exposures (nights) co-added along a trajectory
    n_coadd_max: int = 20  # most exposures co-added
    source_shot_noise: bool = True  # add every signal's own Poisson noise
    correlated_noise_fraction: float = 0.3  # fraction of resampled co-adds (correlated noise)
    noise_corr_min: float = 0.05  # neighbour weight c of the [c,1,c] noise kernel, lowest
    noise_corr_max: float = 0.3  # c = 0.3: neighbour correlation 0.51, as bilinear resampling
    sky_gradient_max: float = 0.1  # sky gradient across a stamp, sigma per px (uniform 0..max)
    residual_sky_max: float = 0.5  # sky left after subtraction, sigma (uniform -max..max)
    misregistration_max: float = 0.3  # template shift of difference images, px (0..max)
    flux_mismatch_max: float = 0.05  # template flux-scaling error of difference images (+-)
    field_density_min: float = 0.02  # field sources per 100 px^2, sparsest (0 and 0: no field)
    field_density_max: float = 3.0  # most crowded; log-uniform per stamp in between
    field_density_fwhm: float = 4.0  # the FWHM (px) at which those densities hold; a stamp of
    # FWHM f sees (f / this)^-field_count_slope times as many above field_snr_min (0: same at all)
    field_snr_min: float = 2.0  # faintest field source, point-source SNR
    field_snr_max: float = 1.0e6  # brightest field source: the count runs on through
    # saturation (~4e3-3e5 here, by sky, exposures and PSF) to stars that bleed whole columns
    field_count_slope: float = 0.6  # N(>S) ∝ S^-slope
    field_margin: float = 10.0  # sources beyond the stamp's edge, within this many px, ...
    field_margin_snr_min: float = 50.0  # ... and at least this bright, light its edge (their
    # wings, halos, spikes); fainter ones barely reach in (0 margin: a stamp-sized sky)
    field_min_distance: float = 3.0  # field sources lie at least this far from the centre, px
    field_min_distance_fwhm: float = 1.0  # ... and at least this many FWHM
    field_galaxy_fraction: float = 0.3  # fraction of field sources that are galaxies
    galaxy_re_min: float = 0.5  # galaxy half-light radius (semi-major), px, log-uniform
    galaxy_re_max: float = 4.0
    galaxy_devaucouleurs_fraction: float = 0.3  # Sérsic n = 4 (the rest n = 1, exponential)
    galaxy_axis_ratio_min: float = 0.3  # axis ratio b/a uniform in [min, 1]
    centre_galaxy_fraction: float = 0.25  # of positives outside difference images
    centre_galaxy_re_max: float = 2.0  # centre galaxies are compact: r_e up to this, px
    centre_saturated_fraction: float = 0.03  # of positives outside difference images
    full_well: float = 1.0e5  # e- per exposure; the co-add saturates at n_coadd times this
    saturation_min: float = 1.2  # unclipped peak / full-well headroom of saturated stars
    saturation_max: float = 30.0  # (log-uniform)
    spike_fraction: float = 0.5  # stamps whose saturated stars show diffraction-like spikes
    spike_strength: float = 0.03  # fraction of the star's flux in its spikes
    spike_length: float = 5.0  # e-folding length of a spike, px
    bad_column_fraction: float = 0.02  # stamps with a dead or hot column
    masked_fraction: float = 0.02  # stamps with a block of masked pixels
    masked_nan_fraction: float = 0.5  # of those: NaN instead of 0, as many pipelines store
    # masks (the stamp's sky fills them when read, see stampbatch.train.preprocess)
    mask_max_size: int = 3  # masked blocks are 1..this px a side
    detector_edge_fraction: float = 0.015  # stamps cut at a detector's edge: no data (NaN)
    # beyond it, 1..half a stamp deep (DECam's 2048x4096 CCDs, 21 px stamps: 2*10/2048 +
    # 2*10/4096 = 1.5 % of stamp centres lie that close to an edge)
    offcentre_fraction: float = 0.15  # fraction of negatives with an off-centre source
    hot_pixel_fraction: float = 0.1  # fraction of negatives with a single hot pixel
    cosmic_ray_fraction: float = 0.1  # fraction of negatives with a 1-3 px cosmic-ray track
    streak_fraction: float = 0.1  # fraction of negatives with a partial streak
    dipole_fraction: float = 0.1  # fraction of negatives with a subtraction residual
    offcentre_min_distance: float = 6.0  # off-centre sources lie farther than this, px
    artefact_max_offset: float = 3.0  # hot pixels/cosmic rays/dipoles within this, px per axis
    streak_length_min: float = 8.0  # shortest streak (trail) length, px
    streak_length_max: float = 40.0  # longest streak length, px
    streak_min_offset: float = 3.0  # streak midpoints lie at least this far from the centre, px
    positive_companions: bool = True  # positives carry off-centre sources, streaks, hot pixels
    # and cosmic rays as often as negatives do (False: the earlier negative-only hard kinds,
    # a label shortcut; see stampbatch.sim.simulate)

    def validate(self) -> None:
        """Raise SimConfigError (a ValueError) naming the first bad setting."""
        shape = tuple(self.stamp_shape)
        if len(shape) != 2 or not all(isinstance(v, int | np.integer) and 5 <= v <= MAX_STAMP_SIDE
                                      for v in shape):
            raise SimConfigError(f"stamp_shape must be two integers >= 5 and <= {MAX_STAMP_SIDE}, "
                                 f"got {self.stamp_shape!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SimConfigError(f"{f.name} must be finite, got {value}")
        for name in _FRACTIONS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimConfigError(f"{name} must lie in [0, 1], got {value}")
        hard = sum(getattr(self, n) for n in _HARD)
        if hard > 1.0 + 1e-9:
            raise SimConfigError(f"{' + '.join(_HARD)} = {hard:g} exceeds 1 (they are fractions "
                                 f"of the negatives)")
        for stem, floor, strict in (("snr", 0.0, True), ("fwhm", 0.0, True),
                                    ("moffat_beta", 1.0, True), ("sky", 0.0, True),
                                    ("read_noise", 0.0, False), ("n_coadd", 1, False),
                                    ("noise_corr", 0.0, False), ("streak_length", 0.0, True),
                                    ("field_snr", 0.0, True), ("galaxy_re", 0.0, True),
                                    ("saturation", 1.0, True)):
            self._check_range(stem, floor, strict=strict)
        for name in ("snr_max", "field_snr_max"):  # brighter overflows float32 electrons
            if getattr(self, name) > MAX_SNR:
                raise SimConfigError(f"{name} must be at most {MAX_SNR:g}, "
                                     f"got {getattr(self, name):g}")
        if not (isinstance(self.n_coadd_min, int) and isinstance(self.n_coadd_max, int)):
            raise SimConfigError("n_coadd_min and n_coadd_max must be integers")
        if not 0.0 <= self.psf_ellipticity_max <= 0.5:
            raise SimConfigError(f"psf_ellipticity_max must lie in [0, 0.5] ((a-b)/(a+b); 0.5 is "
                                 f"an axis ratio of 3), got {self.psf_ellipticity_max}")
        if self.noise_corr_max > 1.0:
            raise SimConfigError(f"noise_corr_max must be at most 1, got {self.noise_corr_max}")
        self._check_field_and_sizes(shape)

    def _check_field_and_sizes(self, shape: tuple[int, ...]) -> None:
        for name in ("sky_gradient_max", "residual_sky_max", "misregistration_max",
                     "flux_mismatch_max", "field_min_distance", "field_min_distance_fwhm",
                     "spike_strength", "max_centre_offset", "offcentre_min_distance",
                     "artefact_max_offset", "streak_min_offset", "field_density_min",
                     "field_density_fwhm", "field_margin", "field_margin_snr_min"):
            if getattr(self, name) < 0:
                raise SimConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("full_well", "spike_length", "field_count_slope"):
            if getattr(self, name) <= 0:
                raise SimConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.field_margin > MAX_STAMP_SIDE:  # its area is drawn for every stamp
            raise SimConfigError(f"field_margin must be at most {MAX_STAMP_SIDE} px, got "
                                 f"{self.field_margin:g}")
        if not (isinstance(self.mask_max_size, int) and self.mask_max_size >= 1):
            raise SimConfigError(f"mask_max_size must be an integer >= 1, got {self.mask_max_size}")
        if self.field_density_max > 0 and self.field_density_min <= 0:
            raise SimConfigError("field_density_min must be > 0 when field_density_max > 0 "
                                 "(densities are log-uniform); set both to 0 for no field")
        if self.field_density_min > self.field_density_max:
            raise SimConfigError(f"field_density_min ({self.field_density_min}) must not exceed "
                                 f"field_density_max ({self.field_density_max})")
        if not self.galaxy_axis_ratio_min > 0 or self.galaxy_axis_ratio_min > 1:
            raise SimConfigError(f"galaxy_axis_ratio_min must lie in (0, 1], got "
                                 f"{self.galaxy_axis_ratio_min}")
        if self.centre_galaxy_re_max < self.galaxy_re_min:
            raise SimConfigError(f"centre_galaxy_re_max ({self.centre_galaxy_re_max}) must not "
                                 f"be below galaxy_re_min ({self.galaxy_re_min})")
        half = min(shape) / 2.0
        field_r = max(self.field_min_distance, self.field_min_distance_fwhm * self.fwhm_max)
        for name, value, used in (
                ("max_centre_offset", self.max_centre_offset, self.source_fraction > 0),
                ("offcentre_min_distance", self.offcentre_min_distance,
                 self.offcentre_fraction > 0),
                ("artefact_max_offset", self.artefact_max_offset,
                 self.hot_pixel_fraction + self.cosmic_ray_fraction + self.dipole_fraction > 0),
                ("streak_min_offset", self.streak_min_offset, self.streak_fraction > 0),
                ("field_min_distance (or field_min_distance_fwhm * fwhm_max)", field_r,
                 self.field_density_max > 0)):
            if used and value >= half:
                raise SimConfigError(f"{name} = {value} px does not fit a "
                                     f"{shape[0]}x{shape[1]} stamp (must be < {half:g})")
        if self.offcentre_fraction > 0 and self.offcentre_min_distance <= self.max_centre_offset:
            raise SimConfigError(
                f"offcentre_min_distance ({self.offcentre_min_distance}) must exceed "
                f"max_centre_offset ({self.max_centre_offset}): off-centre negatives would "
                f"look like positives")
        if field_r <= self.max_centre_offset:
            raise SimConfigError(f"field_min_distance ({field_r:g} px) must exceed "
                                 f"max_centre_offset ({self.max_centre_offset}): field sources "
                                 f"would sit at the centre")

    def _check_range(self, stem: str, floor: float, *, strict: bool) -> None:
        lo, hi = getattr(self, f"{stem}_min"), getattr(self, f"{stem}_max")
        if (lo <= floor) if strict else (lo < floor):
            relation = ">" if strict else ">="
            raise SimConfigError(f"{stem}_min must be {relation} {floor:g}, got {lo}")
        if lo > hi:
            raise SimConfigError(f"{stem}_min ({lo}) must not exceed {stem}_max ({hi})")

    def to_json(self) -> str:
        """The settings as a JSON object (kept in the store's root attributes)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)
