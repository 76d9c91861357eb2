#!/usr/bin/env python3
"""Generate camfed's docker-compose files.

    python deploy/make_compose.py --dataset market1501 --gpu --out deploy/run/market1501.yml
    python deploy/make_compose.py --dataset synthetic --cameras 4 --cpu --out deploy/run/demo.yml
    python deploy/make_compose.py --cameras 2 --cpu --role link --out deploy/run/link.yml
    python deploy/make_compose.py --cameras 6 --gpu --role camera --camera 3 --superlink link.example.org:8000 \
        --out deploy/run/camera-3.yml
    python deploy/make_compose.py --update-committed    # the one example, deploy/compose/market1501-gpu.yml

Roles: ``all`` (one host: SuperLink, its Fleet proxy, ServerApp executor, registration, and per camera a
SuperNode and its ClientApp executor), ``link`` (the SuperLink host of a multi-machine
federation) and ``camera`` (one camera host).  The ``*_command`` functions are the single
source of every process's command line; tests/test_deploy_process.py runs exactly these.

flwr 1.41 serves the Fleet, Control and Runtime APIs of the SuperLink on one HTTPS port, and
Control has no authentication.  So no camera network reaches the SuperLink itself: cameras reach
only ``fleet-proxy`` (nginx, deploy/proxy/), which passes the Fleet endpoints and refuses the rest.
The operator's ``flwr`` reaches the SuperLink on a port published on the host (default
127.0.0.1:8001).  Each camera has its own network to the proxy and its own internal network
between its SuperNode and its ClientApp executor.  TLS and SuperNode authentication are on unless
``--insecure`` is given.

Host paths in the file (``--run-dir``, the build context) are written relative to the folder of
``--out`` (or of the current directory when writing to stdout), so the file works from wherever
it is, and the containers run as ``--uid``/``--gid`` (default: yours) without any ``.env``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

DATASET_CAMERAS = {"market1501": 6, "msmt17": 15}
REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN_DIR = REPO / "deploy" / "run"
COMPOSE_DIR = Path(__file__).resolve().parent / "compose"
COMMITTED = {  # the one example in deploy/compose/ -> the options that generate it (tests/test_deploy.py)
    "market1501-gpu.yml": ["--dataset", "market1501", "--gpu", "--uid", "1000", "--gid", "1000"],
}
LINK_PORT = 8000  # flwr 1.41: Fleet + Control + Runtime HTTP(S) APIs of the SuperLink (and the proxy's port)
NODE_RUNTIME_PORT = 9094  # flwr 1.41: a SuperNode's Runtime API (its ClientApp executor connects here)
CONTROL_HOST_PORT = 8001  # default host port of the operator's (Control) access to the SuperLink
FLEET_PROXY = "fleet-proxy"  # the service camera networks reach; it answers there to the name "superlink"
SUPERLINK_API_ALIAS = "superlink-api"  # the SuperLink's name on the internal link network (the proxy's upstream)
DOCKER_NETWORK_POOLS = 30  # user networks Docker's default address pools hold (172.17-31/16, 192.168/20)


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


def fleet_proxy_command(secure: bool) -> list[str]:
    """nginx with the image's Fleet-only configuration (deploy/proxy/fleet-{tls,insecure}.conf)."""
    conf = "fleet-tls.conf" if secure else "fleet-insecure.conf"
    return ["nginx", "-e", "stderr", "-c", f"/etc/camfed/proxy/{conf}", "-g", "daemon off;"]


