"""Where does a run lose completeness on a simulated store, and how far is it from the limit?

    .venv/bin/python benchmarks/quality_breakdown.py RUN STORE.h5 [--json OUT.json]

Scores the labelled simulated STORE with RUN's model and splits the positives by what the
simulator knows about each stamp (``/meta``), at the store's own 1 %-FPR threshold:

* **ideal observer**: the completeness a matched filter that knew the PSF and the noise
  would reach against pure-noise negatives, ``Phi(snr_eff - z_0.99)`` — an upper bound (hard
  negatives only raise the threshold, neighbours only add confusion) — and its ROC AUC
  ``Phi(snr_eff / sqrt 2)``, per SNR bin;
* **bright-star stamps**: stamps holding saturated pixels from a star that is *not* the
  centre source (a halo and bleed trail across the stamp), against the rest;
* **nearest neighbour in FWHM units** (blends: two sources closer than ~1 FWHM are not
  resolved), and **field crowding per beam** (sources per 1.133 FWHM^2: the confusion limit
  of a survey is about 1 source per 20-50 beams);
* the threshold set by each kind of negative alone, to tell hard negatives from the field;
* **where the ROC AUC is lost**: each positive's share of ``1 - AUC`` (the fraction of the
  negatives scoring at or above it, over the number of positives), summed by SNR bin and by
  the number of field sources on the stamp, beside AUC and completeness per field count;
* the groups issue 13's bar names (a field source within 6 px; a galaxy at the centre), so
  the bar can be read against the ideal observer's bound for the same stamps, and the
  centre's profile (point, galaxy) by SNR outside difference images: is a galaxy harder
  than a star of the same SNR on the same kind of image?
* **what sets the 1 %-FPR threshold**: the false positives there by kind of negative,
  streaks whose trail crosses the centre (within FWHM/2 of it) against those that do not,
  and the completeness if streaks and dipoles were all rejected;
* **stamps with a saturated field star**: completeness by the number of clipped pixels;
* **faint sources against empty sky of the same kind**: SNR 3-5 positives against the
  ``background`` negatives (nothing placed at or near the centre) that share their group —
  field sources on the stamp, and on stamps without field sources the kind of image, white
  or correlated noise, and the positive's companion — beside the ideal observer's AUC for
  those positives: is the faint end lost to the field, to the noise, or to neither?
* with ``--d4``, the ROC AUC of the mean probability over the stamp's eight flips and
  quarter-turns (test-time augmentation: does a symmetric average buy anything?).

Every figure is recomputed from the stamps and the model; nothing is read from a report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from scipy.stats import norm  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from stampbatch import store  # noqa: E402
from stampbatch.report.evaluate import store_truth  # noqa: E402

SNR_BINS = ((3, 5), (5, 7), (7, 10), (10, 20), (20, 50), (50, np.inf))
NN_FWHM_BINS = (0.0, 1.25, 1.5, 2.0, 3.0, np.inf)
BEAM_CAPS = (np.inf, 0.2, 0.1, 0.05)
N_FIELD_BINS = (0, 1, 2, 4, 8, 13, 20, np.inf)
CLIPPED_BINS = ((1, 10), (10, 50), (50, 10**6))


def subset_auc(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of the stamps selected by ``pos`` (as positives) against those selected by
    ``neg`` (boolean masks over the same stamps)."""
    return float(roc_auc_score(np.r_[np.ones(pos.sum()), np.zeros(neg.sum())],
                               np.r_[score[pos], score[neg]]))


def load_model(run: Path):
    """RUN's saved model (loaded once, for the plain and the --d4 scoring)."""
    import keras

    from stampbatch.train.loop import configure_tensorflow

    configure_tensorflow()
    return keras.models.load_model(run / "model.keras", safe_mode=True)


def probabilities(model, data: Path, n: int) -> np.ndarray:
    from stampbatch.train.dataset import predict_rows

    prob, _, finite = predict_rows(model, data, np.arange(n))
    return np.where(finite, prob, np.nan)


def d4_mean_probabilities(model, raw: np.ndarray) -> np.ndarray:
    """P(source) of the stamps ``raw`` (N, H, W), averaged over each one's eight flips and
    quarter-turns."""
    from stampbatch.train.preprocess import normalize_with_mask

    x, _ = normalize_with_mask(raw)
    total = np.zeros(len(x))
    for k in range(8):
        t = np.rot90(x, k % 4, axes=(1, 2))
        t = t[:, :, ::-1] if k >= 4 else t
        total += model.predict(np.ascontiguousarray(t)[..., None], batch_size=1024, verbose=0)[:, 1]
    return total / 8.0


