"""``python -m training site-shift --config C``: train on one synthetic stain, test on another.

What a hospital meets on its first day: slides from a lab whose stain differs from every training
slide's.  The experiment asks what stain normalisation buys there and whether the OOD gate
(glio_node/ood.py) withholds the slides the classifier gets wrong.  It reads top to bottom:

config (a run config plus a ``[site_shift]`` table) -> dataset (written from ``[synthetic]`` when
missing) -> the run's patient split (training/splits.py, as ``train``) -> the classifier's tiles
-> one drawn stain change (training/stain_shift.py) applied to the **test** patients' tiles only
-> per arm (one normalisation each: none, Reinhard, Macenko): train the molecular classifier
(run.train_classifier: early stopping and checkpoint on the validation patients), choose each
head's temperature and indeterminate threshold on the validation slides (run.choose_calibration)
and fit the OOD gate on the training and validation slides (training/ood.fit_gate) -- every
choosing step sees the source stain only, and the test slides' tiles are not passed to any of
them -> score the test patients once per stain (shifted, and for reference unshifted) with the
gate off and on -> site-shift.json, site-shift.md.

A slide is *called* for a head when its calibrated top probability reaches the head's threshold
and, with the gate on, the gate does not withhold it -- what the worker does.  Coverage is the
fraction of test slides called; the covered slides' AUC and balanced accuracy say how much
abstention recovers.  Every figure has a patient-level bootstrap 95 % interval.  Nothing is
exported: the bundles of this experiment are not for service.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from glio_node.pipeline.calibration import calibrate
from training.bootstrap import bootstrap
from training.errors import ConfigError
from training.metrics import balanced_accuracy, confusion_matrix, one_vs_rest_auc
from training.run import (
    CLS_TASKS,
    RunConfig,
    _load_tiles,
    _splits,
    _start_run,
    _Tiles,
    _with_ci,
    _write_split,
    choose_calibration,
    read_config,
    score_set,
    train_classifier,
)
from training.stain_shift import DrawnShift, StainShift, apply_stain_shift, draw_shift

ARMS = ("scale_0_1", "reinhard", "macenko")
ARM_NAMES = {"scale_0_1": "none", "reinhard": "Reinhard", "macenko": "Macenko"}
STAINS = ("shifted", "source")  # the test patients' tiles as the new site stains them, and as the source does


@dataclass(frozen=True)
class SiteShiftConfig:
    """``[site_shift]``: the arms (normalisations, one training each) and the test site's stain."""

    arms: tuple[str, ...] = ARMS
    stain: StainShift = StainShift()

    @classmethod
    def from_table(cls, table: dict) -> SiteShiftConfig:
        unknown = set(table) - {"arms", "stain"}
        if unknown:
            raise ConfigError(f"[site_shift] has unknown key(s) {', '.join(sorted(unknown))}; allowed: arms, stain")
        arms = tuple(table.get("arms", ARMS))
        bad = [a for a in arms if a not in ARMS]
        if bad or not arms or len(set(arms)) != len(arms):
            raise ConfigError(f"site_shift.arms {list(arms)} must be distinct values of {list(ARMS)}")
        return cls(arms=arms, stain=StainShift.from_table(table.get("stain", {})))


