#!/usr/bin/env bash
# Side by side, in one run, printing ratios: giving one unit its identity in a 0.7 GiB Mender image.
#   provision:   provision enroll --tpm soft + provision inject (two processes)
#   (a) manual:  openssl ecparam+req+x509, then debugfs -w in place (write cert and key, rewrite mender.conf in both rootfs)
#   (b) dd way:  what mender-artifact does: dd each partition out, debugfs -w, e2fsck -fy, dd it back
# and provision inject into a 0.7 GiB and a 4 GiB sparse image.
# Targets: >= 10x faster than (a), >= 100x faster than (b), 4 GiB no more than 1.5x the 0.7 GiB cost.
# Usage: bench/inject.sh [path/to/provision]  (N=units per measurement, default 10)
source "$(dirname "$0")/lib.sh" "$@"
N="${N:-10}"
"$bin" sample-image "$w/small.img" --rootfs-mib 256 --data-mib 128 >/dev/null   # 0.7 GiB
"$bin" sample-image "$w/big.img" --rootfs-mib 1800 --data-mib 512 >/dev/null    # 4 GiB
off() { sfdisk -J "$1" | python3 -c "import json,sys; p=json.load(sys.stdin)['partitiontable']['partitions'][$2-1]; print(p['start']*512, p['size']*512)"; }
read -r r2 r2s < <(off "$w/small.img" 2); read -r r3 r3s < <(off "$w/small.img" 3); read -r d4 d4s < <(off "$w/small.img" 4)
cp --sparse=always "$w/small.img" "$w/a.img"; cp --sparse=always "$w/small.img" "$w/b.img"

manual_unit() { # (a): what a hand-written station script does, in place
  local s=$1 img=$2 d="$w/m/$1"; mkdir -p "$d"
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/key.pem" 2>/dev/null
  openssl req -new -key "$d/key.pem" -subj "/CN=device-$s" -out "$d/csr.pem"
  openssl x509 -req -in "$d/csr.pem" -CA "$ca/issuing.crt" -CAkey "$ca/issuing.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 825 -sha256 -extfile "$ext" -out "$d/cert.pem" 2>/dev/null
  cat "$d/cert.pem" "$ca/issuing.crt" >"$d/chain.pem"
  debugfs -w -R "rm /mender/mender-cert.pem" "$img?offset=$d4" >/dev/null 2>&1 || true
  debugfs -w -R "write $d/chain.pem /mender/mender-cert.pem" "$img?offset=$d4" >/dev/null 2>&1
  debugfs -w -R "rm /mender/mender-cert-private.pem" "$img?offset=$d4" >/dev/null 2>&1 || true
  debugfs -w -R "write $d/key.pem /mender/mender-cert-private.pem" "$img?offset=$d4" >/dev/null 2>&1
  for o in $r2 $r3; do
    debugfs -R "cat /etc/mender/mender.conf" "$img?offset=$o" 2>/dev/null | python3 -c 'import json,sys; c=json.load(sys.stdin); c["HttpsClient"]={"Certificate":"/data/mender/mender-cert.pem","Key":"/data/mender/mender-cert-private.pem"}; print(json.dumps(c,indent=2))' >"$d/mender.conf"
    debugfs -w -R "rm /etc/mender/mender.conf" "$img?offset=$o" >/dev/null 2>&1
    debugfs -w -R "write $d/mender.conf /etc/mender/mender.conf" "$img?offset=$o" >/dev/null 2>&1
  done
  sync "$img"
}
ddway_unit() { # (b): copy each partition out, edit, check, copy back
  local s=$1 img=$2 d="$w/m/$1"
  for spec in "$d4 $d4s data" "$r2 $r2s rootfs" "$r3 $r3s rootfs"; do
    read -r o sz kind <<<"$spec"
    dd if="$img" of="$w/part.img" bs=4M iflag=skip_bytes,count_bytes skip="$o" count="$sz" status=none
    if [ "$kind" = data ]; then
      debugfs -w -R "write $d/chain.pem /mender/mender-cert.pem" "$w/part.img" >/dev/null 2>&1
      debugfs -w -R "write $d/key.pem /mender/mender-cert-private.pem" "$w/part.img" >/dev/null 2>&1
    else
      debugfs -w -R "rm /etc/mender/mender.conf" "$w/part.img" >/dev/null 2>&1
      debugfs -w -R "write $d/mender.conf /etc/mender/mender.conf" "$w/part.img" >/dev/null 2>&1
    fi
    e2fsck -fy "$w/part.img" >/dev/null 2>&1 || true
    dd if="$w/part.img" of="$img" bs=4M oflag=seek_bytes seek="$o" conv=notrunc status=none
  done
  sync "$img"
}
prov_unit() {
  "$bin" enroll --serial "$1" --tpm soft --out "$w/bundles" >/dev/null
  "$bin" inject --image "$2" --bundle "$w/bundles/$1" >/dev/null
}