def streak_crosses_centre(dx: np.ndarray, dy: np.ndarray, angle: np.ndarray, length: np.ndarray,
                          fwhm: np.ndarray) -> np.ndarray:
    """Whether a trail (midpoint ``dx, dy`` px from the centre, ``length`` px at ``angle``
    radians, as :func:`stampbatch.sim.profiles.render_trail` draws it) passes within FWHM/2 of
    the stamp's centre, i.e. puts its light where a centred source would be."""
    c, s = np.cos(angle), np.sin(angle)
    along, across = -(dx * c + dy * s), dx * s - dy * c
    return (np.abs(along) <= 0.5 * length) & (np.abs(across) < 0.5 * fwhm)


def false_positives(y: np.ndarray, p: np.ndarray, meta: dict, thr: float) -> dict:
    """What passes the threshold ``thr`` among the negatives: counts by kind, streaks that
    cross the centre against those that do not, and the completeness at the threshold
    giving the same FPR when streaks and dipoles are all rejected."""
    neg, pos = y == 0, y == 1
    kind = np.asarray(meta["kind"]).astype(str)
    passed = neg & (p > thr)
    out: dict = {"n_negatives": int(neg.sum()), "false_positives": int(passed.sum()),
                 "by_kind": {k: {"negatives": int((neg & (kind == k)).sum()),
                                 "false_positives": int((passed & (kind == k)).sum())}
                             for k in np.unique(kind[neg])}}
    streak = neg & (kind == "streak")
    if streak.any():
        cross = streak & streak_crosses_centre(meta["dx"], meta["dy"], meta["trail_angle"],
                                               meta["trail_length"], meta["psf_fwhm"])
        out["streaks"] = {
            "crossing_centre": int(cross.sum()),
            "crossing_pass": float((p[cross] > thr).mean()) if cross.any() else None,
            "crossing_median_p": float(np.median(p[cross])) if cross.any() else None,
            "other_pass": float((p[streak & ~cross] > thr).mean()) if (streak & ~cross).any() else None}
    rest = neg & ~np.isin(kind, ("streak", "dipole"))
    if rest.any() and pos.any():
        # the same number of false positives, all from the other kinds
        t = np.quantile(p[rest], max(0.0, 1.0 - passed.sum() / rest.sum()))
        out["without_streaks_and_dipoles"] = {"threshold": float(t),
                                              "completeness": float((p[pos] > t).mean())}
    return out


