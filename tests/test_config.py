import pytest

from common.config import Config, ConfigError, load_config, parse_run_config


def test_defaults_are_the_dataclass_defaults():
    assert load_config("") == Config()


def test_key_value_pairs_like_flwr_run():
    config = load_config("dataset='market1501' data-dir='/d' backbone='resnet18' epochs=1 output-dir='o' lr=0.01")
    assert (config.dataset, config.data_dir, config.backbone, config.epochs, config.lr) == (
        "market1501", "/d", "resnet18", 1, 0.01)


def test_quoted_value_with_space_and_booleans():
    values = parse_run_config("output-dir='a b' resume=true amp=false")
    assert values == {"output-dir": "a b", "resume": True, "amp": False}


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "msmt17"\nnum-server-rounds = 7\n')
    config = load_config(str(path))
    assert config.dataset == "msmt17" and config.num_server_rounds == 7


def test_flower_mapping_with_int_for_float():
    assert load_config({"lr": 1, "fraction-train": 0.5}).lr == 1.0


@pytest.mark.parametrize("text, key", [
    ("epochs='ten'", "epochs"),
    ("unknown-key=1", "unknown-key"),
    ("backbone='vgg'", "backbone"),
    ("batch-size=30 num-instances=4", "batch-size"),
    ("lr-steps='4,x'", "lr-steps"),
    ("post='flip,blur'", "post"),
    ("resume=1", "resume"),
])
def test_bad_key_or_value_names_the_key(text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(text)


def test_missing_toml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(str(tmp_path / "nope.toml"))


def test_round_trip_through_run_config():
    config = load_config("backbone='resnet18' post='nfc,flip'")
    assert Config.from_mapping(config.to_run_config()) == config
    assert config.post_steps == ["nfc", "flip"]


def test_flower_app_config_holds_every_config_default():
    """pyproject.toml's [tool.flwr.app.config] (flwr run's defaults) cannot drift from Config's defaults."""
    from pathlib import Path

    from common.app_config import table_differences

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert table_differences(pyproject) == [], "regenerate it: python -m common.app_config"


def test_generated_table_replaces_only_the_app_config(tmp_path):
    from common.app_config import main, table_differences
    from common.config import tomllib

    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n\n# old intro\n[tool.flwr.app.config]\nlr = 0.5\nbogus = 1\n')
    assert main(["--pyproject", str(path), "--check"]) == 1
    assert main(["--pyproject", str(path)]) == 0
    text = path.read_text()
    assert table_differences(text) == [] and tomllib.loads(text)["project"] == {"name": "x"}
    assert "# old intro" not in text and main(["--pyproject", str(path), "--check"]) == 0
