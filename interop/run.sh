#!/usr/bin/env bash
# Interop runs against real third-party servers on loopback. Each case lives in its own
# directory and script; this only dispatches. Usage: interop/run.sh <case>...
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

usage() { echo "usage: $0 synapse" >&2; exit 2; }
[ $# -ge 1 ] || usage
for case in "$@"; do
  case "$case" in
    synapse) "$here/synapse/run.sh" ;;
    *) usage ;;
  esac
done
