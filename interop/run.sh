#!/usr/bin/env bash
# Interop against third-party servers on loopback.
#
#   interop/run.sh synapse  real Synapse federating with relay-matrix (interop/synapse/run.sh).
#   interop/run.sh protocol06  byte-exact cross-check of mimi-wire against the independent
#                         Python encoder in interop/protocol06 (both directions).
#   interop/run.sh https-peer  a mimi-relay node peering over HTTPS with the Python
#                         protocol-06 peer in interop/https-peer (CA-issued certificates, its
#                         own directory paths, HTTP/1.1, no sequence extension), messages both
#                         ways, the peer restarted in the middle. HTTPS_PEER_COMPAT=1: pinned
#                         self-signed certificates and /v1 paths instead; see
#                         interop/https-peer/README.md for the other knobs.
#   interop/run.sh xmpp   relay A as an XEP-0114 component of Prosody (127.0.0.1), relay B as a
#                         component of ejabberd (127.0.0.2), the servers federating over s2s;
#                         runs tests/tests/xmpp_interop.rs across them.
#
# Installs the servers from Debian packages if they are missing (needs root then), runs them as
# this script's own processes with configs in a temporary directory (never the system
# services), stops everything it started, and exits non-zero on any failure.
# Facts behind the configs: ../shared/notes/third-party-servers.md of the project notes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ beside the interop scripts
REPO=$(pwd)

usage() { echo "usage: $0 xmpp|synapse|protocol06|https-peer..." >&2; exit 2; }
[ $# -ge 1 ] || usage

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "interop: $1 needs root (install packages, /etc/hosts, run ejabberd as its user)" >&2
    exit 1
  fi
}

