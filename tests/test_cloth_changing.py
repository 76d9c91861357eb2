"""Cloth-changing test bed: LTCC / PRCC readers on tiny fixtures in their layouts, the evaluation protocols
(hand-computed case, loop reference, PRCC's split), synthetic outfits (``synth-clothes``) and the reports."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluation import assert_same, random_ids, reference

from common.cli import main
from common.config import Config, ConfigError, load_config
from common.data import synthetic
from common.data.loading import DATASET_FIELDS, check_dataset, dataset_root, load_dataset
from common.data.readers import parse_ltcc_name, read_dataset, read_ltcc, read_prcc
from common.data.records import clothes_ids
from common.data.synthetic import (
    generate_synthetic,
    plan,
    render_spec,
    sample_person,
    synthetic_dir_name,
    visible_traits,
    wear_outfit,
)
from common.engine import evaluate_model
from common.evaluation import count_valid_queries, evaluate_features, evaluate_rank
from common.models.reid import build_model
from common.pipeline import SplitFeatures, _metrics
from conftest import TINY_SETTINGS


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), (90, 40, 10)).save(path)


def _triples(records) -> list[tuple[int, int, int]]:
    return [(r.pid, r.camid, r.clothes) for r in records]


# ----------------------------------------------------------------------------- readers


LTCC_FILES = {"train": ["001_1_c1_000100.png", "001_2_c3_000200.png", "002_1_c2_000300.png"],
              "query": ["003_1_c1_000400.png"],
              "test": ["003_2_c2_000500.png", "003_1_c4_000600.png", "012_3_c11_000700.png"]}


def test_ltcc_reader_reads_pid_camera_and_clothes(tmp_path):
    for folder, names in LTCC_FILES.items():
        for name in names:
            _image(tmp_path / "LTCC_ReID" / folder / name)
    (tmp_path / "LTCC_ReID" / "train" / "readme.txt").write_text("not an image")
    data = read_ltcc(tmp_path)  # the parent of LTCC_ReID/ is found too
    assert data.root == tmp_path / "LTCC_ReID"
    assert _triples(data.train) == [(1, 1, 1), (1, 3, 2), (2, 2, 1)]
    assert _triples(data.query) == [(3, 1, 1)]
    assert _triples(data.gallery) == [(3, 4, 1), (3, 2, 2), (12, 11, 3)]  # sorted by file name
    assert data.query[0].path == str(tmp_path / "LTCC_ReID" / "query" / "003_1_c1_000400.png")
    assert read_dataset("ltcc", tmp_path / "LTCC_ReID").gallery == data.gallery
    assert parse_ltcc_name("094_1_c9_015923.png") == (94, 9, 1)  # (pid, camera, clothes)


def test_ltcc_reader_names_a_file_that_is_not_ltcc(tmp_path):
    for folder in ("train", "query", "test"):
        (tmp_path / folder).mkdir()
    _image(tmp_path / "train" / "0001_c1s1_000151_01.png")  # a Market name
    with pytest.raises(ValueError, match="not an LTCC file name.*0001_c1s1_000151_01.png"):
        read_ltcc(tmp_path)


def _prcc_fixture(root: Path) -> Path:
    """Train ids 1 (cameras A, B, C) and 2 (A, C); test ids 10 and 11: two images in A, one in B, one in C."""
    rgb = root / "prcc" / "rgb"
    for pid, cameras in (("001", "ABC"), ("002", "AC")):
        for n, camera in enumerate(cameras):
            _image(rgb / "train" / pid / f"{camera}_cropped_rgb{n:03d}.jpg")
    _image(rgb / "val" / "003" / "A_cropped_rgb000.jpg")
    for pid in ("010", "011"):
        for camera, count in (("A", 2), ("B", 1), ("C", 1)):
            for n in range(count):
                _image(rgb / "test" / camera / pid / f"cropped_rgb{n:03d}.jpg")
    return root / "prcc"


def test_prcc_reader_gallery_a_query_b_and_c(tmp_path):
    data = read_prcc(_prcc_fixture(tmp_path).parent)  # the parent of prcc/ is found too
    assert data.root == tmp_path / "prcc"
    assert _triples(data.train) == [(1, 1, 1), (1, 2, 1), (1, 3, 2), (2, 1, 1), (2, 3, 2)]  # val is not read
    assert _triples(data.gallery) == [(10, 1, 1), (10, 1, 1), (11, 1, 1), (11, 1, 1)]
    assert _triples(data.query) == [(10, 2, 1), (11, 2, 1), (10, 3, 2), (11, 3, 2)]  # B, then C
    assert read_dataset("prcc", data.root).query == data.query


def test_prcc_reader_names_a_file_of_an_unknown_camera(tmp_path):
    root = _prcc_fixture(tmp_path)
    _image(root / "rgb" / "train" / "001" / "D_cropped_rgb009.jpg")
    with pytest.raises(ValueError, match="D_cropped_rgb009.jpg: camera 'D'"):
        read_prcc(root)


# ----------------------------------------------------------------------------- protocols


def test_hand_computed_protocols():
    # q0: pid 1, cam 1, clothes 1.  Gallery by ascending distance:
    #   g0 pid1 cam1 cl1 (same camera: dropped by every protocol)
    #   g1 pid1 cam2 cl1 (standard: hit; cloth-changing: dropped, same clothes; same-clothes: hit)
    #   g2 pid2 cam2 cl1 (false)
    #   g3 pid1 cam3 cl2 (standard: hit; cloth-changing: hit; same-clothes: dropped, other clothes)
    #   g4 pid3 cam1 cl2 (false)
    #   g5 pid1 cam1 cl2 (same camera: dropped)
    #   standard g1* g2 g3* g4 -> AP (1/1 + 2/3)/2 = 5/6, rank-1 hit; cloth-changing g2 g3* g4 -> AP 1/2, hit at 2;
    #   same-clothes g1* g2 g4 -> AP 1.
    # q1: pid 2, cam 1, clothes 1; its only match g2 (cam 2, clothes 1) comes third after g4 and g3:
    #   standard and same-clothes AP 1/3, no rank-1 hit; cloth-changing: no true match, the query is skipped.
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.5, 0.4, 0.3, 0.2, 0.1, 0.6]], dtype=np.float32)
    ids = ([1, 2], [1, 1, 2, 1, 3, 1], [1, 1], [1, 2, 2, 3, 1, 1])
    clothes = {"q_clothes": [1, 1], "g_clothes": [1, 1, 1, 2, 2, 2]}
    expected = {"standard": (2, 7 / 12, [0.5, 0.5, 1.0]), "cloth-changing": (1, 1 / 2, [0.0, 1.0, 1.0]),
                "same-clothes": (2, 2 / 3, [0.5, 0.5, 1.0])}
    for protocol, (valid, mean_ap, cmc) in expected.items():
        out = evaluate_rank(dist, *ids, max_rank=3, protocol=protocol, **clothes)
        assert out["num_valid_queries"] == valid == count_valid_queries(*ids, protocol=protocol, **clothes)
        assert out["mAP"] == pytest.approx(mean_ap), protocol
        np.testing.assert_allclose(out["cmc"], cmc, err_msg=protocol)


@pytest.mark.parametrize("protocol", ["cloth-changing", "same-clothes"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_protocols_match_the_loop_reference(protocol, seed, chunk_size):
    """The clothes rule is one more mask in the chunked ranking: equal to the loop reference, for distance
    matrices and for features (cosine, chunked), with tied distances too (rounded)."""
    rng = np.random.default_rng(seed)
    ids = random_ids(rng, 40, 150)
    clothes = {"q_clothes": rng.integers(1, 4, 40), "g_clothes": rng.integers(1, 4, 150)}
    qf, gf = torch.randn(40, 8, generator=torch.Generator().manual_seed(seed)), torch.randn(150, 8)
    dist = np.round((1 - torch.nn.functional.normalize(qf) @ torch.nn.functional.normalize(gf).T).numpy(), 1)
    want = reference(dist, *ids, q_clothes=clothes["q_clothes"], g_clothes=clothes["g_clothes"], protocol=protocol)
    assert_same(evaluate_rank(dist, *ids, chunk_size=chunk_size, protocol=protocol, **clothes), want)
    assert count_valid_queries(*ids, protocol=protocol, **clothes) == want["num_valid_queries"]
    exact = reference((1 - torch.nn.functional.normalize(qf) @ torch.nn.functional.normalize(gf).T).numpy(), *ids,
                      q_clothes=clothes["q_clothes"], g_clothes=clothes["g_clothes"], protocol=protocol)
    got = evaluate_features(qf, gf, *ids, chunk_size=chunk_size, protocol=protocol, **clothes)
    assert got["num_valid_queries"] == exact["num_valid_queries"]
    assert got["mAP"] == pytest.approx(exact["mAP"], abs=1e-5)
    np.testing.assert_allclose(got["cmc"], exact["cmc"], atol=1e-6)


def test_prcc_protocols_score_b_and_c_against_all_of_a(tmp_path):
    """PRCC as its authors' code tests it: B queries (same clothes) and C queries (changed clothes) each against
    every A image; here the same-clothes protocol over B + C scores exactly B, cloth-changing exactly C."""
    data = read_prcc(_prcc_fixture(tmp_path))
    q, g = data.query, data.gallery
    ids = ([r.pid for r in q], [r.pid for r in g], [r.camid for r in q], [r.camid for r in g])
    clothes = {"q_clothes": clothes_ids(q), "g_clothes": clothes_ids(g)}
    dist = np.random.default_rng(0).random((len(q), len(g)), dtype=np.float32)
    for protocol, camera in (("same-clothes", 2), ("cloth-changing", 3)):
        rows = [i for i, r in enumerate(q) if r.camid == camera]
        sub = ([ids[0][i] for i in rows], ids[1], [ids[2][i] for i in rows], ids[3])
        assert_same(evaluate_rank(dist, *ids, protocol=protocol, **clothes), evaluate_rank(dist[rows], *sub))
        assert evaluate_rank(dist, *ids, protocol=protocol, **clothes)["num_valid_queries"] == len(rows) == 2


def test_protocol_errors():
    dist = np.zeros((1, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="cloth-changing protocol needs clothes ids"):
        evaluate_rank(dist, [1], [1, 1], [1], [2, 3], protocol="cloth-changing")
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_rank(dist, [1], [1, 1], [1], [2, 3], q_clothes=[1], g_clothes=[1, 2], protocol="cc")
    with pytest.raises(ValueError, match="g_clothes has length 1, expected 2"):
        evaluate_rank(dist, [1], [1, 1], [1], [2, 3], q_clothes=[1], g_clothes=[1], protocol="same-clothes")
    with pytest.raises(ValueError, match=r"no query has a true match \(same pid, other camera, other clothes\)"):
        evaluate_rank(dist, [1], [1, 1], [1], [2, 3], q_clothes=[1], g_clothes=[1, 1], protocol="cloth-changing")


# ----------------------------------------------------------------------------- synthetic outfits


def test_default_synthetic_data_is_unchanged():
    """One outfit (the default) plans and draws exactly what the generator did before ``synth-clothes``
    existed (digests recorded then).  The pixel digest was recorded with Pillow 13.0 / numpy 2.4: another
    Pillow may rasterise differently, the record digest does not depend on it."""
    specs = plan(8, 3, 0, (2, 3), 1.0, 3)
    records = "\n".join(f"{s.relpath} {s.pid} {s.cam} {s.index}" for s in specs)
    assert hashlib.sha256(records.encode()).hexdigest() == \
        "70a3cb52eab8cca245f1cc1e06a4e81cc2990aa15927f155aa0ae82c00eef4d5"
    pixels = hashlib.sha256()
    for spec in specs[::7]:
        image, keypoints, scores = render_spec(spec, 0, 3, 64, 32)
        for array in (np.asarray(image), keypoints, scores):
            pixels.update(array.tobytes())
    assert pixels.hexdigest() == "c4374e9147b190c6668100d8632ca6fbba8d9b1bb780ec5ebb99f7a77879df18"


def test_outfits_change_between_cameras():
    specs = [s for s in plan(24, 4, 0, (2, 3), 1.0, 2, clothes=3) if s.pid > 0]
    outfits: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for spec in specs:
        assert spec.folder in ("train", "query", "test")
        assert parse_ltcc_name(spec.name) == (spec.pid, spec.cam, spec.outfit + 1)
        outfits[spec.pid][spec.cam].add(spec.outfit)
    for pid, by_camera in outfits.items():
        assert all(len(worn) == 1 for worn in by_camera.values()), "one outfit per camera"
        assert len(set().union(*by_camera.values())) == min(len(by_camera), 3) >= 2, pid
    person = sample_person(0, 5)
    assert wear_outfit(person, 0, 5, 0) == person
    dressed = wear_outfit(person, 0, 5, 1)
    assert visible_traits(dressed) != visible_traits(person)
    body = ("build", "legs", "skin", "hair", "long_hair")
    assert [getattr(dressed, f) for f in body] == [getattr(person, f) for f in body]


TINY_CLOTHES = dict(num_ids=8, num_cameras=3, seed=0, height=64, width=32, images_per_id_per_camera=(2, 3),
                    num_distractors=3, clothes=2)


@pytest.fixture(scope="module")
def clothes_root(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("clothes") / "data", progress=False, **TINY_CLOTHES)


@pytest.fixture
def clothes_run_config(clothes_root, tmp_path) -> dict:
    return {**TINY_SETTINGS, "data-dir": str(clothes_root), "synth-clothes": 2, "output-dir": str(tmp_path / "out")}


def test_synthetic_clothes_dataset_has_clothes_ids(clothes_root, clothes_run_config):
    data = load_dataset(load_config(clothes_run_config))
    assert data.root == clothes_root and data.name == "synthetic"
    by_name = {s.relpath: s for s in plan(8, 3, 0, (2, 3), 1.0, 3, clothes=2)}
    assert sorted(data.relative(r) for r in data.train + data.query + data.gallery) == sorted(by_name)
    for record in data.train + data.query + data.gallery:
        assert record.clothes == by_name[data.relative(record)].outfit + 1
    for protocol in ("standard", "cloth-changing", "same-clothes"):
        check_dataset(data, protocol=protocol)


def test_synth_clothes_key_reaches_the_generator(monkeypatch, tmp_path):
    """The cached dataset of a config depends on ``synth-clothes`` (its own folder, generated with it)."""
    calls = []
    monkeypatch.setattr(synthetic, "ensure_synthetic", lambda cache, **params: calls.append(params) or tmp_path)
    dataset_root(Config.from_mapping({"synth-clothes": 3}))
    assert calls[0]["clothes"] == 3
    assert synthetic_dir_name(num_ids=48, num_cameras=4, clothes=3) != synthetic_dir_name(num_ids=48, num_cameras=4)
    assert "synth_clothes" in DATASET_FIELDS


def _market_fixture(root: Path) -> Path:
    """A Market layout without clothes ids: id 1 in cameras 1 and 2."""
    for folder, name in (("bounding_box_train", "0001_c1s1_000100_01.jpg"), ("query", "0001_c1s1_000200_01.jpg"),
                         ("bounding_box_test", "0001_c2s1_000300_01.jpg")):
        _image(root / folder / name)
    return root


def test_config_checks_for_clothes(tmp_path):
    with pytest.raises(ConfigError, match="'synth-clothes' must be in 1..synth-cameras"):
        Config.from_mapping({"synth-cameras": 3, "synth-clothes": 4})
    market = read_dataset("market1501", _market_fixture(tmp_path))
    check_dataset(market)
    with pytest.raises(ConfigError, match="'eval-protocol' = 'cloth-changing' needs clothes ids"):
        check_dataset(market, protocol="cloth-changing")


def test_camfed_synth_with_clothes_writes_ltcc_layout(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--ids", "4", "--cameras", "2", "--clothes", "2", "--height", "32",
                 "--width", "16"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["query", "test", "train"]
    assert "train" in capsys.readouterr().out


# ----------------------------------------------------------------------------- reports


def test_evaluate_model_reports_every_protocol(clothes_run_config):
    """Centralized and server-side evaluation: the headline metrics follow ``eval-protocol``; with clothes ids
    every protocol's mAP and rank-1 are listed too."""
    config = load_config({**clothes_run_config, "eval-protocol": "cloth-changing"})
    dataset = load_dataset(config)
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    metrics = evaluate_model(model, dataset, config, torch.device("cpu"))
    assert metrics["mAP"] == metrics["cloth_changing_mAP"] and metrics["rank1"] == metrics["cloth_changing_rank1"]
    standard = evaluate_model(model, dataset, load_config(clothes_run_config), torch.device("cpu"))
    assert standard["mAP"] == metrics["standard_mAP"] == standard["standard_mAP"]
    assert "same_clothes_mAP" in metrics and metrics["standard_mAP"] != metrics["cloth_changing_mAP"]


def test_camfed_evaluate_rows_list_every_protocol_with_clothes_ids():
    """``camfed evaluate``'s rows (``pipeline._metrics``): protocol columns with clothes ids, none without."""
    gen = torch.Generator().manual_seed(0)
    pids, camids, clothes = np.array([1, 1, 2, 2, 1, 2]), np.array([1, 2, 1, 2, 3, 3]), np.array([1, 1, 1, 2, 2, 2])

    def split(rows, with_clothes):
        return SplitFeatures(torch.nn.functional.normalize(torch.randn(len(rows), 4, generator=gen)), pids[rows],
                             camids[rows], [""] * len(rows), clothes=clothes[rows] if with_clothes else None)

    config = Config.from_mapping({"eval-protocol": "cloth-changing"})
    _, row = _metrics(split([0, 2], True), split([1, 3, 4, 5], True), None, config)
    assert row["mAP"] == row["cloth_changing_mAP"] and {"standard_mAP", "same_clothes_rank1"} <= set(row)
    _, plain = _metrics(split([0, 2], False), split([1, 3, 4, 5], False), None, Config())
    assert not any(key.endswith("_mAP") for key in plain)
