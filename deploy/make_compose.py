#!/usr/bin/env python3
"""Generate camfed's docker-compose files.

    python deploy/make_compose.py --update-committed    # deploy/compose/{market1501,msmt17}-{gpu,cpu}.yml
    python deploy/make_compose.py --dataset synthetic --cameras 4 --cpu --out demo.yml
    python deploy/make_compose.py --cameras 2 --cpu --role link         > link.yml
    python deploy/make_compose.py --cameras 6 --gpu --role camera --camera 3 --superlink link.example.org:8000

Roles: ``all`` (one host: SuperLink, ServerApp executor, registration, and per camera a
SuperNode and its ClientApp executor), ``link`` (the SuperLink host of a multi-machine
federation) and ``camera`` (one camera host).  The ``*_command`` functions are the single
source of every process's command line; tests/test_deploy_process.py runs exactly these.

flwr 1.41 serves the Fleet, Control and Runtime APIs of the SuperLink on one HTTPS port
(8000).  TLS and SuperNode authentication are on unless ``--insecure`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

DATASET_CAMERAS = {"market1501": 6, "msmt17": 15}
COMPOSE_DIR = Path(__file__).resolve().parent / "compose"
COMMITTED = {  # file in deploy/compose/ -> the options that generate it (checked by tests/test_deploy.py)
    f"{dataset}-{device}.yml": ["--dataset", dataset, f"--{device}"]
    for dataset in DATASET_CAMERAS for device in ("gpu", "cpu")
}
LINK_PORT = 8000  # flwr 1.41: Fleet + Control + Runtime HTTP(S) APIs of the SuperLink
NODE_RUNTIME_PORT = 9094  # flwr 1.41: a SuperNode's Runtime API (its ClientApp executor connects here)


# paths inside the containers
CERTS = "/certs"
KEYS = "/keys"
SECRETS = "/secrets"
DATA = "/data"
STATE = "/state"
WORKDIR = "/work"  # executors' working directory; relative output-dir lands in WORKDIR/outputs
SHM_SIZE = "${CAMFED_SHM_SIZE:-2gb}"  # torch DataLoader workers share batches through /dev/shm (Docker: 64 MB)


# ------------------------------------------------------------------------------ command lines


def node_config(data_dir: str, state_dir: str, device: str) -> str:
    """``--node-config`` of a camera whose ``data_dir`` holds only its own images (``camfed split-by-camera``):
    the node's data has one camera, so partition 0 of 1; camfed config keys given here (data-dir,
    state-dir, device) override the run config on this node only."""
    return f'partition-id=0 num-partitions=1 data-dir="{data_dir}" state-dir="{state_dir}" device="{device}"'


def superlink_command(host: str, port: int, certs: str | None, secret: str, database: str) -> list[str]:
    """``flower-superlink``: TLS with ``certs`` (a folder with ca.crt, server.pem, server.key) and
    SuperNode authentication; ``certs=None`` is the explicit insecure opt-in (no TLS, no auth).
    ServerApps run in a separate executor (``--isolation process``) that proves ``secret``."""
    command = ["flower-superlink", "--isolation", "process", "--disable-runtime-dependency-installation",
               "--host", host, "--port", str(port), "--database", database, "--superexec-auth-secret-file", secret]
    if certs is None:
        return command + ["--insecure"]
    return command + ["--ssl-ca-certfile", f"{certs}/ca.crt", "--ssl-certfile", f"{certs}/server.pem",
                      "--ssl-keyfile", f"{certs}/server.key", "--enable-supernode-auth"]


def serverapp_command(superlink: str, ca: str | None, secret: str) -> list[str]:
    """The ServerApp executor: ``flower-superexec`` against the SuperLink's Runtime API."""
    tls = ["--insecure"] if ca is None else ["--root-certificates", ca]
    return ["flower-superexec", "--runtime-api-address", superlink, *tls, "--superexec-auth-secret-file", secret]