xmpp() {
  need_root "xmpp"
  if ! command -v prosody >/dev/null || ! command -v ejabberdctl >/dev/null || ! dpkg -s lua-unbound >/dev/null 2>&1; then
    echo "== installing prosody and ejabberd (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends prosody lua-unbound ejabberd >/dev/null
  fi
  # Name resolution for s2s: each server resolves the other's domains to its own address.
  for line in "127.0.0.1 a.localhost relay.a.localhost bench.a.localhost bench2.a.localhost" \
              "127.0.0.2 b.localhost relay.b.localhost bench.b.localhost"; do
    grep -qxF "$line" /etc/hosts || echo "$line" >> /etc/hosts
  done

  WORK=$(mktemp -d /tmp/mimi-xmpp-interop.XXXXXX)
  chmod 755 "$WORK"
  PROSODY_PID=""
  EJ=""
  SECRET_A="secret-a-$RANDOM$RANDOM"
  SECRET_B="secret-b-$RANDOM$RANDOM"
  cleanup() {
    set +e
    if [ -n "$PROSODY_PID" ]; then
      kill "$PROSODY_PID" 2>/dev/null
      wait "$PROSODY_PID" 2>/dev/null
    fi
    if [ -n "$EJ" ]; then
      $EJ stop >/dev/null 2>&1
      for _ in $(seq 1 50); do $EJ status >/dev/null 2>&1 || break; sleep 0.2; done
      # epmd outlives ejabberd: stop the one bound to our loopback address, by its pid.
      for pid in $(pgrep -x epmd); do
        if { tr '\0' ' ' < "/proc/$pid/environ"; } 2>/dev/null | grep -q "ERL_EPMD_ADDRESS=127.0.0.1"; then
          kill "$pid" 2>/dev/null
        fi
      done
    fi
    if [ "${KEEP_WORK:-}" = 1 ]; then echo "interop: kept $WORK"; else rm -rf "$WORK"; fi
  }
  trap cleanup EXIT

  echo "== prosody on 127.0.0.1 (a.localhost)"
  mkdir -p "$WORK/prosody/data"
  cat > "$WORK/prosody/prosody.cfg.lua" <<LUA
run_as_root = true
daemonize = false
pidfile = "$WORK/prosody/prosody.pid"
data_path = "$WORK/prosody/data"
log = { ${PROSODY_LOG_LEVEL:-warn} = "$WORK/prosody/prosody.log" }
interfaces = { "127.0.0.1" }
component_interfaces = { "127.0.0.1" }
local_interfaces = { "127.0.0.1" }
c2s_ports = { 5222 }
s2s_ports = { 5269 }
component_ports = { 5347 }
c2s_require_encryption = false
s2s_require_encryption = false
s2s_secure_auth = false
allow_unencrypted_plain_auth = true
-- Its resolver treats *.localhost specially; read /etc/hosts and ask no one else.
unbound = { hoststxt = true; resolvconf = false; forward = "127.0.0.1"; options = { ["local-zone:"] = "localhost. static" } }
modules_enabled = { "disco"; "dialback"; "ping"; }
modules_disabled = { "tls"; }
VirtualHost "a.localhost"
Component "relay.a.localhost"
  component_secret = "$SECRET_A"
Component "bench.a.localhost"
  component_secret = "$SECRET_A"
Component "bench2.a.localhost"
  component_secret = "$SECRET_A"
LUA
  prosody --config "$WORK/prosody/prosody.cfg.lua" -F >"$WORK/prosody/stdout.log" 2>&1 &
  PROSODY_PID=$!

  echo "== ejabberd on 127.0.0.2 (b.localhost)"
  mkdir -p "$WORK/ejabberd/spool" "$WORK/ejabberd/logs"
  cat > "$WORK/ejabberd/ejabberd.yml" <<YML
hosts:
  - b.localhost
loglevel: ${EJABBERD_LOG_LEVEL:-warning}
certfiles: []
listen:
  - port: 5222
    ip: "127.0.0.2"
    module: ejabberd_c2s
    starttls: false
    shaper: c2s_shaper
  - port: 5269
    ip: "127.0.0.2"
    module: ejabberd_s2s_in
  - port: 5347
    ip: "127.0.0.2"
    module: ejabberd_service
    hosts:
      relay.b.localhost:
        password: "$SECRET_B"
      bench.b.localhost:
        password: "$SECRET_B"
s2s_use_starttls: false
outgoing_s2s_families: [ipv4]
shaper:
  normal: 1000000
shaper_rules:
  c2s_shaper: none
  s2s_shaper: none
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  s2s:
    allow: all
auth_method: internal
modules:
  mod_disco: {}
  mod_ping: {}
  mod_s2s_dialback: {}
YML
  cat > "$WORK/ejabberd/ejabberdctl.cfg" <<CFG
ERLANG_NODE=ejabberd@localhost
INET_DIST_INTERFACE=127.0.0.1
ERL_EPMD_ADDRESS=127.0.0.1
CFG
  cat > "$WORK/ejabberd/inetrc" <<INET
{lookup,["file","native"]}.
{hosts_file,"/etc/hosts"}.
INET
  chown -R ejabberd: "$WORK/ejabberd"
  export ERL_INETRC="$WORK/ejabberd/inetrc" ERL_EPMD_ADDRESS=127.0.0.1
  EJ="ejabberdctl --config-dir $WORK/ejabberd --spool $WORK/ejabberd/spool --logs $WORK/ejabberd/logs"
  $EJ start
  up=""
  for _ in $(seq 1 100); do
    if $EJ status >/dev/null 2>&1; then up=1; break; fi
    sleep 0.2
  done
  if [ -z "$up" ]; then
    echo "interop: ejabberd did not start; its log:" >&2
    tail -n 30 "$WORK/ejabberd/logs/"*.log >&2 || true
    exit 1
  fi
  for _ in $(seq 1 50); do
    (exec 3<>/dev/tcp/127.0.0.1/5347) 2>/dev/null && break
    sleep 0.1
  done
  if ! kill -0 "$PROSODY_PID" 2>/dev/null; then
    echo "interop: prosody did not start:" >&2
    cat "$WORK/prosody/stdout.log" "$WORK/prosody/prosody.log" >&2 || true
    exit 1
  fi

  if [ "${HOLD:-}" = 1 ]; then
    # Debugging aid: keep the servers up (configs and logs in $WORK) until interrupted.
    echo "interop: servers up, configs and logs in $WORK; Ctrl-C to stop"
    sleep infinity & wait $! || true
    return 0
  fi
  echo "== relay A (component of prosody) -> s2s -> relay B (component of ejabberd)"
  status=0
  MIMI_XMPP_INTEROP=1 PROSODY_SECRET="$SECRET_A" EJABBERD_SECRET="$SECRET_B" \
    PROSODY_COMPONENT=127.0.0.1:5347 EJABBERD_COMPONENT=127.0.0.2:5347 \
    RAW_COMPONENT_A=bench RAW_COMPONENT_B=bench2 \
    cargo test ${CARGO_PROFILE:-} --locked -q -p mimi-relay-tests --test xmpp_interop || status=$?
  if [ "$status" != 0 ]; then
    echo "interop: failed; server logs:" >&2
    tail -n 20 "$WORK/prosody/prosody.log" "$WORK/ejabberd/logs/"*.log >&2 || true
  fi
  return "$status"
}

