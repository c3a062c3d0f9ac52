#!/usr/bin/env bash
# Installs what Conveyor's tasks need on a machine without it:
#   redis-server and the PostgreSQL server binaries  (go tool task run, and the tests)
#   a C compiler and the C library headers            (go test -race needs cgo)
#   curl                                              (README's walkthrough and its test)
# On Debian/Ubuntu it installs the missing ones with apt-get: as root, or
# through sudo when it can use sudo (without a password, or by asking for it
# at a terminal). Otherwise it prints what to run and exits 1. It warns when
# redis-server is older than 7.
set -euo pipefail

# Debian/Ubuntu package names of what is missing.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ! command -v postgres >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  missing+=(postgresql)
fi
command -v curl >/dev/null 2>&1 || missing+=(curl)
no_cc=""
case "$(uname -s)" in
  Linux)
    # cgo runs $CC, gcc unless CC is set.
    command -v "${CC:-gcc}" >/dev/null 2>&1 || { no_cc=1; missing+=(gcc); }
    if command -v dpkg-query >/dev/null 2>&1 &&
      ! dpkg-query -W -f='${Status}' libc6-dev 2>/dev/null | grep -q 'ok installed'; then
      missing+=(libc6-dev)
    fi
    ;;
  Darwin)
    # cgo runs $CC, clang unless CC is set; it comes with Xcode's command line tools.
    command -v "${CC:-clang}" >/dev/null 2>&1 || no_cc=1
    ;;
esac

# warn_old_redis warns when the redis-server on PATH is older than 7.
warn_old_redis() {
  command -v redis-server >/dev/null 2>&1 || return 0
  local version major
  version=$(redis-server --version 2>/dev/null | sed -n 's/.* v=\([0-9][0-9.]*\).*/\1/p')
  major=${version%%.*}
  if [ -n "$major" ] && [ "$major" -lt 7 ]; then
    echo "warning: redis-server $version is older than 7. Conveyor needs Redis 7 or newer: older servers lack" >&2
    echo "  what it uses, such as the lag field of XINFO GROUPS. Install Redis 7 (for example from" >&2
    echo "  https://packages.redis.io), point REDIS_URL at a Redis 7 server, or use docker compose." >&2
  fi
}

if [ ${#missing[@]} -eq 0 ] && [ -z "$no_cc" ]; then
  warn_old_redis
  exit 0
fi

# explain says what to install by hand, and fails. (${missing[*]:-}: an
# empty array is "unbound" to macOS's bash 3.2 under set -u.)
explain() {
  local list="${missing[*]:-}"
  warn_old_redis
  if [ -n "$list" ]; then
    echo "Conveyor needs: $list" >&2
    echo "  Debian/Ubuntu: sudo apt-get install -y $list" >&2
  fi
  if [ -n "$no_cc" ] && [ "$(uname -s)" = Darwin ]; then
    echo "Conveyor's tests need a C compiler (go test -race needs cgo): xcode-select --install" >&2
  fi
  case " $list " in
    *" redis-server "* | *" postgresql "*)
      echo "  macOS:         brew install redis postgresql@16" >&2
      echo "  or run Conveyor with docker compose: docker compose up" >&2
      ;;
  esac
  exit 1
}

# apt-get runs as root directly, otherwise through sudo if sudo can be used
# here: without a password, or at a terminal, where it asks for one. (sudo
# resets the environment, hence env.)
apt=()
how=""
if command -v apt-get >/dev/null 2>&1 && [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
    how="apt-get"
  elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
    apt=(sudo env DEBIAN_FRONTEND=noninteractive apt-get)
    how="sudo apt-get"
  fi
fi
[ ${#apt[@]} -gt 0 ] || explain
echo "installing ${missing[*]} with $how"
"${apt[@]}" update -qq || true
"${apt[@]}" install -y -qq "${missing[@]}" || explain
warn_old_redis