def breakdown(y: np.ndarray, p: np.ndarray, meta: dict, stamps: np.ndarray) -> dict:
    """The tables of the module docstring, as a dict."""
    pos, neg = y == 1, y == 0
    thr = float(np.quantile(p[neg], 0.99))
    found = p > thr
    snr, eff = meta["snr"], meta["snr_eff"]
    ceiling, ideal_auc = norm.cdf(eff - norm.ppf(0.99)), norm.cdf(eff / np.sqrt(2.0))

    def row(sel: np.ndarray) -> dict:
        sel = sel & pos
        if not sel.any():
            return {"n": 0}
        return {"n": int(sel.sum()), "completeness": float(found[sel].mean()),
                "roc_auc": subset_auc(p, sel, neg),
                "ideal_completeness": float(ceiling[sel].mean()),
                "ideal_roc_auc": float(ideal_auc[sel].mean())}

    profile = np.asarray(meta["profile"]).astype(str)
    # clipped pixels of a field star (a saturated centre star is its own profile)
    n_clipped = (stamps >= meta["saturation"].astype(np.float32)[:, None, None]).sum(axis=(1, 2))
    star = (n_clipped > 0) & (profile != "saturated")
    nn = meta["nn_distance"] / meta["psf_fwhm"]
    per_beam = meta["field_density"] / 100.0 * 1.133 * meta["psf_fwhm"] ** 2
    out: dict = {"threshold_1pct_fpr": thr, "all": row(np.ones_like(pos)),
                 "by_snr": {f"{lo}-{hi}": row((snr >= lo) & (snr < hi)) for lo, hi in SNR_BINS},
                 "bright_star_elsewhere": row(star), "no_bright_star": row(~star),
                 "by_nn_distance_fwhm": {f"{lo}-{hi}": row((nn >= lo) & (nn < hi))
                                         for lo, hi in zip(NN_FWHM_BINS[:-1], NN_FWHM_BINS[1:])},
                 "no_neighbour": row(np.isnan(nn)),
                 # the groups issue 13's bar names, beside the ideal observer's bound
                 "neighbour_within_6px": row(meta["nn_distance"] < 6.0),
                 "centre_galaxy": row(profile == "galaxy")}
    out["by_nn_distance_fwhm_snr_ge_10"] = {
        f"{lo}-{hi}": row((nn >= lo) & (nn < hi) & (snr >= 10))
        for lo, hi in zip(NN_FWHM_BINS[:-1], NN_FWHM_BINS[1:])}
    out["crowding_per_beam"] = {}
    for cap in BEAM_CAPS:
        k = per_beam <= cap
        yk, pk = y[k], p[k]
        t = np.quantile(pk[yk == 0], 0.99)
        bright = (yk == 1) & (snr[k] >= 10)
        out["crowding_per_beam"][f"<= {cap:g}"] = {
            "n": int(k.sum()), "roc_auc": float(roc_auc_score(yk, pk)),
            "completeness": float((pk[yk == 1] > t).mean()),
            "completeness_snr_ge_10": float((pk[bright] > t).mean())}
    # outside difference images, where galaxies never sit at the centre and fields are subtracted
    undiffed = np.asarray(meta["background"]).astype(str) != "difference"
    out["by_profile_snr"] = {pr: {f"{lo}-{hi}": row(undiffed & (profile == pr) & (snr >= lo) & (snr < hi))
                                  for lo, hi in SNR_BINS} for pr in ("point", "galaxy")}
    out["by_clipped_pixels"] = {f"{lo}-{hi}": row(star & (n_clipped >= lo) & (n_clipped < hi))
                                for lo, hi in CLIPPED_BINS}
    out["false_positives"] = false_positives(y, p, meta, thr)
    out["faint_against_empty"] = faint_against_empty(y, p, meta)
    out.update(_auc_deficit(y, p, snr, meta["n_field"], thr))
    kind = np.asarray(meta["kind"]).astype(str)
    out["threshold_by_negative_kind"] = {}
    for k in np.unique(kind[neg]):
        t = np.quantile(p[neg & (kind == k)], 0.99)
        out["threshold_by_negative_kind"][k] = {
            "threshold": float(t), "passes_store_threshold": float(found[neg & (kind == k)].mean()),
            "completeness_snr_ge_10": float((p[pos & (snr >= 10)] > t).mean())}
    return out


def faint_against_empty(y: np.ndarray, p: np.ndarray, meta: dict, lo: float = 3.0,
                        hi: float = 5.0) -> dict:
    """ROC AUC of the positives of SNR ``lo``-``hi`` against the empty negatives (kind
    ``background``) of the same group, and the ideal observer's AUC Phi(snr_eff / sqrt 2)
    for those positives. Groups: field sources on the stamp; on stamps without field
    sources, the kind of image, white or correlated noise, and the positive's companion
    (empty negatives carry none, so those rows compare with every empty field-free one)."""
    kind = np.asarray(meta["kind"]).astype(str)
    snr, n_field = meta["snr"], meta["n_field"]
    faint = (y == 1) & (snr >= lo) & (snr < hi)
    empty = (y == 0) & (kind == "background")
    ideal = norm.cdf(meta["snr_eff"] / np.sqrt(2.0))

    def row(pos: np.ndarray, neg: np.ndarray) -> dict:
        pos, neg = faint & pos, empty & neg
        if not pos.any() or not neg.any():
            return {"positives": int(pos.sum()), "negatives": int(neg.sum())}
        return {"positives": int(pos.sum()), "negatives": int(neg.sum()),
                "roc_auc": subset_auc(p, pos, neg),
                "ideal_roc_auc": float(ideal[pos].mean())}

    sparse = n_field == 0
    every = np.ones_like(sparse)
    correlated = meta["noise_corr"] > 0
    background = np.asarray(meta["background"]).astype(str)
    companion = np.asarray(meta["companion"]).astype(str)
    out: dict = {"snr": [lo, hi], "all": row(every, every), "by_n_field": {}}
    for a, b in zip(N_FIELD_BINS[:-1], N_FIELD_BINS[1:]):
        s = (n_field >= a) & (n_field < b)
        out["by_n_field"][f"{a}-{b}"] = row(s, s)
    out["no_field_by_background"] = {k: row(sparse & (background == k), sparse & (background == k))
                                     for k in np.unique(background[faint])}
    out["no_field_by_noise"] = {k: row(sparse & c, sparse & c)
                                for k, c in (("white", ~correlated), ("correlated", correlated))}
    out["no_field_by_companion"] = {k: row(sparse & (companion == k), sparse)
                                    for k in np.unique(companion[faint])}
    return out