protocol06() {
  local out status=0
  out=$(mktemp /tmp/mimi-protocol06.XXXXXX.json)
  MIMI_PROTOCOL06_RUST_OUT="$out" cargo test ${CARGO_PROFILE:-} --locked -q -p mimi-wire \
    --test protocol06_vectors || status=$?
  if [ "$status" = 0 ]; then
    python3 "$REPO/interop/protocol06/check.py" --rust "$out" || status=$?
  fi
  rm -f "$out"
  return "$status"
}

# A free TCP port on 127.0.0.1 (the kernel picks; a race with other processes is unlikely here).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

https_peer() {
  # Standard library Python and the openssl CLI (for the test certificates) are all it needs.
  if ! command -v openssl >/dev/null || ! command -v python3 >/dev/null; then
    need_root "https-peer (installing openssl and python3)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl python3 >/dev/null
  fi
  cargo build ${CARGO_PROFILE:-} --locked -q -p mimi-relay
  local bin="$REPO/target/${CARGO_TARGET_SUBDIR:-debug}/mimi-relay"
  WORK=$(mktemp -d /tmp/mimi-https-peer.XXXXXX)
  NODE_PID=""
  cleanup() {
    set +e
    if [ -n "$NODE_PID" ]; then kill "$NODE_PID" 2>/dev/null; wait "$NODE_PID" 2>/dev/null; fi
    if [ "${KEEP_WORK:-}" = 1 ]; then echo "interop: kept $WORK"; else rm -rf "$WORK"; fi
  }
  trap cleanup EXIT
  local compat="${HTTPS_PEER_COMPAT:-}"
  local NODE=a.example PY=py.example
  local node_https node_admin py_https py_control
  node_https=$(free_port); node_admin=$(free_port); py_https=$(free_port); py_control=$(free_port)
  mkdir -p "$WORK/certs" "$WORK/py-state"
  cd "$WORK/certs"
  # Test-only keys, made for this run in its temporary directory and deleted with it.
  leaf() { # leaf DOMAIN [CA]: a P-256 key and certificate with the domain as DNS SAN
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null
    printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=critical,CA:FALSE\n' "$1" > "$1.ext"
    if [ -n "${2:-}" ]; then
      openssl req -new -key "$1.key" -subj "/CN=$1" -out "$1.csr" 2>/dev/null
      openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial -days 2 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    else
      openssl req -new -x509 -key "$1.key" -subj "/CN=$1" -days 2 -addext "subjectAltName=DNS:$1" \
        -addext "extendedKeyUsage=serverAuth,clientAuth" -addext "basicConstraints=critical,CA:FALSE" \
        -out "$1.crt" 2>/dev/null
    fi
  }
  # By default CA-issued certificates and the peer's own paths. Each can be switched, to test
  # the other ways: HTTPS_PEER_TRUST=pinned (self-signed certificates, pinned),
  # HTTPS_PEER_PATHS=v1 (the peer also serves /v1/{endpoint}/{param}); HTTPS_PEER_COMPAT=1
  # sets both.
  local trust="${HTTPS_PEER_TRUST:-ca}" paths="${HTTPS_PEER_PATHS:-own}"
  if [ -n "$compat" ]; then trust=pinned; paths=v1; fi
  local peer_trust py_trust py_flags=()
  echo "== https-peer: $trust certificates, $paths paths, HTTP/1.1 without ALPN, no MIMI-Seq"
  if [ "$trust" = pinned ]; then
    leaf "$NODE"; leaf "$PY"
    peer_trust="cert = \"certs/$PY.crt\""
    py_trust="$WORK/certs/$NODE.crt"
  else
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
    openssl req -new -x509 -key ca.key -subj "/CN=mimi interop test CA" -days 2 \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out ca.crt 2>/dev/null
    leaf "$NODE" ca; leaf "$PY" ca
    peer_trust="ca = \"certs/ca.crt\""
    py_trust="$WORK/certs/ca.crt"
  fi
  if [ "$paths" = v1 ]; then py_flags=(--compat); fi
  cd "$REPO"
  local hosted="mimi://$NODE/r/lobby" remote="mimi://$PY/r/pyroom"
  cat > "$WORK/$NODE.toml" <<TOML
[node]
domain = "$NODE"
data_dir = "data"
admin = "127.0.0.1:$node_admin"
store = "durable"
follows = ["$remote"]

[tls]
cert = "certs/$NODE.crt"
key = "certs/$NODE.key"

[listen]
https = "127.0.0.1:$node_https"

[[peers]]
domain = "$PY"
transport = "https"
address = "127.0.0.1:$py_https"
$peer_trust

[[rooms]]
id = "$hosted"
followers = ["$PY"]
TOML
  if ! "$bin" check-config "$WORK/$NODE.toml" >"$WORK/check-config.log" 2>&1; then
    echo "interop: https-peer: the node refuses its config:" >&2
    cat "$WORK/check-config.log" >&2
    return 1
  fi
  RUST_LOG="${RUST_LOG:-info}" "$bin" run --config "$WORK/$NODE.toml" >"$WORK/node.log" 2>&1 &
  NODE_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$node_admin") 2>/dev/null && break
    sleep 0.1
  done
  local status=0
  python3 "$REPO/interop/https-peer/drive.py" --admin "127.0.0.1:$node_admin" \
    --control "127.0.0.1:$py_control" --node-domain "$NODE" --hosted "$hosted" --remote "$remote" \
    --messages "${HTTPS_PEER_MESSAGES:-10000}" --submits "${HTTPS_PEER_SUBMITS:-1000}" \
    --stall "${HTTPS_PEER_STALL:-30}" --replay 3 --peer-log "$WORK/py-peer.log" --json "$WORK/results.json" \
    --check-peers "$(printf '%q --config %q' "$bin" "$WORK/$NODE.toml")" \
    ${HTTPS_PEER_FLOWS:+--flows "$HTTPS_PEER_FLOWS"} -- \
    python3 "$REPO/interop/https-peer/peer.py" --domain "$PY" --listen "127.0.0.1:$py_https" \
    --control "127.0.0.1:$py_control" --cert "$WORK/certs/$PY.crt" --key "$WORK/certs/$PY.key" \
    --trust "$py_trust" --peer "$NODE=127.0.0.1:$node_https" --host-room "$remote=$NODE" \
    --follow "$hosted" --state "$WORK/py-state" --replay 3 "${py_flags[@]}" || status=$?
  if [ "$status" != 0 ]; then
    echo "interop: https-peer failed; the node's and the peer's last log lines:" >&2
    grep -v " INFO " "$WORK/node.log" | tail -n 15 >&2 || true
    tail -n 15 "$WORK/py-peer.log" >&2 || true
  fi
  return "$status"
}

for case in "$@"; do
  case "$case" in
    xmpp) xmpp ;;
    synapse) "$REPO/interop/synapse/run.sh" ;;
    protocol06) protocol06 ;;
    https-peer) https_peer ;;
    *) usage ;;
  esac
done
