#!/usr/bin/env bash
# Installs the Debian packages provision's build, tests and demo need, if any is missing.
# Needs root (or sudo). A machine that has them all is left untouched.
set -euo pipefail
read -r -a pkgs <<<"$(tr '\n' ' ' <"$(dirname "$0")/debian-packages")"
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
