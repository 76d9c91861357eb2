#!/usr/bin/env bash
# Make the TLS material of a camfed federation with openssl.
#
#   deploy/certs.sh OUT_DIR [SAN ...]
#
# OUT_DIR/ca.crt, ca.key          a fresh certificate authority (keep ca.key offline)
# OUT_DIR/server.pem, server.key  the SuperLink's certificate, signed by the CA
#
# Each SAN is a host name or an IP address by which SuperNodes, the ServerApp executor
# and the `flwr` CLI reach the SuperLink; `superlink` (the compose service), `localhost`
# and `127.0.0.1` are always included.  Existing files are never overwritten.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [SAN ...]   (SAN: a host name or IP of the SuperLink)" >&2
    exit 2
fi
OUT="$1"; shift
DAYS="${CAMFED_CERT_DAYS:-825}"

if [ -e "$OUT/ca.crt" ] || [ -e "$OUT/server.pem" ]; then
    echo "$0: $OUT already holds certificates; remove them first to make new ones" >&2
    exit 1
fi
umask 077
mkdir -p "$OUT"

sans="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        sans="$sans,IP:$name"
    elif [[ "$name" =~ ^[A-Za-z0-9.-]+$ ]]; then
        sans="$sans,DNS:$name"
    else
        echo "$0: not a host name or IP address: '$name'" >&2
        exit 2
    fi
done

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 \
    -days "$DAYS" -subj "/CN=camfed federation CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$OUT/ca.key" -out "$OUT/ca.crt" 2>/dev/null

openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 \
    -subj "/CN=camfed superlink" -keyout "$OUT/server.key" -out "$OUT/server.csr" 2>/dev/null

ext="$(mktemp)"
trap 'rm -f "$ext" "$OUT/server.csr" "$OUT/ca.srl"' EXIT
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$sans" > "$ext"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -days "$DAYS" -sha384 -extfile "$ext" -out "$OUT/server.pem" 2>/dev/null

chmod 644 "$OUT/ca.crt" "$OUT/server.pem"
echo "CA:          $OUT/ca.crt (private key $OUT/ca.key: keep it off the SuperLink host)"
echo "SuperLink:   $OUT/server.pem, $OUT/server.key"
echo "SANs:        $sans"