def supernode_command(superlink: str, ca: str | None, private_key: str | None, config: str, host: str,
                      port: int, secret: str) -> list[str]:
    """``flower-supernode`` of one camera; its ClientApps run in a separate executor (``--isolation process``)."""
    command = ["flower-supernode", "--superlink", superlink, "--node-config", config, "--isolation", "process",
               "--host", host, "--port", str(port), "--superexec-auth-secret-file", secret]
    if ca is None:
        return command + ["--insecure"]
    return command + ["--root-certificates", ca, "--auth-supernode-private-key", private_key]


def clientapp_command(supernode: str, secret: str) -> list[str]:
    """The ClientApp executor of one camera: ``flower-superexec`` against its SuperNode's Runtime API.

    That API is plain HTTP on the camera's private network (compose: an internal network shared
    by the SuperNode and this executor only); the shared ``secret`` authenticates the executor."""
    return ["flower-superexec", "--runtime-api-address", supernode, "--insecure", "--superexec-auth-secret-file", secret]


def register_command(superlink: str, ca: str, public_keys: list[str]) -> list[str]:
    """Register camera public keys with the SuperLink (idempotent; ``common.deploy.register_supernodes``)."""
    return ["python", "-m", "common.deploy", "register", "--superlink", superlink, "--root-certificates", ca,
            *public_keys]


# ------------------------------------------------------------------------------ compose documents


def _bind(source: str, target: str, read_only: bool = False) -> dict:
    """A bind mount in long syntax, whose host path must exist (compose does not create it)."""
    mount = {"type": "bind", "source": source, "target": target}
    return {**mount, "read_only": True} if read_only else mount


def _gpu(device_id: str) -> dict:
    return {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "device_ids": [device_id], "capabilities": ["gpu"]}]}}}


HEALTHCHECK = {  # the SuperLink accepts TCP connections on its port
    "test": ["CMD", "python", "-c", f"import socket; socket.create_connection(('127.0.0.1', {LINK_PORT}), 2)"],
    "interval": "5s", "timeout": "3s", "retries": 12, "start_period": "5s"}


