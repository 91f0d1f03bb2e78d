#!/usr/bin/env bash
# Real Synapse (PyPI matrix-synapse) federating with relay-matrix on loopback, both directions:
# (a) a Synapse user's to-device message of a MIMI type reaches the relay in a verified /send;
# (b) the relay's to-device EDU shows up in the Synapse user's /sync.
# Installs Synapse into a virtualenv if missing (SYNAPSE_VENV, default target/interop/synapse-venv),
# runs it from a fresh data directory (a failed federation attempt leaves a backoff in the
# database), stops it on exit, and exits non-zero on any failure.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"

venv="${SYNAPSE_VENV:-$repo/target/interop/synapse-venv}"
client_port="${SYNAPSE_CLIENT_PORT:-18008}"
fed_port="${SYNAPSE_FEDERATION_PORT:-18448}"
server_name="127.0.0.1:$fed_port"

if ! "$venv/bin/python" -c 'import synapse' 2>/dev/null; then
  echo "== installing matrix-synapse into $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian ships venv support separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get install -y -q python3-venv >/dev/null
      rm -rf "$venv"
      python3 -m venv "$venv"
    else
      echo "python3 -m venv failed; install python3-venv" >&2
      exit 1
    fi
  fi
  "$venv/bin/pip" install -q matrix-synapse
fi
echo "== synapse $("$venv/bin/python" -c 'import synapse; print(synapse.__version__)')"

work="$(mktemp -d "${TMPDIR:-/tmp}/mimi-synapse.XXXXXX")"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  if [ "${KEEP_SYNAPSE_DIR:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Synapse's TLS certificate: generated like a relay's, then pinned by the relay.
cargo run --locked -q -p mimi-relay -- keygen synapse.test --out "$work" >/dev/null

sed -e "s|@SERVER_NAME@|$server_name|g" -e "s|@DIR@|$work|g" \
    -e "s|@CLIENT_PORT@|$client_port|g" -e "s|@FED_PORT@|$fed_port|g" \
    interop/synapse/homeserver.yaml.in > "$work/homeserver.yaml"
"$venv/bin/python" -m synapse.app.homeserver --config-path "$work/homeserver.yaml" \
  --generate-keys >/dev/null

echo "== starting synapse ($server_name, client API 127.0.0.1:$client_port)"
"$venv/bin/python" -m synapse.app.homeserver --config-path "$work/homeserver.yaml" \
  >"$work/synapse.out" 2>&1 &
pid=$!
up() {
  "$venv/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$client_port/_matrix/client/versions', timeout=1)" 2>/dev/null
}
for _ in $(seq 300); do
  if up; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then tail -n 40 "$work/synapse.out" >&2; echo "synapse exited" >&2; exit 1; fi
  sleep 0.1
done
up || { echo "synapse did not start within 30 s" >&2; exit 1; }

echo "== federation test"
status=0
MIMI_SYNAPSE_CLIENT="127.0.0.1:$client_port" \
MIMI_SYNAPSE_FEDERATION="127.0.0.1:$fed_port" \
MIMI_SYNAPSE_SERVER_NAME="$server_name" \
MIMI_SYNAPSE_CERT="$work/synapse.test.crt" \
  cargo test --locked -q -p relay-matrix --test synapse -- --ignored --nocapture || status=$?
if [ "$status" != 0 ]; then
  echo "== synapse log (last 60 lines)" >&2
  tail -n 60 "$work/homeserver.log" >&2 2>/dev/null || tail -n 60 "$work/synapse.out" >&2
fi
exit "$status"