def _auc(truth: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present (a binary head: its AUC); NaN with one class."""
    if len(set(truth.tolist())) < 2:
        return float("nan")
    aucs = one_vs_rest_auc(truth, probabilities)
    present = [c for c in range(probabilities.shape[1]) if np.any(truth == c)]
    return float(np.nanmean(aucs[present]))


def _figures(truth: np.ndarray, probabilities: np.ndarray, n_classes: int) -> dict[str, float]:
    if not len(truth):
        return {"auc": float("nan"), "balanced_accuracy": float("nan")}
    cm = confusion_matrix(truth, probabilities.argmax(axis=1), n_classes)
    return {"auc": _auc(truth, probabilities), "balanced_accuracy": balanced_accuracy(cm)}


def head_figures(truth, probabilities, called, patients, seed: int) -> dict:
    """One head on one set (pure): AUC and balanced accuracy on all slides and on the ``called``
    ones, with patient-level bootstrap 95 % intervals (a resample keeps its called slides), and the
    coverage (fraction called) with its interval."""
    truth = np.asarray(truth, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    called = np.asarray(called, bool)
    k = probabilities.shape[1]

    def statistic(idx: np.ndarray) -> dict[str, float]:
        c = idx[called[idx]]
        every, covered = _figures(truth[idx], probabilities[idx], k), _figures(truth[c], probabilities[c], k)
        return {"auc": every["auc"], "balanced_accuracy": every["balanced_accuracy"], "coverage": float(called[idx].mean()),
                "covered_auc": covered["auc"], "covered_balanced_accuracy": covered["balanced_accuracy"]}

    point = statistic(np.arange(len(truth)))
    ci = bootstrap(list(patients), statistic, seed=seed)
    return {key: {"value": value, "ci": list(ci[key])} for key, value in point.items()} | {"slides": len(truth), "called": int(called.sum())}


def _gate_scores(gate, clf, normalization: str, tiles_by_slide: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Each slide's OOD score (the median of its tile scores, as the worker's gate)."""
    from glio_node.ood import slide_score, tile_scores
    from glio_node.runtime.keras_runner import with_features
    from training.ood import FEATURES_LAYER, tile_features

    sub = with_features(clf, FEATURES_LAYER)
    return {s: slide_score(tile_scores(gate.reference, tile_features(sub, t, normalization))) if len(t) else None
            for s, t in tiles_by_slide.items()}


def _is_out(gate, score: float | None) -> bool:
    from glio_node.ood import OodGate

    return OodGate(gate.spec.network, gate.reference, gate.spec.slide_threshold, gate.spec.slide_threshold_low).is_out(score)


def score_arm(cfg: RunConfig, clf, gate, chosen: dict, test_ids: tuple[str, ...], tiles: _Tiles, by_id) -> dict:
    """One arm's test figures on one stain of the test tiles (``tiles``): per head, gate off and on."""
    test = score_set(cfg, None, clf, test_ids, tiles, by_id)
    scores = _gate_scores(gate, clf, cfg.normalization, {s: tiles.classifier[s].images for s in test_ids})
    withheld = {s: _is_out(gate, scores[s]) for s in test_ids}
    out: dict = {"gate": {"withheld": sum(withheld.values()), "slides": len(test_ids),
                          "scores": {s: scores[s] for s in test_ids}, "withheld_slides": sorted(s for s, w in withheld.items() if w)}}
    for task in CLS_TASKS:
        if task not in test or task not in chosen:
            continue
        slides = test[task]["slide"]["slides"]
        ids = sorted(slides)
        truth = np.array([slides[s]["truth"] for s in ids])
        probs = calibrate(np.array([slides[s]["probabilities"] for s in ids], np.float64), chosen[task]["temperature"])
        above = probs.max(axis=1) >= chosen[task]["threshold"].threshold
        inside = np.array([not withheld[s] for s in ids])
        patients = [by_id[s].patient_id for s in ids]
        out[task] = {
            "gate_off": head_figures(truth, probs, above, patients, cfg.seed),
            "gate_on": head_figures(truth, probs, above & inside, patients, cfg.seed),
        }
    return out


def _shifted(tiles: _Tiles, slide_ids, drawn: DrawnShift) -> _Tiles:
    """``tiles`` with the classifier tiles of ``slide_ids`` re-stained as the drawn site would."""
    cl = dict(tiles.classifier)
    for s in slide_ids:
        cl[s] = replace(cl[s], images=apply_stain_shift(cl[s].images, drawn))
    return _Tiles(segmentation={}, classifier=cl)


def _stain_record(source: _Tiles, shifted: _Tiles, split) -> dict:
    """Per slide: its set, the stain its tiles had when the arms saw them, and their mean RGB."""
    out = {}
    for name, ids in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        for s in ids:
            seen = shifted.classifier[s].images if name == "test" else source.classifier[s].images
            out[s] = {"set": name, "stain": "shifted" if name == "test" else "source",
                      "mean_rgb": seen.reshape(-1, 3).mean(axis=0).round(3).tolist() if len(seen) else None}
    return out


def site_shift(config_path: Path, verbose: int = 0) -> dict:
    """Run the experiment of ``config_path``; return site-shift.json's content (also written to
    the run folder ``runs/<name>-site-shift-<stamp>/`` with site-shift.md)."""
    import keras

    from training.ood import fit_gate, write_report

    started = time.monotonic()
    ss = SiteShiftConfig.from_table(read_config(Path(config_path)).get("site_shift", {}))
    cfg, run_dir, commit, records = _start_run(config_path, kind="-site-shift")
    by_id = {r.slide_id: r for r in records}
    split = _splits(cfg, records, config_path)[cfg.split_fold]
    _write_split(run_dir, split)
    source = _load_tiles(cfg, records, segmentation=False)
    drawn = draw_shift(ss.stain)
    shifted = _shifted(source, split.test, drawn)
    # What the choosing steps get: the training and validation slides' tiles, nothing of the test patients.
    seen = {s: source.classifier[s] for s in (*split.train, *split.validation)}
    (run_dir / "stain-shift.json").write_text(json.dumps({"config": {"seed": ss.stain.seed, "rotation_deg": ss.stain.rotation_deg,
                                                                      "intensity": list(ss.stain.intensity)},
                                                           **drawn.record(), "slides": _stain_record(source, shifted, split)}, indent=2))
    timing = {"tiles_s": round(time.monotonic() - started, 1)}
    arms: dict = {}
    for arm in ss.arms:
        t0 = time.monotonic()
        acfg = replace(cfg, normalization=arm)
        arm_dir = run_dir / f"arm-{arm}"
        arm_dir.mkdir()
        keras.backend.clear_session()
        keras.utils.set_random_seed(cfg.seed)  # every arm starts from the same weights
        clf = train_classifier(acfg, split, seen, by_id, arm_dir, verbose)
        validation = score_set(acfg, None, clf, split.validation, _Tiles({}, seen), by_id)
        chosen = choose_calibration(cfg.calibration, validation)
        gate = fit_gate(clf, "molecular", arm, {s: sh.images for s, sh in seen.items()}, split.train, split.validation)
        write_report(arm_dir, gate.report)  # ood.json: the scores it was fitted on, training and validation slides
        arms[arm] = {
            "chosen_on": {
                "early_stopping_and_checkpoint": list(split.validation),
                "calibration": sorted(validation[CLS_TASKS[0]]["slide"]["slides"]) if CLS_TASKS[0] in validation else [],
                "ood_reference": list(split.train),
                "ood_thresholds": list(split.validation),
            },
            "calibration": {t: {"temperature": c["temperature"], "threshold": c["threshold"].threshold} for t, c in chosen.items()},
            "ood": {"slide_threshold": gate.spec.slide_threshold, "slide_threshold_low": gate.spec.slide_threshold_low},
            "test": {stain: score_arm(acfg, clf, gate, chosen, split.test, tiles, by_id)
                     for stain, tiles in (("shifted", shifted), ("source", source))},
        }
        timing[arm + "_s"] = round(time.monotonic() - t0, 1)
        if verbose:
            print(f"arm {ARM_NAMES[arm]}: {timing[arm + '_s']:.0f} s", flush=True)
    timing["total_s"] = round(time.monotonic() - started, 1)
    result = {
        "split": {"name": split.name, "train": list(split.train), "validation": list(split.validation), "test": list(split.test)},
        "sets": {name: {"patients": len({by_id[s].patient_id for s in ids}), "slides": len(ids)}
                 for name, ids in (("train", split.train), ("validation", split.validation), ("test", split.test))},
        "git": commit, "seed": cfg.seed, "timing": timing, "arms": arms,
    }
    (run_dir / "site-shift.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (run_dir / "site-shift.md").write_text(markdown(cfg, result, drawn))
    return result | {"run_dir": str(run_dir)}


def _cell(entry: dict) -> str:
    return _with_ci(entry["value"], entry["ci"])


def table_rows(result: dict) -> list[str]:
    """The markdown table: per arm, head and test stain, gate off then on (pure)."""
    lines = [
        "| normalisation | head | test stain | AUC, all slides | bal. acc., all slides | gate | coverage | AUC, called | bal. acc., called |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in result["arms"].items():
        for task in CLS_TASKS:
            for stain in STAINS:
                t = a["test"][stain]
                if task not in t:
                    continue
                for gate in ("gate_off", "gate_on"):
                    f = t[task][gate]
                    lines.append(
                        f"| {ARM_NAMES[arm]} | {task} | {stain} | {_cell(f['auc'])} | {_cell(f['balanced_accuracy'])} | "
                        f"{gate.removeprefix('gate_')} | {_cell(f['coverage'])} ({f['called']}/{f['slides']}) | "
                        f"{_cell(f['covered_auc'])} | {_cell(f['covered_balanced_accuracy'])} |"
                    )
    return lines


def markdown(cfg: RunConfig, result: dict, drawn: DrawnShift) -> str:
    """site-shift.md: the table and what each column means."""
    sets = result["sets"]
    gates = [f"{ARM_NAMES[arm]} {a['test']['shifted']['gate']['withheld']}/{a['test']['shifted']['gate']['slides']} shifted, "
             f"{a['test']['source']['gate']['withheld']}/{a['test']['source']['gate']['slides']} source"
             for arm, a in result["arms"].items()]
    return "\n".join([
        f"# Site shift: {cfg.name} {cfg.version}",
        "",
        (f"Trained on the source stain ({sets['train']['patients']} training, {sets['validation']['patients']} validation "
         f"patients), tested once on {sets['test']['patients']} test patients whose tiles were re-stained as a new site would "
         f"(stain vectors turned by {', '.join(f'{d:.1f}' for d in drawn.rotations_deg)} degrees, concentrations x "
         f"{', '.join(f'{k:.2f}' for k in drawn.intensities)}; haematoxylin, eosin) and, for reference, as they were. Early "
         "stopping, checkpoint, temperature, thresholds and the OOD gate were chosen on training and validation slides of the "
         "source stain only. A slide is called when its calibrated top probability reaches the head's threshold and, gate on, "
         "the gate does not withhold it; coverage is the fraction called, and the called slides' figures say what abstention "
         "recovers. AUC: macro one-vs-rest ROC AUC of the slide probabilities. Patient-level bootstrap 95 % intervals "
         f"(1000 resamples, seed {result['seed']}); small test set: wide intervals."),
        "",
        *table_rows(result),
        "",
        f"Slides the gate withheld: {'; '.join(gates)}.",
        f"Wall time {result['timing']['total_s']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in result['timing'].items() if k != 'total_s')}).",
        "",
    ])
