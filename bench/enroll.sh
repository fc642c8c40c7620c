#!/usr/bin/env bash
# Side by side, in one run: provision enroll against the OpenSSL CLI doing the same per unit
# (ecparam -genkey + req -new + x509 -req with the station's issuing CA). Prints times and ratios.
#   (a) one `provision enroll --tpm soft` process per unit, N_A units (default 50)      target: >= 3x faster
#   (b) `provision enroll --serials FILE --tpm soft`, N_B units in one process (default 500)  target: >= 20x faster per unit
# Usage: bench/enroll.sh [path/to/provision]   (default: bin/provision, built by `make build`)
source "$(dirname "$0")/lib.sh" "$@"
N_A="${N_A:-50}" N_B="${N_B:-500}"

openssl_unit() { # what the guides' generate-certs.sh does for one device
  local s=$1 d=$2
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/$s.key" 2>/dev/null
  openssl req -new -key "$d/$s.key" -subj "/CN=device-$s/O=Example Devices/OU=Manufacturing" -out "$d/$s.csr"
  openssl x509 -req -in "$d/$s.csr" -CA "$ca/issuing.crt" -CAkey "$ca/issuing.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 825 -sha256 -extfile "$ext" -out "$d/$s.crt" 2>/dev/null
}

mkdir -p "$w/ossl_a" "$w/ossl_b"
t0=$(now); for i in $(seq -w 1 "$N_A"); do openssl_unit "A-$i" "$w/ossl_a"; done; t1=$(now)
ossl_a=$(( (t1 - t0) / 1000 ))
t0=$(now); for i in $(seq -w 1 "$N_A"); do "$bin" enroll --serial "PA-$i" --tpm soft --out "$w/prov_a" >/dev/null; done; t1=$(now)
prov_a=$(( (t1 - t0) / 1000 ))

seq -f 'PB-%05g' 1 "$N_B" >"$w/serials.txt"
t0=$(now); for i in $(seq -w 1 "$N_B"); do openssl_unit "B-$i" "$w/ossl_b"; done; t1=$(now)
ossl_b=$(( (t1 - t0) / 1000 ))
t0=$(now); "$bin" enroll --serials "$w/serials.txt" --tpm soft --out "$w/prov_b" >/dev/null; t1=$(now)
prov_b=$(( (t1 - t0) / 1000 ))

# Sanity: both produced verifiable certificates.
openssl verify -CAfile "$ca/root.crt" -untrusted "$ca/issuing.crt" "$w/ossl_a/A-$(seq -w 1 "$N_A" | head -1).crt" "$w/prov_b/PB-00001/device.crt" >/dev/null

awk -v na="$N_A" -v nb="$N_B" -v oa="$ossl_a" -v pa="$prov_a" -v ob="$ossl_b" -v pb="$prov_b" 'BEGIN {
  printf "%-58s %12s %12s\n", "", "total", "per unit"
  printf "(a) openssl ecparam+req+x509, %d units                   %9.1f ms %9.2f ms\n", na, oa/1000, oa/1000/na
  printf "(a) provision enroll --tpm soft, one process per unit    %9.1f ms %9.2f ms\n", pa/1000, pa/1000/na
  printf "(b) openssl ecparam+req+x509, %d units                  %9.1f ms %9.2f ms\n", nb, ob/1000, ob/1000/nb
  printf "(b) provision enroll --serials --tpm soft, one process   %9.1f ms %9.2f ms\n", pb/1000, pb/1000/nb
  printf "ratio (a): provision is %.1fx faster per unit (target >= 3x)\n", oa/pa
  printf "ratio (b): provision is %.1fx faster per unit (target >= 20x)\n", (ob/nb)/(pb/nb)
}'
