#!/usr/bin/env bash
# System packages the farm and its tests use that PyPI does not ship: Debian's `prometheus`
# (promtool checks and unit-tests the alert rules) and `redis-server` (the gateways' shared rate
# limits when more than one gateway replica runs; the tests start their own). Installed when
# missing and this runs as root with apt-get; otherwise one line says what to install. Called by
# `make install` (and so by `make demo` and `make test`).
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [[ ${#missing[@]} == 0 ]]; then
  exit 0
fi
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages start their own servers (Prometheus on 9090, Redis on 6379) where an init system
  # runs; the farm and the tests start theirs on ports of their own.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now prometheus redis-server >/dev/null 2>&1 || true
  fi
  exit 0
fi
echo "note: missing ${missing[*]}; install Debian's package(s) of that name (the tests need them)" >&2
