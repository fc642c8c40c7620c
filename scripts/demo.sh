#!/usr/bin/env bash
# make demo: a throw-away station, sample units on the in-process TPM simulator and in software, and the checks an
# engineer would otherwise run by hand with OpenSSL. Nothing outside the printed directory is touched.
set -euo pipefail
bin="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
d="$(mktemp -d "${TMPDIR:-/tmp}/provision-demo.XXXXXX")"
st="$d/station"
export PROVISION_STATION="$st" PROVISION_OPERATOR="${PROVISION_OPERATOR:-demo}"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "provision init (a station with its own root and issuing CA)"
"$bin" init --id demo-station --tpm sim

step "provision enroll: two units on the TPM simulator (keys created inside the TPM)"
"$bin" enroll --serials <(printf 'DEMO-0001\nDEMO-0002\n') --out "$d/bundles"

step "provision enroll: a unit without a TPM (software key, written only to its bundle)"
"$bin" enroll --serial DEMO-0003 --tpm soft --out "$d/bundles" --json

step "the same unit again is refused (exit 3) ..."
"$bin" enroll --serial DEMO-0003 --tpm soft --out "$d/bundles" || echo "exit code $?"
step "... unless re-provisioned on purpose"
"$bin" enroll --serial DEMO-0003 --tpm soft --out "$d/bundles" --reprovision

step "a malformed serial is rejected before anything happens (exit 2)"
"$bin" enroll --serial 'bad/serial' --tpm soft --out "$d/bundles" || echo "exit code $?"

step "openssl verify of every certificate against the station CA"
for u in DEMO-0001 DEMO-0002 DEMO-0003; do
  openssl verify -CAfile "$st/ca/root.crt" -untrusted "$st/ca/issuing.crt" "$d/bundles/$u/device.crt"
done
openssl x509 -in "$d/bundles/DEMO-0001/device.crt" -noout -subject -ext subjectAltName,extendedKeyUsage

cat <<MSG

Everything is in $d:
  station/          station.yaml, ca/, inventory.db, audit.head
  bundles/<serial>  device.crt, chain.crt, ca.crt and device.tss2.pem (TPM key) or device.key (software key)
The simulator's TPM keys lived only as long as the enroll process: their key files load on no other TPM.
Remove it all with: rm -rf $d
MSG
