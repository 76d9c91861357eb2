"""Federated-by-camera partition: client c holds exactly the training images of one camera."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from common.data.dataset import relabel
from common.data.records import ImageRecord


@dataclass
class CameraPartition:
    """One client's data: ``camid`` (1-based), its training ``records`` and per-client ``labels`` (pid → 0..C-1)."""

    camid: int
    records: list[ImageRecord]
    labels: dict[int, int]

    @property
    def num_ids(self) -> int:
        return len(self.labels)


def partition_by_camera(train: list[ImageRecord]) -> list[CameraPartition]:
    """One partition per camera, sorted by camera id; ids relabelled per client."""
    by_camera: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in train:
        by_camera[record.camid].append(record)
    return [CameraPartition(cam, recs, relabel(recs)) for cam, recs in sorted(by_camera.items())]


def partition_table(partitions: list[CameraPartition]) -> str:
    """Markdown table of images and identities per camera."""
    rows = ["| client | camera | images | ids |", "|---:|---:|---:|---:|"]
    rows += [f"| {i} | {p.camid} | {len(p.records)} | {p.num_ids} |" for i, p in enumerate(partitions)]
    total_ids = len({r.pid for p in partitions for r in p.records})
    rows.append(f"| all | - | {sum(len(p.records) for p in partitions)} | {total_ids} |")
    return "\n".join(rows)