class Generator:
    """The services and networks of one compose file, from the parsed options."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.secure = not args.insecure
        self.ca = f"{CERTS}/ca.crt" if self.secure else None
        self.link = f"superlink:{LINK_PORT}"
        self.gpus = [g.strip() for g in args.gpu_ids.split(",") if g.strip()]

    # host paths (compose interpolation; relative to deploy/compose/)
    def _secret_path(self, name: str) -> str:
        return f"${{CAMFED_SECRETS:-../run/secrets}}/{name}"

    def _state_path(self, name: str) -> str:
        return f"${{CAMFED_STATE:-../run/state}}/{name}"

    def _data_path(self, folder: str) -> str:
        return f"${{CAMFED_DATA:-../run/data/{self.args.dataset}}}/{folder}"

    def _service(self, command: list[str], mounts: list[dict], networks: list[str], home: str, **extra) -> dict:
        service = {"image": f"${{CAMFED_IMAGE:-camfed:{self.args.device}}}",
                   "user": "${CAMFED_UID:-1000}:${CAMFED_GID:-1000}",
                   "command": command, "environment": {"FLWR_HOME": home}, "volumes": mounts, "networks": networks}
        return {**service, **extra}

    def _ca(self) -> list[dict]:
        return [_bind(self._secret_path("certs/ca.crt"), f"{CERTS}/ca.crt", True)] if self.secure else []

    def _superexec_secret(self, name: str) -> dict:
        return _bind(self._secret_path(f"superexec/{name}.secret"), f"{SECRETS}/superexec.secret", True)

    def _device(self, index: int) -> dict:
        return {"deploy": _gpu(self.gpus[index % len(self.gpus)])} if self.args.device == "gpu" else {}

    def link_services(self) -> dict:
        """The SuperLink and its ServerApp executor (which sees only the test split)."""
        certs = [_bind(self._secret_path(f"certs/{n}"), f"{CERTS}/{n}", True)
                 for n in ("ca.crt", "server.pem", "server.key")] if self.secure else []
        secret = self._superexec_secret("superlink")
        bind_ip = "127.0.0.1" if self.args.role == "all" else "0.0.0.0"
        superlink = self._service(
            superlink_command("0.0.0.0", LINK_PORT, CERTS if self.secure else None, f"{SECRETS}/superexec.secret",
                              f"{STATE}/superlink.db"),
            [*certs, secret, _bind(self._state_path("superlink"), STATE)], ["fleet", "link"], f"{STATE}/flwr",
            ports=[f"${{CAMFED_LINK_BIND:-{bind_ip}}}:{LINK_PORT}:{LINK_PORT}"], healthcheck=HEALTHCHECK,
            restart="unless-stopped")
        serverapp = self._service(
            serverapp_command(self.link, self.ca, f"{SECRETS}/superexec.secret"),
            [*self._ca(), secret, _bind(self._data_path("server"), DATA, True),
             _bind("${CAMFED_OUTPUTS:-../run/outputs}", f"{WORKDIR}/outputs"), _bind(self._state_path("serverapp"), STATE)],
            ["link"], f"{STATE}/flwr", working_dir=WORKDIR, shm_size=SHM_SIZE, depends_on=["superlink"],
            restart="unless-stopped", **self._device(0))
        return {"superlink": superlink, "serverapp": serverapp}

    def register_service(self) -> dict:
        """One-shot registration of every camera's public key (single-host compose)."""
        keys = [f"{KEYS}/camera-{c}.pub" for c in self.cameras()]
        mounts = [*self._ca(), *(_bind(self._secret_path(f"keys/camera-{c}.pub"), k, True)
                                 for c, k in zip(self.cameras(), keys))]
        return {"register": self._service(register_command(self.link, self.ca, keys), mounts, ["fleet"], "/tmp/flwr",
                                          depends_on={"superlink": {"condition": "service_healthy"}})}

    def cameras(self) -> list[int]:
        return [self.args.camera] if self.args.role == "camera" else list(range(1, self.args.cameras + 1))

    def camera_services(self, camid: int, superlink: str) -> dict:
        """The camera's SuperNode (network access, node key, no images) and ClientApp executor
        (its images read-only and its state; reachable only through the camera's internal network)."""
        name = f"camera-{camid}"
        secret = self._superexec_secret(name)
        key = [_bind(self._secret_path(f"keys/{name}"), f"{KEYS}/{name}", True)] if self.secure else []
        config = node_config(DATA, STATE, "cuda" if self.args.device == "gpu" else "cpu")
        supernode = self._service(
            supernode_command(superlink, self.ca, f"{KEYS}/{name}" if self.secure else None, config, "0.0.0.0",
                              NODE_RUNTIME_PORT, f"{SECRETS}/superexec.secret"),
            [*self._ca(), *key, secret], ["fleet", name], "/tmp/flwr", restart="unless-stopped")
        if self.args.role == "all":
            supernode["depends_on"] = ({"register": {"condition": "service_completed_successfully"}}
                                       if self.secure else {"superlink": {"condition": "service_healthy"}})
        clientapp = self._service(
            clientapp_command(f"supernode-{camid}:{NODE_RUNTIME_PORT}", f"{SECRETS}/superexec.secret"),
            [secret, _bind(self._data_path(name), DATA, True), _bind(self._state_path(name), STATE)],
            [name], f"{STATE}/flwr", working_dir=WORKDIR, shm_size=SHM_SIZE, depends_on=[f"supernode-{camid}"],
            restart="unless-stopped", **self._device(camid - 1))
        return {f"supernode-{camid}": supernode, f"clientapp-{camid}": clientapp}

    def document(self) -> dict:
        services: dict = {}
        networks: dict = {"fleet": {}}
        if self.args.role in ("all", "link"):
            services.update(self.link_services())
            networks["link"] = {"internal": True}
            if self.args.role == "all" and self.secure:
                services.update(self.register_service())
        if self.args.role in ("all", "camera"):
            superlink = self.link if self.args.role == "all" else self.args.superlink
            for camid in self.cameras():
                services.update(self.camera_services(camid, superlink))
                networks[f"camera-{camid}"] = {"internal": True}
        first = next(iter(services.values()))  # builds the image that every service runs
        first["build"] = {"context": "../..", "dockerfile": "deploy/Dockerfile", "args": {"VARIANT": self.args.device}}
        return {"name": project_name(self.args), "services": services, "networks": networks}


