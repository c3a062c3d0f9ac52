#!/usr/bin/env bash
# Installs what Conveyor needs on a machine without it: redis-server and the
# PostgreSQL server binaries. As root on Debian/Ubuntu it installs them with
# apt-get; otherwise it prints what to run.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ! command -v postgres >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  missing+=(postgresql)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  apt-get install -y -qq "${missing[@]}"
  exit 0
fi

echo "Conveyor needs: ${missing[*]}" >&2
echo "  Debian/Ubuntu: sudo apt-get install -y ${missing[*]}" >&2
echo "  macOS:         brew install redis postgresql@16" >&2
echo "  or run it with docker compose: docker compose up" >&2
exit 1