def _auc_deficit(y: np.ndarray, p: np.ndarray, snr: np.ndarray, n_field: np.ndarray,
                 thr: float) -> dict:
    """Each positive's share of 1 - AUC, summed by SNR and by field count; AUC and
    completeness (at the store's threshold ``thr``) per field count."""
    pos = np.flatnonzero(y == 1)
    neg_sorted = np.sort(p[y == 0])
    # fraction of the negatives at or above each positive (ties count whole: a bound)
    above = 1.0 - np.searchsorted(neg_sorted, p[pos], side="left") / len(neg_sorted)
    share = above / len(pos)
    out: dict = {"auc_deficit": float(share.sum()), "auc_deficit_by_snr": {},
                 "auc_deficit_by_n_field": {}, "by_n_field": {}}
    for lo, hi in SNR_BINS:
        k = (snr[pos] >= lo) & (snr[pos] < hi)
        out["auc_deficit_by_snr"][f"{lo}-{hi}"] = {"positives": float(k.mean()),
                                                   "deficit": float(share[k].sum())}
    for lo, hi in zip(N_FIELD_BINS[:-1], N_FIELD_BINS[1:]):
        k = (n_field[pos] >= lo) & (n_field[pos] < hi)
        out["auc_deficit_by_n_field"][f"{lo}-{hi}"] = {"positives": float(k.mean()),
                                                       "deficit": float(share[k].sum())}
        s = (n_field >= lo) & (n_field < hi)
        if len(np.unique(y[s])) < 2:
            continue
        bright = s & (y == 1) & (snr >= 20)
        out["by_n_field"][f"{lo}-{hi}"] = {
            "n": int(s.sum()), "roc_auc": float(roc_auc_score(y[s], p[s])),
            "completeness": float((p[s & (y == 1)] > thr).mean()),
            "completeness_snr_ge_20": float((p[bright] > thr).mean()) if bright.any() else None,
            "fpr": float((p[s & (y == 0)] > thr).mean())}
    return out


