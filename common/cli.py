"""The ``camfed`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import ConfigError, load_config, parse_run_config
from common.rundir import CHECKPOINT

RUN_CONFIG_HELP = ("a TOML file or \"key=value ...\" pairs with the run-config keys "
                   "(e.g. \"backbone='resnet18' epochs=1\")")


def _cmd_synth(args) -> None:
    from common.data.synthetic import generate_synthetic

    root = generate_synthetic(Path(args.out), num_ids=args.ids, num_cameras=args.cameras, seed=args.seed,
                              height=args.height, width=args.width, pose_band=args.pose_band, clothes=args.clothes)
    _print_partition(root, "synthetic")


def _print_partition(root: Path, dataset_name: str) -> None:
    from common.data.partition import partition_by_camera, partition_table
    from common.data.readers import read_dataset

    dataset = read_dataset(dataset_name, root)
    print(f"{root}: {len(dataset.train)} train, {len(dataset.query)} query, {len(dataset.gallery)} gallery")
    print(partition_table(partition_by_camera(dataset.train)))


def _cmd_split_dev(args) -> None:
    from common.data.market_dev import split_market_dev

    root = split_market_dev(args.tar, args.out, test_fraction=args.test_fraction, seed=args.seed)
    _print_partition(root, "market1501")


def _cmd_partition(args) -> None:
    from common.data.loading import load_dataset
    from common.data.partition import partition_by_camera, partition_table

    dataset = load_dataset(load_config(args.run_config))
    print(partition_table(partition_by_camera(dataset.train)))


def _cmd_split_by_camera(args) -> None:
    from common.deploy import split_by_camera

    for name, folder in split_by_camera(args.root, args.out, args.dataset, args.pose_file).items():
        print(f"{name}: {folder}")


def _cmd_federate(args) -> int:
    from common.federated.launch import run_from_args

    return run_from_args(args)


def _cmd_experiment(args) -> int:
    from common.experiment import run_from_args

    return run_from_args(args)


def _cmd_train_centralized(args) -> None:
    from common.centralized import train_centralized

    train_centralized(load_config(args.run_config))


def _cmd_pose(args) -> None:
    from common.pose_extract import DEFAULT_POSE_MODEL, extract_poses

    table = extract_poses(Path(args.data), Path(args.out), pose_model=args.pose_model or DEFAULT_POSE_MODEL,
                          device=args.device,
                          input_size=tuple(args.input_size))
    print(f"{len(table)} images -> {args.out}")


def _cmd_evaluate(args) -> None:
    from common.pipeline import evaluate_checkpoint

    evaluate_checkpoint(Path(args.checkpoint) if args.checkpoint else None, parse_run_config(args.run_config),
                        post=args.post, output_dir=Path(args.output) if args.output else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camfed", description="Federated-by-camera person re-identification")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="generate a synthetic multi-camera ReID dataset (Market layout; LTCC "
                                         "layout with --clothes >= 2)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--ids", type=int, default=48)
    synth.add_argument("--cameras", type=int, default=4)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--height", type=int, default=128)
    synth.add_argument("--width", type=int, default=64)
    synth.add_argument("--pose-band", type=float, default=1.0,
                       help="widen every camera's pose band by this factor (viewpoint and gait spread)")
    synth.add_argument("--clothes", type=int, default=1,
                       help="outfits per identity (config key synth-clothes): >= 2 changes clothes between cameras "
                            "and writes the LTCC layout with clothes ids (docs/cloth-changing.md)")
    synth.set_defaults(func=_cmd_synth)

    dev = sub.add_parser("split-dev", help="make a Market-style train/query/gallery split of the dev tar")
    dev.add_argument("--tar", default="../shared/data/market1501-train-dev.tar",
                     help="tar of Market-1501 crops under bounding_box_train/ (README: the dev Market split)")
    dev.add_argument("--out", required=True)
    dev.add_argument("--seed", type=int, default=0)
    dev.add_argument("--test-fraction", type=float, default=0.5, help="share of identities in query/gallery")
    dev.set_defaults(func=_cmd_split_dev)

    part = sub.add_parser("partition", help="print images and ids per camera (one federated client each)")
    part.add_argument("--run-config", default="", help=RUN_CONFIG_HELP)
    part.set_defaults(func=_cmd_partition)

    split = sub.add_parser("split-by-camera", help="one folder per camera (+ server/ test split) for mounting")
    split.add_argument("--dataset", choices=("market1501", "synthetic", "msmt17"), default="market1501")
    split.add_argument("--root", required=True, help="dataset root")
    split.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    split.add_argument("--pose-file", default="", help="pose file whose rows go with each camera's folder")
    split.set_defaults(func=_cmd_split_by_camera)

    federate = sub.add_parser("federate", help="run the Flower app in a local simulation, one client per camera")
    from common.federated.launch import add_arguments

    add_arguments(federate)
    federate.set_defaults(func=_cmd_federate)

    experiment = sub.add_parser(
        "experiment", help="a grid of runs (methods x seeds) on identical partitions, with paired statistics",
        description="Run every method with every seed on the same cameras (the base --run-config), resumable "
                    "run by run, and write DIR/experiment.{md,json,png}: per run mAP / rank-1 / mINP, per "
                    "method mean ± 95% CI, and the paired difference to fedavg per seed.")
    experiment.add_argument("--run-config", default="", help=RUN_CONFIG_HELP + " (shared by every run)")
    experiment.add_argument("--methods", default="fedavg,pem,centralized",
                            help="comma-separated: centralized, fedavg, fedprox, moon, pem, pem-baseline, pem-pkd, "
                                 "pem-scm, pem-pkd+scm, pem-nomask, pem-hard, or a name given with --method "
                                 "(a name centralized-<x> trains centralized with its overrides)")
    experiment.add_argument("--method", action="append", metavar="NAME=\"key=value ...\"",
                            help="define a method by its run-config overrides (repeatable)")
    experiment.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (paired across methods)")
    experiment.add_argument("--out", required=True, help="the experiment folder (runs, tables, plot)")
    experiment.set_defaults(func=_cmd_experiment)

    central = sub.add_parser("train-centralized", help="train on all cameras together (upper bound)")
    central.add_argument("--run-config", default="", help=RUN_CONFIG_HELP)
    central.set_defaults(func=_cmd_train_centralized)

    pose = sub.add_parser("pose", help="keypoints of every crop with rtmlib's RTMPose (interchange .npz)")
    pose.add_argument("--data", required=True, help="dataset root (every image under it)")
    pose.add_argument("--out", required=True, help="output .npz; <out>.partial.npz keeps progress for resuming")
    pose.add_argument("--pose-model", default=None,
                      help="RTMPose ONNX: a local path or a URL (default: rtmlib's RTMPose-m body7; needs internet)")
    pose.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (onnxruntime provider)")
    pose.add_argument("--input-size", type=int, nargs=2, default=(192, 256), metavar=("W", "H"))
    pose.set_defaults(func=_cmd_pose)

    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint, optionally with post-processing")
    evaluate.add_argument("--checkpoint", default="",
                          help="a camfed checkpoint (default: the config's model untrained, "
                               "e.g. pretrained='imagenet')")
    evaluate.add_argument("--run-config", default="", help=RUN_CONFIG_HELP)
    evaluate.add_argument("--post", default=None, help="comma-separated steps in order: flip,nfc,ipg,rerank")
    evaluate.add_argument("--output", default="", help="report folder (default: <output-dir>/evaluation)")
    evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, OSError, ValueError, RuntimeError, TimeoutError) as err:
        print(f"camfed {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"camfed {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    """``; checkpoint at …`` advice for a command interrupted while writing a run (empty for other commands)."""
    if args.command not in ("train-centralized", "federate"):
        return ""
    try:
        output_dir = Path(load_config(args.run_config).output_dir if args.command == "train-centralized"
                          else _federation_output_dir(args))
    except (ConfigError, OSError):
        return ""
    checkpoint = output_dir / CHECKPOINT
    return f"; checkpoint at {checkpoint} - resume with resume=true" if checkpoint.is_file() else ""


def _federation_output_dir(args) -> str:
    from common.federated.launch import app_config

    return str(app_config(Path(args.app).expanduser().resolve(), args.run_config).output_dir)


if __name__ == "__main__":
    sys.exit(main())
