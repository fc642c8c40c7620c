#!/usr/bin/env bash
# Side by side, in one run, printing ratios: 20 units from a 0.7 GiB golden image with software keys.
#   provision batch --workers 2      (clone, enroll, inject, verify, handshake, inventory; outputs synced)
#   (a) manual per unit: cp --sparse=always + openssl ecparam/req/x509 + debugfs -w in place; then sync
#   (b) bare cp --sparse=always of the golden image 20 times; then sync
# Targets: >= 5x faster than (a); within 1.5x of (b); peak RSS under 200 MB.
# Usage: bench/batch.sh [path/to/provision]   (N units, default 20)
source "$(dirname "$0")/lib.sh" "$@"
N="${N:-20}"
# A golden image with an operating system's worth of data: 2 x 200 MiB in the root file systems (0.7 GiB in all).
"$bin" sample-image "$w/golden.img" --rootfs-mib 256 --data-mib 128 --fill-mib "${FILL_MIB:-200}" >/dev/null
d4=$(sfdisk -J "$w/golden.img" | python3 -c "import json,sys; print(json.load(sys.stdin)['partitiontable']['partitions'][3]['start']*512)")
seq -f 'BB-%04g' 1 "$N" >"$w/serials.txt"

mkdir -p "$w/cp" "$w/man" "$w/out"
t0=$(now); for i in $(seq 1 "$N"); do cp --sparse=always "$w/golden.img" "$w/cp/$i.img"; done; sync; t1=$(now); cp_ns=$((t1-t0))
rm -rf "$w/cp"; sync
t0=$(now)
for i in $(seq 1 "$N"); do
  img="$w/man/$i.img"; d="$w/man/$i"; mkdir -p "$d"
  cp --sparse=always "$w/golden.img" "$img"
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/key.pem" 2>/dev/null
  openssl req -new -key "$d/key.pem" -subj "/CN=device-$i" -out "$d/csr.pem"
  openssl x509 -req -in "$d/csr.pem" -CA "$ca/issuing.crt" -CAkey "$ca/issuing.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 825 -sha256 -extfile "$ext" -out "$d/cert.pem" 2>/dev/null
  debugfs -w -R "write $d/cert.pem /mender/mender-cert.pem" "$img?offset=$d4" >/dev/null 2>&1
  debugfs -w -R "write $d/key.pem /mender/mender-cert-private.pem" "$img?offset=$d4" >/dev/null 2>&1
done
sync; t1=$(now); man_ns=$((t1-t0))
rm -rf "$w/man"; sync
t0=$(now)
/usr/bin/time -f '%M' -o "$w/rss" "$bin" batch --serials "$w/serials.txt" --image "$w/golden.img" --out "$w/out" --workers 2 >/dev/null
t1=$(now); prov_ns=$((t1-t0))
rss_kb=$(tail -1 "$w/rss")
"$bin" verify --image "$w/out/BB-0001.img" --serial BB-0001 >/dev/null

awk -v n="$N" -v cp="$cp_ns" -v man="$man_ns" -v prov="$prov_ns" -v rss="$rss_kb" 'BEGIN {
  printf "%-64s %10s %10s\n", n " units from a 0.7 GiB golden image", "total ms", "per unit"
  printf "%-64s %10.1f %10.1f\n", "(a) cp --sparse + openssl + debugfs -w, then sync", man/1e6, man/1e6/n
  printf "%-64s %10.1f %10.1f\n", "(b) cp --sparse=always only, then sync", cp/1e6, cp/1e6/n
  printf "%-64s %10.1f %10.1f\n", "provision batch --workers 2 (full pipeline, synced)", prov/1e6, prov/1e6/n
  printf "ratio vs (a): %.1fx faster (target >= 5x)\n", man/prov
  printf "ratio vs (b): %.2fx the time of a bare copy (target <= 1.5)\n", prov/cp
  printf "peak RSS: %.1f MB (target < 200 MB)\n", rss/1024
}'