def project_name(args: argparse.Namespace) -> str:
    if args.role == "camera":
        return f"camfed-camera-{args.camera}"
    return f"camfed-{args.dataset}-{args.device}" + ("-link" if args.role == "link" else "")


def canonical_argv(args: argparse.Namespace) -> list[str]:
    """The options that reproduce ``args`` (written into the file header)."""
    argv = ["--dataset", args.dataset, "--cameras", str(args.cameras), f"--{args.device}"]
    if args.device == "gpu":
        argv += ["--gpu-ids", args.gpu_ids]
    if args.role != "all":
        argv += ["--role", args.role]
    if args.role == "camera":
        argv += ["--camera", str(args.camera), "--superlink", f"'{args.superlink}'"]
    return argv + (["--insecure"] if args.insecure else [])


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a mount shared by two services out twice instead of as a YAML alias."""

    def ignore_aliases(self, data) -> bool:
        return True


def render(args: argparse.Namespace) -> str:
    """The compose file's YAML text, with a header naming the command that regenerates it."""
    header = ("# Generated by deploy/make_compose.py -- do not edit; regenerate with:\n"
              f"#   python deploy/make_compose.py {' '.join(canonical_argv(args))}\n"
              + ("# INSECURE: no TLS and no SuperNode authentication.\n" if args.insecure else ""))
    return header + yaml.dump(Generator(args).document(), Dumper=_NoAliasDumper, sort_keys=False,
                              default_flow_style=False, width=1000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_compose.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="market1501",
                        help="names the data folder and sets --cameras (market1501: 6, msmt17: 15)")
    parser.add_argument("--cameras", type=int, default=None, help="number of cameras (default: from --dataset)")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="device", action="store_const", const="gpu", help="a GPU per camera (default)")
    device.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="CPU only")
    parser.set_defaults(device="gpu")
    parser.add_argument("--gpu-ids", default="0", help="comma-separated GPU ids given round-robin to the cameras; "
                        "the ServerApp executor gets the first (default: 0)")
    parser.add_argument("--role", choices=("all", "link", "camera"), default="all",
                        help="all: one host; link: the SuperLink host; camera: one camera host")
    parser.add_argument("--camera", type=int, help="with --role camera: the camera id (1-based)")
    parser.add_argument("--superlink", default="${CAMFED_SUPERLINK:?set CAMFED_SUPERLINK=host:8000}",
                        help="with --role camera: the SuperLink's address host:port")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no SuperNode authentication (explicit opt-in; trusted networks only)")
    parser.add_argument("--out", help="write to this file instead of stdout")
    parser.add_argument("--update-committed", action="store_true",
                        help="regenerate every committed file in deploy/compose/ and exit")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cameras is None:
        if args.dataset not in DATASET_CAMERAS:
            parser.error(f"--cameras is required for dataset '{args.dataset}'")
        args.cameras = DATASET_CAMERAS[args.dataset]
    if args.cameras < 1:
        parser.error("--cameras must be >= 1")
    if args.device == "gpu" and not any(g.strip() for g in args.gpu_ids.split(",")):
        parser.error("--gpu-ids must name at least one GPU")
    if args.role == "camera" and not (args.camera and 1 <= args.camera <= args.cameras):
        parser.error(f"--role camera needs --camera between 1 and {args.cameras}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.update_committed:
        COMPOSE_DIR.mkdir(exist_ok=True)
        for name, options in COMMITTED.items():
            (COMPOSE_DIR / name).write_text(render(parse_args(options)))
            print(f"wrote {COMPOSE_DIR / name}")
        return 0
    text = render(args)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
