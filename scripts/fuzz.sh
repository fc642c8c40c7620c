#!/usr/bin/env bash
# Runs every Fuzz target in the module for a while each: scripts/fuzz.sh [DURATION]
set -euo pipefail
t="${1:-20s}"
for pkg in $(go list ./...); do
  for f in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    echo "== $pkg $f"
    go test -run '^$' -fuzz "^$f\$" -fuzztime "$t" "$pkg"
  done
done