t0=$(now); for i in $(seq 1 "$N"); do manual_unit "MA-$i" "$w/a.img"; done; t1=$(now); man=$(( (t1-t0)/1000/N ))
t0=$(now); for i in 1 2; do ddway_unit "MA-$i" "$w/b.img"; done; t1=$(now); ddw=$(( (t1-t0)/1000/2 ))
t0=$(now); for i in $(seq 1 "$N"); do prov_unit "PS-$i" "$w/small.img"; done; t1=$(now); prov=$(( (t1-t0)/1000/N ))
# The station's whole job in one process: enroll + inject + read-back verify + live handshake.
t0=$(now); for i in $(seq 1 "$N"); do "$bin" unit --serial "PU-$i" --image "$w/small.img" --tpm soft >/dev/null; done; t1=$(now); unit=$(( (t1-t0)/1000/N ))
"$bin" enroll --serials <(seq -f 'INJ-%03g' 1 "$N") --tpm soft --out "$w/bundles" >/dev/null
t0=$(now); for i in $(seq -f '%03g' 1 "$N"); do "$bin" inject --image "$w/small.img" --bundle "$w/bundles/INJ-$i" >/dev/null; done; t1=$(now); ismall=$(( (t1-t0)/1000/N ))
t0=$(now); for i in $(seq -f '%03g' 1 "$N"); do "$bin" inject --image "$w/big.img" --bundle "$w/bundles/INJ-$i" >/dev/null; done; t1=$(now); ibig=$(( (t1-t0)/1000/N ))
"$bin" verify --image "$w/small.img" --serial "INJ-$(printf %03d "$N")" >/dev/null
e2fsck -fn "$w/small.img?offset=$d4" >/dev/null 2>&1

awk -v man="$man" -v ddw="$ddw" -v prov="$prov" -v unit="$unit" -v is="$ismall" -v ib="$ibig" 'BEGIN {
  printf "%-66s %10s\n", "per unit, 0.7 GiB Mender image", "ms"
  printf "%-66s %10.1f\n", "(a) openssl ecparam+req+x509 + debugfs -w in place", man/1000
  printf "%-66s %10.1f\n", "(b) dd partitions out + debugfs -w + e2fsck + dd back", ddw/1000
  printf "%-66s %10.1f\n", "provision enroll --tpm soft + provision inject (two processes)", prov/1000
  printf "%-66s %10.1f\n", "provision unit --tpm soft (one process: + verify + handshake)", unit/1000
  printf "%-66s %10.1f\n", "provision inject, 0.7 GiB image", is/1000
  printf "%-66s %10.1f\n", "provision inject, 4 GiB image", ib/1000
  printf "ratio vs (a): %.1fx faster (target >= 10x)\n", man/prov
  printf "ratio vs (b): %.1fx faster (target >= 100x)\n", ddw/prov
  printf "provision unit (one process, more work) vs (a): %.1fx faster, vs (b): %.1fx faster\n", man/unit, ddw/unit
  printf "4 GiB / 0.7 GiB inject cost: %.2f (target <= 1.5)\n", ib/is
}'