def _print(result: dict) -> None:
    def line(name: str, r: dict) -> None:
        if r.get("n", 0) == 0:
            return
        print(f"  {name:<24} n={r['n']:>6}  completeness {r['completeness']:.3f} "
              f"(ideal {r['ideal_completeness']:.3f})  AUC {r['roc_auc']:.4f} "
              f"(ideal {r['ideal_roc_auc']:.4f})")

    print(f"threshold at 1 % FPR: {result['threshold_1pct_fpr']:.3f}")
    line("all positives", result["all"])
    print("by SNR:")
    for k, r in result["by_snr"].items():
        line(k, r)
    print("bright (saturated) star off the centre:")
    line("yes", result["bright_star_elsewhere"])
    line("no", result["no_bright_star"])
    for n_clip, r in result["by_clipped_pixels"].items():
        line(f"  {n_clip} clipped px", r)
    print("the centre's profile by SNR (science and sky-subtracted stamps):")
    for pr, rows in result["by_profile_snr"].items():
        for k, r in rows.items():
            line(f"{pr} {k}", r)
    print("nearest field source, distance / FWHM (all SNR; SNR >= 10):")
    for k, r in result["by_nn_distance_fwhm"].items():
        line(k, r)
        line(f"{k}, SNR >= 10", result["by_nn_distance_fwhm_snr_ge_10"][k])
    line("none", result["no_neighbour"])
    print("the groups of the issue's bar:")
    line("neighbour within 6 px", result["neighbour_within_6px"])
    line("galaxy at the centre", result["centre_galaxy"])
    print("field crowding, sources per beam:")
    for k, r in result["crowding_per_beam"].items():
        print(f"  {k:<8} n={r['n']:>6}  AUC {r['roc_auc']:.4f}  completeness {r['completeness']:.3f}"
              f"  SNR >= 10: {r['completeness_snr_ge_10']:.3f}")
    print(f"where the ROC AUC is lost (1 - AUC = {result['auc_deficit']:.4f}), by SNR and by field "
          f"sources on the stamp:")
    for table, label in (("auc_deficit_by_snr", "SNR"), ("auc_deficit_by_n_field", "n_field")):
        for k, r in result[table].items():
            print(f"  {label:<8} {k:<8} {r['positives']:.3f} of the positives, "
                  f"{r['deficit']:.4f} of 1 - AUC ({r['deficit'] / result['auc_deficit']:.0%})")
    print("by field sources on the stamp (completeness at the store's threshold):")
    for k, r in result["by_n_field"].items():
        bright = "-" if r["completeness_snr_ge_20"] is None else f"{r['completeness_snr_ge_20']:.3f}"
        print(f"  {k:<8} n={r['n']:>6}  AUC {r['roc_auc']:.4f}  completeness {r['completeness']:.3f}"
              f"  SNR >= 20: {bright}  FPR {r['fpr']:.4f}")
    print("1 %-FPR threshold of each negative kind alone (completeness at SNR >= 10 there):")
    for k, r in result["threshold_by_negative_kind"].items():
        print(f"  {k:<12} {r['threshold']:.3f}  {r['completeness_snr_ge_10']:.3f}   "
              f"(passes the store's threshold: {r['passes_store_threshold']:.3f})")
    fp = result["false_positives"]
    print(f"false positives at the store's threshold: {fp['false_positives']} of "
          f"{fp['n_negatives']} negatives; " + ", ".join(
              f"{k} {r['false_positives']}/{r['negatives']}" for k, r in fp["by_kind"].items()))
    if fp.get("streaks", {}).get("crossing_centre"):
        st = fp["streaks"]
        print(f"  streaks crossing the centre: {st['crossing_centre']}, {st['crossing_pass']:.3f} pass "
              f"(median P {st['crossing_median_p']:.3f}); other streaks: {st['other_pass']:.4f} pass")
    if "without_streaks_and_dipoles" in fp:
        w = fp["without_streaks_and_dipoles"]
        print(f"  were streaks and dipoles all rejected: threshold {w['threshold']:.3f}, "
              f"completeness {w['completeness']:.3f}")
    fa = result["faint_against_empty"]
    print(f"SNR {fa['snr'][0]:g}-{fa['snr'][1]:g} sources against empty negatives of the same group "
          f"(AUC; the ideal observer's in brackets):")

    def faint(name: str, r: dict) -> None:
        if "roc_auc" in r:
            print(f"  {name:<28} {r['positives']:>5} / {r['negatives']:>5}  AUC {r['roc_auc']:.4f} "
                  f"({r['ideal_roc_auc']:.4f})")

    faint("all", fa["all"])
    for table, label in (("by_n_field", "field sources"), ("no_field_by_background", "no field, image"),
                         ("no_field_by_noise", "no field, noise"),
                         ("no_field_by_companion", "no field, companion")):
        for k, r in fa[table].items():
            faint(f"{label} {k}", r)
    if "d4_mean" in result:
        d = result["d4_mean"]
        print(f"mean over the 8 flips/quarter-turns: AUC {d['roc_auc']:.4f} -> {d['roc_auc_d4_mean']:.4f}, "
              f"completeness {d['completeness']:.3f} -> {d['completeness_d4_mean']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--d4", action="store_true",
                        help="also score the eight flips/quarter-turns of each stamp (8x the work)")
    args = parser.parse_args()
    y = store_truth(args.store)
    meta = store.read_meta(args.store)
    missing = [c for c in ("snr", "snr_eff", "profile", "kind", "psf_fwhm", "nn_distance",
                           "field_density", "saturation", "n_field", "background", "dx", "dy", "trail_angle",
                           "trail_length", "noise_corr", "companion") if c not in meta]
    if missing:
        print(f"{args.store}: not a simulated store (no /meta {', '.join(missing)})", file=sys.stderr)
        return 2
    model = load_model(args.run)
    p = probabilities(model, args.store, len(y))
    ok = np.isfinite(p)
    stamps = store.read_stamps(args.store)[ok]
    d4 = d4_mean_probabilities(model, stamps) if args.d4 else None
    result = breakdown(y[ok], p[ok], {k: v[ok] for k, v in meta.items()}, stamps)
    result.update(run=str(args.run), store=str(args.store))
    if d4 is not None:
        yk, pk = y[ok], p[ok]
        result["d4_mean"] = {"roc_auc": float(roc_auc_score(yk, pk)),
                             "roc_auc_d4_mean": float(roc_auc_score(yk, d4)),
                             "completeness": float((pk[yk == 1] > np.quantile(pk[yk == 0], 0.99)).mean()),
                             "completeness_d4_mean": float(
                                 (d4[yk == 1] > np.quantile(d4[yk == 0], 0.99)).mean())}
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