def clientapp_command(supernode: str, secret: str) -> list[str]:
    """The ClientApp executor of one camera: ``flower-superexec`` against its SuperNode's Runtime API.

    That API is plain HTTP on the camera's private network (compose: an internal network shared
    by the SuperNode and this executor only); the shared ``secret`` authenticates the executor."""
    return ["flower-superexec", "--runtime-api-address", supernode, "--insecure",
            "--superexec-auth-secret-file", secret]


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
        # host paths are relative to the folder the file is written to (compose resolves them from there)
        self.base = Path(args.out).resolve().parent if args.out else Path.cwd()
        self.run_dir = Path(args.run_dir).resolve() if args.run_dir else DEFAULT_RUN_DIR

    def _relative(self, path: Path) -> str:
        """``path`` relative to the file's folder, in the ``./`` or ``../`` form compose reads as a path."""
        relative = os.path.relpath(path, self.base)
        return relative if relative.startswith("..") else f"./{relative}" if relative != "." else "."

    # host paths (compose interpolation; CAMFED_* values that are relative are relative to the file's folder)
    def _secret_path(self, name: str) -> str:
        return f"${{CAMFED_SECRETS:-{self._relative(self.run_dir / 'secrets')}}}/{name}"

    def _state_path(self, name: str) -> str:
        return f"${{CAMFED_STATE:-{self._relative(self.run_dir / 'state')}}}/{name}"

    def _data_path(self, folder: str) -> str:
        return f"${{CAMFED_DATA:-{self._relative(self.run_dir / 'data' / self.args.dataset)}}}/{folder}"

    def _outputs_path(self) -> str:
        return f"${{CAMFED_OUTPUTS:-{self._relative(self.run_dir / 'outputs')}}}"

    def _service(self, command: list[str], mounts: list[dict], networks: list[str] | dict, home: str,
                 **extra) -> dict:
        service = {"image": f"${{CAMFED_IMAGE:-camfed:{self.args.device}}}",
                   "user": f"${{CAMFED_UID:-{self.args.uid}}}:${{CAMFED_GID:-{self.args.gid}}}",
                   "command": command, "environment": {"FLWR_HOME": home}, "volumes": mounts, "networks": networks}
        return {**service, **extra}

    def _executor_environment(self, service: dict) -> dict:
        if self.args.cpu_threads:  # torch starts one thread per core in every executor otherwise
            service["environment"]["OMP_NUM_THREADS"] = str(self.args.cpu_threads)
        return service

    def _ca(self) -> list[dict]:
        return [_bind(self._secret_path("certs/ca.crt"), f"{CERTS}/ca.crt", True)] if self.secure else []

    def _server_certs(self) -> list[dict]:
        return [_bind(self._secret_path(f"certs/{n}"), f"{CERTS}/{n}", True)
                for n in ("ca.crt", "server.pem", "server.key")] if self.secure else []

    def _superexec_secret(self, name: str) -> dict:
        return _bind(self._secret_path(f"superexec/{name}.secret"), f"{SECRETS}/superexec.secret", True)

    def _device(self, index: int) -> dict:
        return {"deploy": _gpu(self.gpus[index % len(self.gpus)])} if self.args.device == "gpu" else {}

    def link_services(self) -> dict:
        """The SuperLink (internal network + the operator's published port), its Fleet proxy (the only
        thing camera networks reach) and the ServerApp executor (which sees only the test split)."""
        secret = self._superexec_secret("superlink")
        superlink = self._service(
            superlink_command("0.0.0.0", LINK_PORT, CERTS if self.secure else None, f"{SECRETS}/superexec.secret",
                              f"{STATE}/superlink.db"),
            [*self._server_certs(), secret, _bind(self._state_path("superlink"), STATE)],
            {"link": {"aliases": [SUPERLINK_API_ALIAS]}, "operator": {}}, f"{STATE}/flwr",
            ports=[f"${{CAMFED_CONTROL_BIND:-127.0.0.1}}:${{CAMFED_CONTROL_PORT:-{CONTROL_HOST_PORT}}}:{LINK_PORT}"],
            healthcheck=HEALTHCHECK, restart="unless-stopped")
        proxy_networks: dict = {"link": {}}
        if self.args.role == "link":
            proxy_networks["public"] = {}
        else:
            for camid in self.cameras():
                proxy_networks[f"uplink-{camid}"] = {"aliases": ["superlink"]}
        proxy = self._service(
            fleet_proxy_command(self.secure), self._server_certs(), proxy_networks, "/tmp/flwr",
            depends_on={"superlink": {"condition": "service_healthy"}}, healthcheck=HEALTHCHECK,
            restart="unless-stopped")
        if self.args.role == "link":
            proxy["ports"] = [f"${{CAMFED_FLEET_BIND:-0.0.0.0}}:${{CAMFED_FLEET_PORT:-{LINK_PORT}}}:{LINK_PORT}"]
        serverapp = self._executor_environment(self._service(
            serverapp_command(self.link, self.ca, f"{SECRETS}/superexec.secret"),
            [*self._ca(), secret, _bind(self._data_path("server"), DATA, True),
             _bind(self._outputs_path(), f"{WORKDIR}/outputs"), _bind(self._state_path("serverapp"), STATE)],
            ["link"], f"{STATE}/flwr", working_dir=WORKDIR, shm_size=SHM_SIZE, depends_on=["superlink"],
            restart="unless-stopped", **self._device(0)))
        return {"superlink": superlink, FLEET_PROXY: proxy, "serverapp": serverapp}

    def register_service(self) -> dict:
        """One-shot registration of every camera's public key (single-host compose), from the link network."""
        keys = [f"{KEYS}/camera-{c}.pub" for c in self.cameras()]
        mounts = [*self._ca(), *(_bind(self._secret_path(f"keys/camera-{c}.pub"), k, True)
                                 for c, k in zip(self.cameras(), keys))]
        return {"register": self._service(register_command(self.link, self.ca, keys), mounts, ["link"], "/tmp/flwr",
                                          depends_on={"superlink": {"condition": "service_healthy"}})}

    def cameras(self) -> list[int]:
        return [self.args.camera] if self.args.role == "camera" else list(range(1, self.args.cameras + 1))

    def camera_services(self, camid: int, superlink: str) -> dict:
        """The camera's SuperNode (its uplink to the Fleet proxy, node key, no images) and ClientApp executor
        (its images read-only and its state; reachable only through the camera's internal network)."""
        name = f"camera-{camid}"
        secret = self._superexec_secret(name)
        key = [_bind(self._secret_path(f"keys/{name}"), f"{KEYS}/{name}", True)] if self.secure else []
        config = node_config(DATA, STATE, "cuda" if self.args.device == "gpu" else "cpu")
        uplink = "uplink" if self.args.role == "camera" else f"uplink-{camid}"
        supernode = self._service(
            supernode_command(superlink, self.ca, f"{KEYS}/{name}" if self.secure else None, config, "0.0.0.0",
                              NODE_RUNTIME_PORT, f"{SECRETS}/superexec.secret"),
            [*self._ca(), *key, secret], [uplink, name], "/tmp/flwr", restart="unless-stopped")
        if self.args.role == "all":
            supernode["depends_on"] = {FLEET_PROXY: {"condition": "service_healthy"}}
            if self.secure:
                supernode["depends_on"]["register"] = {"condition": "service_completed_successfully"}
        clientapp = self._executor_environment(self._service(
            clientapp_command(f"supernode-{camid}:{NODE_RUNTIME_PORT}", f"{SECRETS}/superexec.secret"),
            [secret, _bind(self._data_path(name), DATA, True), _bind(self._state_path(name), STATE)],
            [name], f"{STATE}/flwr", working_dir=WORKDIR, shm_size=SHM_SIZE, depends_on=[f"supernode-{camid}"],
            restart="unless-stopped", **self._device(camid - 1)))
        return {f"supernode-{camid}": supernode, f"clientapp-{camid}": clientapp}

    def document(self) -> dict:
        services: dict = {}
        networks: dict = {}
        if self.args.role in ("all", "link"):
            services.update(self.link_services())
            networks["link"] = {"internal": True}
            networks["operator"] = {}  # the SuperLink alone: only its published Control port leaves the host
            if self.args.role == "link":
                networks["public"] = {}  # the Fleet proxy alone: its published port is what camera hosts reach
            if self.args.role == "all" and self.secure:
                services.update(self.register_service())
        if self.args.role in ("all", "camera"):
            superlink = self.link if self.args.role == "all" else self.args.superlink
            if self.args.role == "camera":
                networks["uplink"] = {}  # the SuperNode dials out to the SuperLink host
            for camid in self.cameras():
                services.update(self.camera_services(camid, superlink))
                if self.args.role == "all":
                    networks[f"uplink-{camid}"] = {"internal": True}  # this SuperNode and the Fleet proxy only
                networks[f"camera-{camid}"] = {"internal": True}  # this SuperNode and its ClientApp executor only
        first = next(iter(services.values()))  # builds the image that every service runs
        first["build"] = {"context": self._relative(REPO), "dockerfile": "deploy/Dockerfile",
                          "args": {"VARIANT": self.args.device,
                                   "BASE_IMAGE": "${CAMFED_BASE_IMAGE:-python:3.11-slim}"}}
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
    if args.run_dir:
        argv += ["--run-dir", str(Path(args.run_dir).resolve())]
    argv += ["--uid", str(args.uid), "--gid", str(args.gid)]
    if args.cpu_threads:
        argv += ["--cpu-threads", str(args.cpu_threads)]
    return argv + (["--insecure"] if args.insecure else [])


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a mount shared by two services out twice instead of as a YAML alias."""

    def ignore_aliases(self, data) -> bool:
        return True


def render(args: argparse.Namespace) -> str:
    """The compose file's YAML text, with a header naming the command that regenerates it."""
    generator = Generator(args)
    document = generator.document()
    header = ("# Generated by deploy/make_compose.py -- do not edit; regenerate with:\n"
              f"#   python deploy/make_compose.py {' '.join(canonical_argv(args))} --out <this file>\n"
              "# Host paths are relative to this file's folder; the containers run as the uid:gid above\n"
              "# (CAMFED_UID/CAMFED_GID override it).  Cameras reach only the Fleet proxy; the operator's flwr\n"
              "# reaches the SuperLink at ${CAMFED_CONTROL_BIND:-127.0.0.1}:"
              f"${{CAMFED_CONTROL_PORT:-{CONTROL_HOST_PORT}}}.\n"
              + ("# INSECURE: no TLS and no SuperNode authentication.\n" if args.insecure else ""))
    if len(document["networks"]) > DOCKER_NETWORK_POOLS - 1:
        note = (f"{len(document['networks'])} networks: more than Docker's default address pools hold; give dockerd "
                "more (daemon.json \"default-address-pools\", see deploy/README.md)")
        print(f"make_compose.py: note: {note}", file=sys.stderr)
        header += f"# NOTE: {note}.\n"
    return header + yaml.dump(document, Dumper=_NoAliasDumper, sort_keys=False,
                              default_flow_style=False, width=1000)


