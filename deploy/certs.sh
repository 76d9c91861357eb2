#!/usr/bin/env bash
# Make the TLS material of a camfed federation with openssl.
#
#   deploy/certs.sh OUT_DIR [SAN ...]
#
# OUT_DIR/ca.crt                  the certificate authority's certificate (every host gets a copy)
# OUT_DIR/server.pem, server.key  the SuperLink's certificate (also served by its Fleet proxy), signed by the CA
#
# The CA's private key is never written to OUT_DIR (the run folder that the SuperLink host mounts).
# By default it is made in a temporary folder and deleted once the server certificate is signed;
# rotating then means running this script again into a fresh OUT_DIR and giving every host the new
# ca.crt.  To keep it for later signing, name a file outside OUT_DIR (an offline medium):
#
#   CAMFED_CA_KEY_OUT=/media/offline/camfed-ca.key deploy/certs.sh OUT_DIR [SAN ...]
#
# and to sign a new server certificate (e.g. with another SAN) with that kept CA, so that the
# hosts keep their ca.crt:
#
#   CAMFED_CA_KEY=/media/offline/camfed-ca.key CAMFED_CA_CERT=old/ca.crt deploy/certs.sh NEW_DIR [SAN ...]
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
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
inside_out() {  # is file $1 inside OUT_DIR?
    local dir
    dir="$(cd "$(dirname "$1")" 2>/dev/null && pwd -P)" || return 1
    case "$dir/" in "$(cd "$OUT" && pwd -P)/"*) return 0 ;; *) return 1 ;; esac
}
if [ -n "${CAMFED_CA_KEY_OUT:-}" ]; then
    if inside_out "$CAMFED_CA_KEY_OUT"; then
        echo "$0: CAMFED_CA_KEY_OUT must be outside $OUT (the CA key must not travel with the run folder)" >&2
        exit 2
    fi
    [ ! -e "$CAMFED_CA_KEY_OUT" ] || { echo "$0: $CAMFED_CA_KEY_OUT exists; not overwritten" >&2; exit 1; }
fi
if [ -n "${CAMFED_CA_KEY:-}" ] && [ -z "${CAMFED_CA_CERT:-}" ]; then
    echo "$0: CAMFED_CA_KEY needs CAMFED_CA_CERT (the CA certificate that goes with it)" >&2
    exit 2
fi

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

if [ -n "${CAMFED_CA_KEY:-}" ]; then
    cp "$CAMFED_CA_KEY" "$TMP/ca.key"
    cp "$CAMFED_CA_CERT" "$OUT/ca.crt"
    CA_FROM="the kept CA ($CAMFED_CA_CERT)"
else
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 \
        -days "$DAYS" -subj "/CN=camfed federation CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$TMP/ca.key" -out "$OUT/ca.crt" 2>/dev/null
    CA_FROM="a new CA"
fi

openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 \
    -subj "/CN=camfed superlink" -keyout "$OUT/server.key" -out "$TMP/server.csr" 2>/dev/null

ext="$TMP/server.ext"
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$sans" > "$ext"
openssl x509 -req -in "$TMP/server.csr" -CA "$OUT/ca.crt" -CAkey "$TMP/ca.key" -CAserial "$TMP/ca.srl" -CAcreateserial \
    -days "$DAYS" -sha384 -extfile "$ext" -out "$OUT/server.pem" 2>/dev/null

chmod 644 "$OUT/ca.crt" "$OUT/server.pem"
if [ -n "${CAMFED_CA_KEY_OUT:-}" ]; then
    (umask 077 && cp "$TMP/ca.key" "$CAMFED_CA_KEY_OUT")
    ca_key="kept in $CAMFED_CA_KEY_OUT (store it offline)"
elif [ -n "${CAMFED_CA_KEY:-}" ]; then
    ca_key="$CAMFED_CA_KEY (unchanged)"
else
    ca_key="deleted after signing (to rotate, run this script again into a new folder)"
fi
echo "CA:          $OUT/ca.crt, $CA_FROM; private key $ca_key"
echo "SuperLink:   $OUT/server.pem, $OUT/server.key"
echo "SANs:        $sans"
