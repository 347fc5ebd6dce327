#!/usr/bin/env bash
# System packages the tests use that PyPI does not ship: Debian's `prometheus` (promtool checks
# and unit-tests the alert rules). Installed when missing and this runs as root with apt-get;
# otherwise one line says what to install. Called by `make install` (and so by `make test`).
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts its own server on port 9090 where an init system runs; the tests start theirs.
  command -v systemctl >/dev/null 2>&1 && systemctl disable --now prometheus >/dev/null 2>&1 || true
  exit 0
fi
echo "note: promtool is missing; install Debian's 'prometheus' package (the alert-rule tests need it)" >&2
