"""Deployment helpers: one folder of images per camera, and SuperNode key registration.

``split_by_camera`` writes what each camera's container mounts (read-only): only that
camera's training images, in the dataset's own layout, so the camera's ClientApp reads it
with the same ``dataset`` setting; the server gets only the test split.  Files are hard
links where the file system allows, copies otherwise -- never symbolic links, whose
targets would lie outside the mounted folder.

``register_supernodes`` registers camera public keys with a SuperLink through the ``flwr``
CLI (``flwr supernode register``); a key that is already registered is not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from common.data.pose import PoseTable, load_pose_file, save_pose_file
from common.data.readers import read_market1501, read_msmt17
from common.data.records import ImageRecord, ReIDDataset

MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
MSMT_LISTS = ("list_train.txt", "list_query.txt", "list_gallery.txt")
POSE_FILE = "poses.npz"
CONNECTION = "camfed"


def camera_folder_name(camid: int) -> str:
    """Folder (and compose service suffix) of camera ``camid`` (1-based): ``camera-<camid>``."""
    return f"camera-{camid}"


def split_by_camera(dataset_root: str | Path, out_dir: str | Path, dataset: str = "market1501",
                    pose_file: str | Path = "") -> dict[str, Path]:
    """Write ``out_dir/camera-<c>/`` per camera and ``out_dir/server/``; return {folder name: path}.

    dataset: ``market1501`` or ``synthetic`` (Market layout) or ``msmt17`` (MSMT17 layout).
    A camera folder holds only that camera's training images (and its rows of the pose file,
    ``pose_file`` or ``<dataset_root>/poses.npz`` if present); ``server/`` holds query and
    gallery only.  Every folder is readable by ``common.data.readers`` on its own.

    Everything is checked first (``out_dir`` empty or absent and outside the dataset, the pose file
    readable), then written to a temporary folder beside ``out_dir`` that is renamed to ``out_dir`` at
    the end: a failure leaves nothing behind.
    """
    if dataset not in ("market1501", "synthetic", "msmt17"):
        raise ValueError(f"split-by-camera: unknown dataset '{dataset}'; expected market1501, synthetic or msmt17")
    data = read_msmt17(dataset_root) if dataset == "msmt17" else read_market1501(dataset_root, name=dataset)
    if not data.train:
        raise ValueError(f"split-by-camera: no training images under {data.root}")
    out_dir = Path(out_dir)
    _check_destination(out_dir, data.root)
    pose_path = Path(pose_file) if pose_file else data.root / POSE_FILE
    poses = load_pose_file(pose_path) if pose_file or pose_path.is_file() else None
    by_camera: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in data.train:
        by_camera[record.camid].append(record)
    writer = _write_msmt if dataset == "msmt17" else _write_market
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        for camid, records in sorted(by_camera.items()):
            writer(data, _new_folder(staging / camera_folder_name(camid)), records, [], [])
        writer(data, _new_folder(staging / "server"), [], data.query, data.gallery)
        if poses is not None:
            _split_poses(data, staging, by_camera, poses)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: out_dir / name for name in [*map(camera_folder_name, sorted(by_camera)), "server"]}


def _check_destination(out_dir: Path, dataset_root: Path) -> None:
    """``out_dir`` must be empty or absent, not under a file, and neither the dataset nor inside it."""
    out, root = out_dir.expanduser().resolve(), dataset_root.expanduser().resolve()
    if out == root or root in out.parents:
        raise ValueError(f"split-by-camera: --out {out_dir} is inside the dataset {dataset_root}; choose a folder "
                         "outside it")
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"split-by-camera: --out {out_dir}: {path} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"split-by-camera: {out_dir} exists and is not empty; remove it or choose another --out")


def _new_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def _place(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``, or copy it when linking is impossible (other device)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_market(data: ReIDDataset, folder: Path, train: list[ImageRecord], query: list[ImageRecord],
                  gallery: list[ImageRecord]) -> Path:
    for name in MARKET_FOLDERS:
        (folder / name).mkdir(exist_ok=True)
    for records in (train, query, gallery):
        for record in records:
            _place(Path(record.path), folder / data.relative(record))
    return folder


def _write_msmt(data: ReIDDataset, folder: Path, train: list[ImageRecord], query: list[ImageRecord],
                gallery: list[ImageRecord]) -> Path:
    """MSMT17 layout: list files ``<entry> <pid>`` relative to the image folders, which keep their names."""
    image_dirs = {split: _image_dir(data, recs) for split, recs in (("train", data.train), ("test", data.gallery))}
    for split in image_dirs.values():
        (folder / split).mkdir(exist_ok=True)
    for list_name, records in zip(MSMT_LISTS, (train, query, gallery)):
        lines = []
        for record in records:
            relative = Path(data.relative(record))
            _place(Path(record.path), folder / relative)
            lines.append(f"{Path(*relative.parts[1:]).as_posix()} {record.pid}\n")
        (folder / list_name).write_text("".join(lines))
    return folder


def _image_dir(data: ReIDDataset, records: list[ImageRecord]) -> str:
    """The top folder (``train``, ``mask_train_v2``, ...) holding ``records``."""
    tops = {Path(data.relative(r)).parts[0] for r in records}
    if len(tops) != 1:
        raise ValueError(f"split-by-camera: expected one image folder under {data.root}, found {sorted(tops)}")
    return tops.pop()


def _split_poses(data: ReIDDataset, out_dir: Path, by_camera: dict[int, list[ImageRecord]], table: PoseTable) -> None:
    """Give each camera folder under ``out_dir`` the pose-table rows of its own training images."""
    row_of = {str(f): i for i, f in enumerate(table.files)}
    for camid, records in by_camera.items():
        rows = [row_of[rel] for rel in map(data.relative, records) if rel in row_of]
        save_pose_file(out_dir / camera_folder_name(camid) / POSE_FILE,
                       PoseTable(table.files[rows], table.keypoints[rows], table.scores[rows]))


# ------------------------------------------------------------------------------ registration


def flwr_connection_toml(superlink: str, root_certificates: str | Path | None, name: str = CONNECTION) -> str:
    """``$FLWR_HOME/config.toml`` text whose one (default) SuperLink connection is ``name``.

    root_certificates: CA certificate (PEM) that signed the SuperLink's certificate; ``None``
    means an unencrypted connection (explicit opt-in to insecure mode).
    """
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{superlink}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    return "\n".join(lines) + "\n"


def register_supernodes(superlink: str, root_certificates: str | Path | None, public_keys: list[str | Path],
                        flwr: str = "flwr") -> dict[str, str]:
    """Register each OpenSSH EC public key with the SuperLink's Control API.

    Returns {key path: "registered <node id>" | "already registered"}; any other failure is a
    ``RuntimeError`` naming the key file and Flower's message.
    """
    results = {}
    with tempfile.TemporaryDirectory(prefix="camfed-flwr-home-") as home:
        Path(home, "config.toml").write_text(flwr_connection_toml(superlink, root_certificates))
        env = {**os.environ, "FLWR_HOME": home}
        for key in map(Path, public_keys):
            if not key.is_file():
                raise FileNotFoundError(f"register: public key file not found: {key}")
            proc = subprocess.run([flwr, "supernode", "register", str(key), CONNECTION, "--format", "json"],
                                  env=env, capture_output=True, text=True, timeout=120)
            results[str(key)] = _registration_result(key, proc)
    return results


def _registration_result(key: Path, proc: subprocess.CompletedProcess) -> str:
    try:
        reply = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise RuntimeError(f"register {key}: flwr exited {proc.returncode}: {output}") from None
    if reply.get("success"):
        return f"registered {reply['node-id']}"
    message = reply.get("error-message", "")
    if "already in use" in message:
        return "already registered"
    raise RuntimeError(f"register {key}: {message.strip()}")


def main(argv: list[str] | None = None) -> int:
    """``python -m common.deploy register --superlink HOST:PORT --root-certificates CA KEY.pub ...``"""
    parser = argparse.ArgumentParser(prog="python -m common.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="register SuperNode public keys with a SuperLink")
    reg.add_argument("--superlink", required=True, help="SuperLink address host:port")
    reg.add_argument("--root-certificates", help="CA certificate (PEM) of the SuperLink")
    reg.add_argument("--insecure", action="store_true", help="no TLS (explicit opt-in)")
    reg.add_argument("public_keys", nargs="+")
    args = parser.parse_args(argv)
    if bool(args.insecure) == bool(args.root_certificates):
        parser.error("give exactly one of --root-certificates and --insecure")
    try:
        results = register_supernodes(args.superlink, None if args.insecure else args.root_certificates,
                                      args.public_keys)
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as err:
        print(f"register: error: {err}", file=sys.stderr)
        return 1
    for key, status in results.items():
        print(f"{key}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
