"""Market-style train / query / gallery split of the dev tar of real Market-1501 training crops.

The tar holds ``bounding_box_train/*.jpg`` (497 ids, 6 cameras).  Identities are split into
disjoint train and test sets; for each test id one image per camera goes to ``query/`` and the
rest to ``bounding_box_test/``.  The images are research-only: extract them to a local folder,
never into the repository.
"""

from __future__ import annotations

import json
import random
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

from common.data.readers import parse_market_name

SPLIT_VERSION = 1


def split_market_dev(tar_path: str | Path, out_dir: str | Path, test_fraction: float = 0.5,
                     seed: int = 0) -> Path:
    """Extract ``tar_path`` into a Market layout under ``out_dir`` (reused when already made)."""
    tar_path, out_dir = Path(tar_path), Path(out_dir)
    if not tar_path.is_file():
        raise FileNotFoundError(f"dev tar not found: {tar_path}")
    stamp = {"tar": tar_path.name, "size": tar_path.stat().st_size, "test_fraction": test_fraction,
             "seed": seed, "version": SPLIT_VERSION}
    marker = out_dir / "split.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")]
        by_pid: dict[int, list[tarfile.TarInfo]] = defaultdict(list)
        for member in members:
            by_pid[parse_market_name(Path(member.name).name)[0]].append(member)
        pids = sorted(p for p in by_pid if p > 0)
        test_ids = set(random.Random(seed).sample(pids, round(len(pids) * test_fraction)))
        for pid in pids:
            for folder, member in _assign(by_pid[pid], pid in test_ids):
                target = tmp / folder / Path(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
    (tmp / "split.json").write_text(json.dumps(stamp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _assign(members: list[tarfile.TarInfo], is_test: bool):
    """(folder, member) pairs: train ids → train; test ids → first image per camera to query."""
    if not is_test:
        return [("bounding_box_train", m) for m in members]
    seen: set[int] = set()
    assigned = []
    for member in sorted(members, key=lambda m: m.name):
        cam = parse_market_name(Path(member.name).name)[1]
        assigned.append(("bounding_box_test" if cam in seen else "query", member))
        seen.add(cam)
    return assigned
