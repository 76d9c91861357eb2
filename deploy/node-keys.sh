#!/usr/bin/env bash
# Make each camera's SuperNode authentication key pair and its local SuperExec secret.
#
#   deploy/node-keys.sh SECRETS_DIR [camera-1 camera-2 ...]
#
# SECRETS_DIR/keys/<name>, <name>.pub       ECDSA P-384 key pair in OpenSSH format (what flwr 1.41
#                                           reads); register <name>.pub with the SuperLink, keep
#                                           <name> on the camera host only
# SECRETS_DIR/superexec/<name>.secret       32 random bytes shared by the camera's SuperNode and
#                                           its ClientApp executor
# SECRETS_DIR/superexec/superlink.secret    the same for the SuperLink and its ServerApp executor
#                                           (made once, on the first call)
#
# Run it on each camera host for that camera (its private key never leaves the host), on the
# SuperLink host without names, or once on a single host for all cameras.  Existing files are never overwritten.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 SECRETS_DIR [NAME ...]   (e.g. $0 deploy/run/secrets camera-{1..6})" >&2
    exit 2
fi
OUT="$1"; shift
umask 077
mkdir -p "$OUT/keys" "$OUT/superexec"

secret() {
    [ -e "$1" ] || head -c 32 /dev/urandom > "$1"
}

secret "$OUT/superexec/superlink.secret"
for name in "$@"; do
    if [[ ! "$name" =~ ^[A-Za-z0-9_-]+$ ]]; then
        echo "$0: bad name '$name' (letters, digits, - and _ only)" >&2
        exit 2
    fi
    key="$OUT/keys/$name"
    if [ -e "$key" ]; then
        echo "$key exists; kept"
    else
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "camfed $name" -f "$key"
        chmod 644 "$key.pub"
        echo "$key (private, stays on this host), $key.pub (register it with the SuperLink)"
    fi
    secret "$OUT/superexec/$name.secret"
done
