# Shared setup of the bench scripts (sourced): the binary, a throw-away workspace with a station, and helpers.
# Sets: bin (absolute path of provision), w (workspace, removed on exit), ca (the station's CA dir), ext (an OpenSSL
# extension file with the station's client-certificate policy); defines now (nanoseconds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${1:-bin/provision}"
[ -x "$bin" ] || { echo "bench: $bin missing: run make build" >&2; exit 2; }
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
w="$(mktemp -d "${TMPDIR:-/tmp}/provision-bench.XXXXXX")"
trap 'rm -rf "$w"' EXIT
export PROVISION_STATION="$w/station" PROVISION_OPERATOR=bench
unset PROVISION_CA_PASSPHRASE
"$bin" init --id bench >/dev/null
ca="$PROVISION_STATION/ca"
ext="$w/ext.cnf"
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' >"$ext"
now() { date +%s%N; }
