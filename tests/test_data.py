from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.dataset import ImageDataset, PKSampler, UnreadableImageError, read_image
from common.data.partition import partition_by_camera, partition_table
from common.data.readers import parse_market_name, read_market1501, read_msmt17
from common.data.transforms import build_transforms
from conftest import require_shared_data


def _write(path: Path, size=(64, 128)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 60)).save(path)


def test_market_name_parsing():
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_market_name("-1_c3s2_000001_01.jpg") == (-1, 3)
    with pytest.raises(ValueError, match="abc.jpg"):
        parse_market_name("abc.jpg")


def test_market_reader_skips_junk_and_keeps_distractors_in_gallery_only(tmp_path):
    for name in ["0002_c1s1_000451_03.jpg", "0002_c2s1_000451_03.jpg", "0000_c1s1_000001_01.jpg",
                 "-1_c1s1_000002_01.jpg"]:
        _write(tmp_path / "bounding_box_train" / name)
        _write(tmp_path / "bounding_box_test" / name)
    _write(tmp_path / "query" / "0002_c1s1_000999_01.jpg")
    data = read_market1501(tmp_path)
    assert sorted((r.pid, r.camid) for r in data.train) == [(2, 1), (2, 2)]
    assert sorted((r.pid, r.camid) for r in data.gallery) == [(0, 1), (2, 1), (2, 2)]
    assert [(r.pid, r.camid) for r in data.query] == [(2, 1)]


def test_missing_market_folder_is_named(tmp_path):
    (tmp_path / "bounding_box_train").mkdir()
    with pytest.raises(FileNotFoundError, match="query"):
        read_market1501(tmp_path)


@pytest.mark.parametrize("version, train, test", [("MSMT17_V1", "train", "test"),
                                                  ("MSMT17_V2", "mask_train_v2", "mask_test_v2")])
def test_msmt17_layouts(tmp_path, version, train, test):
    base = tmp_path / version
    (base / train).mkdir(parents=True)
    (base / test).mkdir()
    (base / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n")
    (base / "list_val.txt").write_text("0001/0001_000_14_0303morning_0016_0.jpg 1\n")
    (base / "list_query.txt").write_text("0005/0005_001_07_0303noon_0001_0.jpg 5\n")
    (base / "list_gallery.txt").write_text("0005/0005_002_15_0303noon_0002_0.jpg 5\n")
    data = read_msmt17(tmp_path)
    assert [(r.pid, r.camid) for r in data.train] == [(0, 1), (1, 14)]
    assert data.query[0].camid == 7 and data.gallery[0].camid == 15
    assert data.train[0].path == str(base / train / "0000/0000_000_01_0303morning_0015_0.jpg")
    assert data.name.endswith("v2" if "V2" in version else "v1")


def test_msmt17_missing_list_and_bad_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="MSMT17"):
        read_msmt17(tmp_path)
    base = tmp_path / "MSMT17_V1"
    (base / "train").mkdir(parents=True)
    (base / "list_train.txt").write_text("garbage\n")
    with pytest.raises(ValueError, match="list_train.txt:1"):
        read_msmt17(tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "0001_c1s1_000001_01.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImageError, match="0001_c1s1_000001_01.jpg"):
        read_image(str(bad))
    with pytest.raises(UnreadableImageError, match="missing.jpg"):
        read_image(str(tmp_path / "missing.jpg"))


def test_partition_by_camera_relabels_per_client(tmp_path):
    for name in ["0003_c1s1_1_01.jpg", "0007_c1s1_2_01.jpg", "0007_c2s1_3_01.jpg", "0009_c2s1_4_01.jpg",
                 "0009_c2s1_5_01.jpg"]:
        _write(tmp_path / "bounding_box_train" / name)
    for folder in ("query", "bounding_box_test"):
        (tmp_path / folder).mkdir()
    parts = partition_by_camera(read_market1501(tmp_path).train)
    assert [p.camid for p in parts] == [1, 2]
    assert parts[0].labels == {3: 0, 7: 1} and parts[1].labels == {7: 0, 9: 1}
    assert {r.camid for r in parts[1].records} == {2} and len(parts[1].records) == 3
    table = partition_table(parts)
    assert "| 1 | 2 | 3 | 2 |" in table and "| all | - | 5 | 3 |" in table


def test_pk_sampler_batches_have_p_ids_times_k():
    pids = [0] * 9 + [1] * 2 + [2] * 5 + [3] * 4 + [4] * 1
    sampler = PKSampler(pids, batch_size=8, num_instances=4, seed=3)
    order = list(sampler)
    assert len(order) % 8 == 0 and len(order) > 0
    for start in range(0, len(order), 8):
        batch = [pids[i] for i in order[start:start + 8]]
        counts = {p: batch.count(p) for p in set(batch)}
        assert len(counts) == 2 and set(counts.values()) == {4}
    assert list(sampler) != order  # next epoch is reshuffled
    assert list(PKSampler(pids, 8, 4, seed=3)) == order  # deterministic per seed


def test_pk_sampler_with_fewer_ids_than_p():
    sampler = PKSampler([5, 5, 6], batch_size=16, num_instances=2, seed=0)
    order = list(sampler)
    assert sorted({[5, 5, 6][i] for i in order}) == [5, 6] and len(order) == 4


def test_transforms_shapes():
    image = Image.new("RGB", (64, 128), (10, 200, 30))
    for train in (True, False):
        out = build_transforms(96, 48, train=train)(image)
        assert out.shape == (3, 96, 48)
    dataset = ImageDataset([], build_transforms(32, 16, train=False))
    assert len(dataset) == 0


def test_dev_split_is_disjoint_and_market_shaped(tmp_path):
    (tar,) = require_shared_data("market1501-train-dev.tar")
    from common.data.market_dev import split_market_dev

    root = split_market_dev(tar, tmp_path / "dev")
    data = read_market1501(root)
    train_ids, test_ids = {r.pid for r in data.train}, {r.pid for r in data.gallery} | {r.pid for r in data.query}
    assert not train_ids & test_ids
    assert len(train_ids) + len(test_ids) == 497
    assert len(data.train) + len(data.query) + len(data.gallery) == 8425
    assert {r.camid for r in data.train} == set(range(1, 7))
    query_keys = [(r.pid, r.camid) for r in data.query]
    assert len(query_keys) == len(set(query_keys))  # one query per id and camera
    assert split_market_dev(tar, tmp_path / "dev") == root  # reused
    assert np.mean([r.pid in {g.pid for g in data.gallery} for r in data.query]) > 0.9
