"""``python -m training``: check a dataset, cut its tiles, show its patient splits, export to ONNX.

Run from a checkout (training/ is not installed with glio-node and glio_node never imports it).
``train --config run.toml`` trains, evaluates and exports a bundle (training/run.py); the demo
bundle models/glio-demo is ``train --config training/configs/glio-demo.toml``.  ``crossval
--config run.toml`` trains every fold of a k-fold or leave-one-patient-out split and summarises.
``export-onnx --bundle B --out DIR`` writes B's Keras networks as the ONNX networks of a new bundle
(``export-onnx --model M.keras --out M.onnx``: one Keras model, e.g. an encoder).  ``encoder``
trains our own small tile encoder (and the mean-of-tiles baseline); ``train-mil`` trains ABMIL
heads on an encoder's cached embeddings (training/mil_run.py, docs/training.md "Attention-MIL").
``fit-ood --bundle B --config C`` adds an out-of-distribution gate to B from C's split (training/ood.py);
``fit-ood --bundle B --mil-run RUN --dataset D`` adds one on a two-stage bundle's encoder from the run's split.
``site-shift --config C`` trains on the source stain and tests on a drawn new site's, per
normalisation, gate off and on (training/site_shift.py, docs/training.md "Site shift").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.dataset import validate_dataset
from training.splits import STRATIFY_CHOICES, make_splits


def _validate(args: argparse.Namespace) -> int:
    records, problems = validate_dataset(args.dataset, check_images=not args.quick)
    for p in problems:
        print(f"PROBLEM {p}")
    patients = {r.patient_id for r in records}
    print(f"{len(records)} slide(s) of {len(patients)} patient(s), {sum(r.mask_path is not None for r in records)} with a region mask; {len(problems)} problem(s)")
    return 1 if problems else 0


def _extract(args: argparse.Namespace) -> int:
    from training.dataset import load_dataset
    from training.tiles import TileSpec, load_or_extract

    spec = TileSpec(args.um_per_px, args.tile_size, args.min_tissue)
    cache = args.cache or args.dataset / ".tiles"
    for record in load_dataset(args.dataset):
        shard = load_or_extract(record, spec, args.dataset, cache)
        source = "cache" if shard.frames_decoded == 0 else f"{shard.frames_decoded} frames decoded"
        print(f"{record.slide_id}: {len(shard.images)} tiles ({source})")
    return 0


def _split(args: argparse.Namespace) -> int:
    records, problems = validate_dataset(args.dataset, check_images=False)
    if problems:
        print(f"the dataset has {len(problems)} problem(s); run `python -m training validate {args.dataset}`", file=sys.stderr)
        return 1
    try:
        splits = make_splits(records, args.method, args.seed, args.validation_fraction, args.k, args.test_fraction, args.stratify)
    except ValueError as exc:  # k above the number of patients, too few patients of a class for three sets
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split in splits:
        print(f"{split.name}: train {len(split.train)} slide(s), validation {' '.join(split.validation)}, test {' '.join(split.test)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.run import train

    metrics = train(args.config, verbose=_verbosity(args.verbose), model_card_dir=args.model_card_dir)
    test = metrics["test"]
    print(f"test set ({metrics['sets']['test']['patients']} patients, scored once; patient-level bootstrap 95 % intervals):")
    for task, m in test.items():
        if "mean_dice" in m:
            ci = m["ci"]
            print(f"{task}: pixel accuracy {_with_ci(m['accuracy'], ci['accuracy'])}, mean Dice {_with_ci(m['mean_dice'], ci['mean_dice'])}, MCC {_with_ci(m['mcc'], ci['mcc'])}")
        else:
            print(f"{task}: tile accuracy {_with_ci(m['tile']['accuracy'], m['tile']['ci']['accuracy'])}, slide accuracy {_with_ci(m['slide']['accuracy'], m['slide']['ci']['accuracy'])}")
    calibration = metrics.get("calibration", {})
    for task, c in calibration.items():
        if not isinstance(c, dict) or "temperature" not in c:
            continue
        te = c.get("test", {})
        print(
            f"{task}: temperature {c['temperature']:.3f} and threshold {c['threshold']['value']:.3f} chosen on validation; "
            f"test ECE {te.get('ece_before', float('nan')):.3f} -> {te.get('ece_after', float('nan')):.3f}, "
            f"coverage {te.get('coverage', float('nan')):.2f}"
        )
    return 0


def _with_ci(value: float, ci: list) -> str:
    from training.run import _with_ci as fmt

    return fmt(value, ci)


def _crossval(args: argparse.Namespace) -> int:
    from training.run import crossval

    summary = crossval(args.config, verbose=_verbosity(args.verbose))
    for key, st in summary["metrics"].items():
        sd = "" if st["sd"] is None else f" ± {st['sd']:.3f}"
        print(f"{key}: {st['mean']:.3f}{sd} over {st['n']} fold(s)")
    print("(test figures: each fold scored on its outer fold; cv-summary.md has the pooled figures with intervals)")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from glio_node.bundle import sha256_file
    from training.onnx_export import export_bundle, export_keras_file

    if (args.bundle is None) == (args.model is None):
        print("error: give either --bundle (a Keras bundle) or --model (one .keras file)", file=sys.stderr)
        return 2
    if args.model is not None:
        out, inputs, outputs = export_keras_file(args.model, args.out)
        print(f"wrote {out} ({out.stat().st_size} bytes, sha256 {sha256_file(out)}): inputs {inputs}, outputs {outputs}")
        return 0
    manifest = export_bundle(args.bundle, args.out, args.name)
    for n in manifest.networks:
        print(f"{n.name}: {args.out / n.file} ({(args.out / n.file).stat().st_size} bytes, sha256 {n.sha256[:12]}…)")
    print(f"wrote bundle {manifest.name} {manifest.version} (format {manifest.format}) to {args.out}")
    return 0


def _fit_ood(args: argparse.Namespace) -> int:
    from training.ood import add_to_bundle, add_to_mil_bundle

    if (args.config is None) == (args.mil_run is None) or (args.mil_run is not None) != (args.dataset is not None):
        print("error: give --config (a bundle trained by `train`) or --mil-run and --dataset (a two-stage bundle "
              "written by `train-mil`)", file=sys.stderr)
        return 2
    try:
        if args.mil_run is not None:
            manifest, report = add_to_mil_bundle(args.bundle, args.mil_run, args.dataset, args.cache)
        else:
            manifest, report = add_to_bundle(args.bundle, args.config)
    except ValueError as exc:  # no encoder, another run's encoder, a missing metrics.json
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"fitted the OOD gate of {manifest.name} {manifest.version} on network {manifest.ood.network!r} "
        f"({report['components']} of {report['dimensions']} components): in distribution from "
        f"{manifest.ood.slide_threshold_low:.3f} to {manifest.ood.slide_threshold:.3f} "
        f"({report['rule']}; {manifest.ood.validation_slides} validation slides; test patients unused)"
    )
    print(f"reference slides (training): {', '.join(report['reference_slides'])}")
    print(f"threshold slides (validation): {', '.join(report['threshold_slides'])}")
    return 0


def _site_shift(args: argparse.Namespace) -> int:
    from training.site_shift import site_shift

    result = site_shift(args.config, verbose=args.verbose or 0)
    print(f"wrote {result['run_dir']}/site-shift.md and site-shift.json ({result['sets']['test']['patients']} test patients, "
          f"{len(result['arms'])} arm(s), {result['timing']['total_s']:.0f} s)")
    return 0


def _tile_spec(args: argparse.Namespace):
    from training.tiles import TileSpec

    return TileSpec(args.um_per_px, args.tile_size, args.min_tissue)


def _split_config(args: argparse.Namespace):
    from training.mil_run import SplitConfig

    return SplitConfig(args.seed, args.validation_fraction, args.test_fraction, args.stratify or args.task[0])


def _encoder(args: argparse.Namespace) -> int:
    from training.mil_run import build_encoder

    try:
        r = build_encoder(args.dataset, args.out, args.task[0], _tile_spec(args), _split_config(args), epochs=args.epochs,
                          verbose=_verbosity(args.verbose))
    except ValueError as exc:  # a slide without the task's label, a split the dataset cannot give
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = r["test"]
    print(f"wrote {args.out / 'encoder.keras'} ({r['embed_dim']}-d embeddings) and {args.out / 'tile-classifier.keras'}")
    print(f"baseline (mean of tile probabilities) on {t['patients']} test patients: ROC AUC {_with_ci(t['roc_auc'], t['roc_auc_ci'])}")
    return 0


def _train_mil(args: argparse.Namespace) -> int:
    from training.mil import MilConfig
    from training.mil_run import train_mil

    if (args.licence is None) != (args.source is None):
        print("error: give both --licence and --source for an encoder we did not make, or neither", file=sys.stderr)
        return 2
    if args.bundle is None and (args.licence or args.source):
        print("error: --licence and --source go with --bundle (they are stored in it)", file=sys.stderr)
        return 2
    config = MilConfig(bag_size=args.bag_size, epochs=args.epochs, patience=args.patience, seed=args.seed)
    try:
        m = train_mil(args.dataset, args.encoder, tuple(args.task), args.run_dir, _tile_spec(args), args.cache,
                      _split_config(args), config, args.normalization, verbose=bool(args.verbose), ood=not args.no_ood)
    except (ValueError, FileNotFoundError) as exc:  # no such encoder, a slide without a label or tissue, a bad split
        print(f"error: {exc}", file=sys.stderr)
        return 2
    x = m["extraction"]
    print(f"embeddings: {x['slides_encoded']} slide(s) encoded ({x['frames_decoded']} frames decoded, "
          f"{x['encoder_calls']} encoder calls), {x['slides_cached']} from the cache")
    for task, t in m["tasks"].items():
        test = t["test"]
        auc = f", ROC AUC {_with_ci(test['roc_auc'], test['roc_auc_ci'])}" if "roc_auc" in test else ""
        print(f"{task}: ABMIL head (best epoch {t['best_epoch']}) on {test['patients']} test patients: "
              f"accuracy {_with_ci(test['accuracy'], test['ci']['accuracy'])}{auc}")
    if "ood" in m:
        g = m["ood"]
        print(f"OOD gate on the encoder's embeddings: in distribution from {g['slide_threshold_low']:.3f} to "
              f"{g['slide_threshold']:.3f} ({args.run_dir / 'ood.json'}; test patients unused)")
        print(f"reference slides (training): {', '.join(g['reference_slides'])}")
        print(f"threshold slides (validation): {', '.join(g['threshold_slides'])}")
    if args.bundle is not None:
        from training.mil_bundle import write_mil_bundle

        manifest = write_mil_bundle(args.bundle, args.run_dir, m, name=args.name or args.bundle.name,
                                    segmentation_from=args.segmentation_from, licence=args.licence, source=args.source,
                                    licence_name=args.licence_name)
        print(f"wrote bundle {manifest.name} {manifest.version} (format {manifest.format}) to {args.bundle}")
    return 0


def _mil_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--task", action="append", choices=["mgmt", "egfr", "subtype"], required=True,
                   help="slide-level task (repeat for several); the first also stratifies the split")
    p.add_argument("--um-per-px", type=float, default=1.0, help="tile spacing (default 1.0)")
    p.add_argument("--tile-size", type=int, default=32, help="tile edge, px (default 32)")
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation-fraction", type=float, default=0.25)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--stratify", choices=STRATIFY_CHOICES, default=None, help="default: the first --task")


def _verbosity(asked: int | None) -> int:
    """Keras' progress bar on a terminal, one line per epoch in a log file (a bar redraws itself
    with carriage returns that make a log unreadable)."""
    if asked is not None:
        return asked
    return 1 if sys.stdout.isatty() else 2


def _synthetic(args: argparse.Namespace) -> int:
    from training.synthetic_dataset import SyntheticParameters, write_synthetic_dataset

    params = SyntheticParameters(patients=args.patients, seed=args.seed, width_px=args.width_px, height_px=args.height_px,
                                 variety=args.variety, minority_fraction=args.minority_fraction)
    write_synthetic_dataset(args.dataset, params=params)
    print(f"wrote {args.patients} synthetic patient(s) to {args.dataset} (synthetic textures, not tissue)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="report every problem in a dataset folder (docs/training.md)")
    v.add_argument("dataset", type=Path)
    v.add_argument("--quick", action="store_true", help="check labels.csv and file names only, open no image")
    v.set_defaults(func=_validate)
    e = sub.add_parser("extract", help="cut and cache tiles at a network's spacing")
    e.add_argument("dataset", type=Path)
    e.add_argument("--um-per-px", type=float, required=True)
    e.add_argument("--tile-size", type=int, required=True)
    e.add_argument("--min-tissue", type=float, default=0.5, help="fraction of the tile that must be tissue (0.5 classifiers, 0 segmentation)")
    e.add_argument("--cache", type=Path, default=None, help="shard folder (default DATASET/.tiles)")
    e.set_defaults(func=_extract)
    s = sub.add_parser("split", help="show the patient-level splits")
    s.add_argument("dataset", type=Path)
    s.add_argument("--method", choices=["fixed", "kfold", "lopo"], default="fixed")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--validation-fraction", type=float, default=0.25, help="of the patients left after the test set (default 0.25)")
    s.add_argument("--test-fraction", type=float, default=0.2, help="fixed split: of all patients (default 0.2)")
    s.add_argument("--stratify", choices=STRATIFY_CHOICES, default="subtype", help="every class of this task in every set (default subtype)")
    s.add_argument("--k", type=int, default=5)
    s.set_defaults(func=_split)
    t = sub.add_parser("train", help="train, evaluate and export a bundle as a run config says")
    t.add_argument("--config", type=Path, required=True)
    verbose_help = "0 silent, 1 progress bar per epoch, 2 one line per epoch (default: 1 on a terminal, 2 otherwise)"
    t.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None, help=verbose_help)
    t.add_argument("--model-card-dir", type=Path, default=None, help="also write NAME.md and its plots here, e.g. docs/model-cards")
    t.set_defaults(func=_train)
    c = sub.add_parser("crossval", help="train and score every fold of a kfold or lopo split (no bundle); cv-summary.json/.md")
    c.add_argument("--config", type=Path, required=True)
    c.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None, help=verbose_help)
    c.set_defaults(func=_crossval)
    x = sub.add_parser("export-onnx", help="write a new bundle with a bundle's Keras networks as ONNX networks")
    x.add_argument("--bundle", type=Path, default=None, help="the Keras bundle, e.g. models/glio-demo")
    x.add_argument("--model", type=Path, default=None, help="or one .keras model (an encoder): --out is then the .onnx file")
    x.add_argument("--out", type=Path, required=True, help="folder of the new bundle, e.g. models/glio-demo-onnx (or the .onnx file)")
    x.add_argument("--name", default=None, help="the new bundle's name (default: the source's name + '-onnx')")
    x.set_defaults(func=_export_onnx)
    o = sub.add_parser("fit-ood", help="add an out-of-distribution gate to an existing bundle from its config's training/validation patients")
    o.add_argument("--bundle", type=Path, required=True, help="the bundle folder, rewritten in place, e.g. models/glio-demo")
    o.add_argument("--config", type=Path, default=None, help="the run config the bundle was trained with (`train` bundles)")
    o.add_argument("--mil-run", type=Path, default=None,
                   help="two-stage bundles: the train-mil run folder that trained its heads (its split and tile geometry)")
    o.add_argument("--dataset", type=Path, default=None, help="with --mil-run: the dataset the run was trained on")
    o.add_argument("--cache", type=Path, default=None, help="with --mil-run: the embedding cache (default DATASET/.embeddings)")
    o.set_defaults(func=_fit_ood)
    ss = sub.add_parser("site-shift", help="train per normalisation on the source stain, test on a drawn new site's stain, OOD gate off and on")
    ss.add_argument("--config", type=Path, required=True, help="a run config with a [site_shift] table, e.g. training/configs/site-shift.toml")
    ss.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None, help="Keras output while training (default 0)")
    ss.set_defaults(func=_site_shift)
    y = sub.add_parser("synthetic", help="write a synthetic dataset in the documented format (tests, examples)")
    y.add_argument("dataset", type=Path)
    y.add_argument("--patients", type=int, default=32)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--width-px", type=int, default=1024, help="slide width at 0.5 µm/px (default 1024)")
    y.add_argument("--height-px", type=int, default=768, help="slide height at 0.5 µm/px (default 768)")
    y.add_argument("--variety", action="store_true", help="vary spacing, pyramid, compression and blob size per slide as sites' scans do (the demo bundle's dataset)")
    y.add_argument("--minority-fraction", type=float, default=1.0,
                   help="< 1: MGMT and EGFR show only in blobs covering this fraction of the tissue (attention-MIL task)")
    y.set_defaults(func=_synthetic)
    en = sub.add_parser("encoder", help="train our small tile encoder (a tile classifier on slide labels, truncated) and its mean-of-tiles baseline")
    _mil_arguments(en)
    en.add_argument("--out", type=Path, required=True, help="folder for encoder.keras, tile-classifier.keras, baseline.json")
    en.add_argument("--epochs", type=int, default=10)
    en.add_argument("--verbose", type=int, choices=[0, 1, 2], default=None, help=verbose_help)
    en.set_defaults(func=_encoder)
    m = sub.add_parser("train-mil", help="embed every slide once (cached) with an encoder, train ABMIL heads, score the test set once")
    _mil_arguments(m)
    m.add_argument("--encoder", type=Path, required=True, help="the tile encoder, .keras or .onnx")
    m.add_argument("--normalization", default="scale_0_1", help="the encoder's input normalisation (glio_node.bundle.normalize)")
    m.add_argument("--run-dir", type=Path, required=True, help="heads, attention of the test slides, metrics.json")
    m.add_argument("--cache", type=Path, default=None, help="embedding cache (default DATASET/.embeddings)")
    m.add_argument("--bundle", type=Path, default=None, help="also write a format-2 bundle of the encoder and the heads here")
    m.add_argument("--name", default=None, help="the bundle's name (default: its folder's name)")
    m.add_argument("--segmentation-from", type=Path, default=None,
                   help="also copy this bundle's segmentation network into --bundle (optional: without it, no SEG), e.g. models/glio-demo")
    m.add_argument("--licence", type=Path, default=None, help="an encoder we did not make: its licence text, stored in --bundle")
    m.add_argument("--source", default=None, help="an encoder we did not make: maker, version, how and when obtained")
    m.add_argument("--licence-name", default=None, help="short licence name for outputs (default: the licence's first line)")
    m.add_argument("--no-ood", action="store_true",
                   help="fit no out-of-distribution gate (default: one on the encoder's embeddings, thresholds on validation slides)")
    m.add_argument("--bag-size", type=int, default=64)
    m.add_argument("--epochs", type=int, default=40)
    m.add_argument("--patience", type=int, default=8)
    m.add_argument("--verbose", type=int, choices=[0, 1], default=0)
    m.set_defaults(func=_train_mil)
    args = parser.parse_args(argv)
    from glio_node.errors import GlioError
    from training.dataset import DatasetError
    from training.errors import ConfigError

    try:
        return args.func(args)
    except (DatasetError, ConfigError, GlioError) as exc:
        # The operator's mistake or bad input, with what to fix: the message, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