def _default_ids() -> tuple[int, int]:
    """The caller's uid/gid (files made by the deploy scripts are theirs); root gets 1000:1000 with a note."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        return 1000, 1000
    return uid, gid


def build_parser() -> argparse.ArgumentParser:
    uid, gid = _default_ids()
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
                        help="with --role camera: the address host:port of the SuperLink host's Fleet proxy")
    parser.add_argument("--run-dir", help="host folder with data/<dataset>/, secrets/, state/ and outputs/ "
                        f"(default: {DEFAULT_RUN_DIR.relative_to(REPO)} of this repository)")
    parser.add_argument("--uid", type=int, default=uid, help=f"uid the containers run as (default: yours, {uid}; "
                        "1000 when you are root)")
    parser.add_argument("--gid", type=int, default=gid, help=f"gid the containers run as (default: yours, {gid})")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="OMP_NUM_THREADS of each executor (several cameras on one CPU host: cores / cameras)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no SuperNode authentication (explicit opt-in; trusted networks only)")
    parser.add_argument("--out", help="write to this file (host paths relative to its folder) instead of stdout "
                        "(host paths relative to the current directory)")
    parser.add_argument("--update-committed", action="store_true",
                        help="regenerate the committed example in deploy/compose/ and exit")
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
    if args.cpu_threads < 0:
        parser.error("--cpu-threads must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.update_committed:
        COMPOSE_DIR.mkdir(exist_ok=True)
        for name, options in COMMITTED.items():
            (COMPOSE_DIR / name).write_text(render(parse_args([*options, "--out", str(COMPOSE_DIR / name)])))
            print(f"wrote {COMPOSE_DIR / name}")
        return 0
    if os.getuid() == 0 and "--uid" not in argv:
        print("make_compose.py: note: you are root; the containers run as 1000:1000 (--uid/--gid to choose), "
              "so the secrets, state and outputs folders must be theirs", file=sys.stderr)
    text = render(args)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
