#!/usr/bin/env python3
"""Drive messages both ways between a mimi-relay node and the Python peer, and check that
each flow arrives complete, once, and in order.

    drive.py --admin 127.0.0.1:9191 --control 127.0.0.1:8602 --node-domain a.example \
             --hosted mimi://a.example/r/lobby --remote mimi://py.example/r/pyroom \
             --messages 10000 --submits 1000 -- python3 peer.py ARGS...

The driver starts the peer (the command after `--`) and restarts it with kill -9 in the
middle of the two /notify flows (for node-hub-notify: as soon as half is submitted; the rest
is submitted while it is down); a flow in which that did not happen fails. Flows:
  py-hub-notify     the peer, hub of --remote, fans out --messages events to the node
  py-submit         the peer, as a provider, submits --submits messages to --hosted
  node-submit       the node's client submits --submits messages to --remote (at the peer)
  node-hub-notify   the node, hub of --hosted, fans out --messages events to the peer
With --check-peers, `mimi-relay check-peers --json` is run against the peer first and its
report checked (trust, HTTP/1.1, the peer's paths, draft rules, no unexpected fault).
Every flow runs even if an earlier one failed; a flow that makes no progress for --stall
seconds stops and reports what it got. Exit 0 only if every flow is complete.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "protocol06"))
import mimi06 as m  # noqa: E402


def say(msg: str) -> None:
    print(f"drive: {msg}", flush=True)


class Http:
    """One keep-alive HTTP/1.1 connection to a loopback API."""

    def __init__(self, addr: str):
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.c = None

    def call(self, method: str, path: str, body: bytes = b"", timeout: float = 60):
        # Only a GET is tried again on a fresh connection: a POST might have been applied.
        for attempt in range(2 if method == "GET" else 1):
            if self.c is None:
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            try:
                self.c.request(method, path, body=body, headers={"Host": f"{self.host}:{self.port}"})
                r = self.c.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.c.close()
                self.c = None
                if attempt or method != "GET":
                    raise
        raise AssertionError("unreachable")


class Node:
    """The node's loopback client API (see crates/relay-node/src/client.rs)."""

    def __init__(self, admin: str):
        self.api = Http(admin)
        self.after = 0
        self.items = []  # (room, text)

    def submit_batch(self, room: str, sender: str, texts: list[str]) -> list[tuple[int, bytes]]:
        out = b""
        r = room.encode()
        for t in texts:
            body = m.encode("SubmitMessageRequest", {
                "protocol": "mls10", "sendingUri": {"uri": sender},
                "appMessage": {"version": "mls10", "wire_format": "mls_private_message",
                               "private_message": {
                                   "group_id": r.hex(), "epoch": 1, "content_type": "application",
                                   "authenticated_data": "", "encrypted_sender_data": bytes(16).hex(),
                                   "ciphertext": t.encode().hex()}}})
            out += struct.pack(">H", len(r)) + r + struct.pack(">I", len(body)) + body
        status, body = self.api.call("POST", "/v1/client/submitBatch", out, timeout=120)
        if status != 200:
            raise RuntimeError(f"submitBatch: {status} {body[:200]!r}")
        answers, pos = [], 0
        while pos < len(body):
            code, n = struct.unpack(">HI", body[pos:pos + 6])
            answers.append((code, body[pos + 6:pos + 6 + n]))
            pos += 6 + n
        return answers

    def poll(self, wait_ms: int = 200) -> int:
        status, body = self.api.call(
            "GET", f"/v1/client/inbox?after={self.after}&max=1000&wait_ms={wait_ms}")
        if status != 200:
            raise RuntimeError(f"inbox: {status} {body[:200]!r}")
        pos, n = 0, 0
        while pos < len(body):
            offset, _accepted = struct.unpack(">QQ", body[pos:pos + 16])
            pos += 16
            strs = []
            for _ in range(2):
                (k,) = struct.unpack(">H", body[pos:pos + 2])
                strs.append(body[pos + 2:pos + 2 + k].decode())
                pos += 2 + k
            (k,) = struct.unpack(">I", body[pos:pos + 4])
            fanout = body[pos + 4:pos + 4 + k]
            pos += 4 + k
            msg = m.decode("FanoutMessage", fanout)["message"]
            pm = msg.get("private_message")
            text = bytes.fromhex(pm["ciphertext"]).decode("utf-8", "replace") if pm else "?"
            self.items.append((strs[1], text))
            self.after = offset
            n += 1
        return n

    def metric(self, name: str) -> float:
        """The sum of a counter's series in the node's /metrics (0 if absent)."""
        status, body = self.api.call("GET", "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def texts(self, room: str, prefix: str) -> list[str]:
        return [t for r, t in self.items if r == room and t.startswith(prefix)]


class PyPeer:
    def __init__(self, cmd: list[str], control: str, log_path: Path):
        self.cmd, self.log_path = cmd, log_path
        self.api = Http(control)
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                if self.api.call("GET", "/local/status", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Python peer exited with {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.1)
        raise RuntimeError("the Python peer did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.api.c = None

    def restart(self) -> None:
        say("restarting the Python peer (kill -9)")
        self.kill()
        self.start()

    def status(self) -> dict:
        return json.loads(self.api.call("GET", "/local/status")[1])

    def post(self, path: str) -> dict:
        status, body = self.api.call("POST", path)
        if status >= 300:
            raise RuntimeError(f"{path}: {status}")
        return json.loads(body)


def verdict(name: str, got: list[str], expected: list[str], extra: str = "") -> dict:
    want = set(expected)
    unique = list(dict.fromkeys(got))
    lost = len(want - set(got))
    dup = len(got) - len(unique)
    in_order = [t for t in unique if t in want] == sorted(t for t in unique if t in want)
    ok = lost == 0 and dup == 0 and in_order and len(unique) == len(expected)
    res = {"flow": name, "ok": ok, "expected": len(expected), "received": len(got), "lost": lost,
           "duplicated": dup, "in_order": in_order}
    say(f"{name}: {'OK' if ok else 'FAILED'}  expected {len(expected)}, received {len(got)}, lost {lost}, "
        f"duplicated {dup}, in order {in_order}{'  ' + extra if extra else ''}")
    return res


# What the peer serves (see peer.py): check-peers must see exactly these gaps and no other fault.
PEER_ENDPOINTS = {"notify", "submitMessage"}


def check_peers(cmd: str, node_domain: str) -> dict:
    """`mimi-relay check-peers --json` against the peer: it must be verified by the CA, read
    over HTTP/1.1, its own paths found in its directory, and seen to run by the draft's rules.
    The only fault allowed is the endpoints the peer does not implement."""
    argv = shlex.split(cmd)
    at = argv.index("--config")
    argv[at:at] = ["check-peers", "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    problems = []
    try:
        p = json.loads(out.stdout)["peers"][0]
    except (ValueError, KeyError, IndexError):
        say(f"check-peers: FAILED  no report (exit {out.returncode}): {out.stderr[-300:]!r}")
        return {"flow": "check-peers", "ok": False}
    ident = p.get("identity") or {}
    if ident.get("mode") != p.get("trust") or not ident.get("verified_as"):
        problems.append(f"identity {ident}")
    if p.get("http") != "1.1":
        problems.append(f"http {p.get('http')}")
    d = p.get("directory") or {}
    found = set((d.get("endpoints") or {}))
    if not d.get("served") or found != PEER_ENDPOINTS:
        problems.append(f"directory {d}")
    if any("/mimi/pl/" not in u and "/v1/" not in u for u in (d.get("endpoints") or {}).values()):
        problems.append(f"paths {d.get('endpoints')}")
    if (p.get("sequence") or {}).get("speaks") != "no":
        problems.append(f"sequence {p.get('sequence')}")
    kinds = {f.get("kind") for f in p.get("faults", [])}
    if not kinds <= {"endpoint_missing"}:
        problems.append(f"faults {p.get('faults')}")
    ok = not problems
    say(f"check-peers: {'OK' if ok else 'FAILED'}  {p.get('domain')} verified ({ident.get('mode')}), "
        f"HTTP/{p.get('http')}, endpoints {sorted(found)}, sequence {(p.get('sequence') or {}).get('speaks')}, "
        f"faults {sorted(k for k in kinds if k)}{'  ' + '; '.join(problems) if problems else ''}")
    return {"flow": "check-peers", "ok": ok, "report": p}


def wait_for(progress, done, stall: float, on_progress=None) -> None:
    """Poll until done() or no progress for `stall` seconds."""
    last, last_change = -1, time.time()
    while not done():
        n = progress()
        if n != last:
            last, last_change = n, time.time()
            if on_progress:
                on_progress(n)
        elif time.time() - last_change > stall:
            return
        time.sleep(0.05)


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--admin", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--node-domain", required=True)
    ap.add_argument("--hosted", required=True, help="room the node hosts, the peer follows")
    ap.add_argument("--remote", required=True, help="room the peer hosts, the node follows")
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--submits", type=int, default=1000)
    ap.add_argument("--stall", type=float, default=30)
    ap.add_argument("--replay", type=int, default=0, help="the peer's --replay")
    ap.add_argument("--flows", default="py-hub-notify,py-submit,node-submit,node-hub-notify")
    ap.add_argument("--peer-log", required=True)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--check-peers", help="the node's command line for check-peers, without "
                    "the subcommand: BIN --config FILE (run once the peer is up)")
    args = ap.parse_args(argv[:cut])
    flows = args.flows.split(",")

    node = Node(args.admin)
    peer = PyPeer(argv[cut + 1:], args.control, Path(args.peer_log))
    results = []
    peer.start()
    try:
        if args.check_peers:
            results.append(check_peers(args.check_peers, args.node_domain))
        n = args.messages
        if "py-hub-notify" in flows:
            expected = [f"pyhub-{i:06d}" for i in range(n)]
            peer.post(f"/local/generate?room={urllib.parse.quote(args.remote)}&count={n}&prefix=pyhub-")
            restarted = []

            def got_hub():
                node.poll()
                return len(node.texts(args.remote, "pyhub-"))

            def restart_once(k):
                if not restarted and k >= n // 3:
                    restarted.append(k)
                    peer.restart()

            wait_for(got_hub, lambda: len(set(node.texts(args.remote, "pyhub-"))) >= n and not node.poll(300),
                     args.stall, restart_once)
            hits = node.metric("mimi_relay_dedupe_hits_total")
            res = verdict("py-hub-notify", node.texts(args.remote, "pyhub-"), expected,
                          (f"(peer restarted after {restarted[0]}, " if restarted else "(no restart, ")
                          + f"node dedupe hits {hits})")
            if n >= 3 and not (restarted and restarted[0] < n):
                say("py-hub-notify: FAILED  the peer was not restarted in the middle of the flow")
                res["ok"] = False
            # The restarted peer resent --replay events it had already had acknowledged.
            if restarted and hits < args.replay:
                say(f"py-hub-notify: FAILED  expected at least {args.replay} duplicates answered, saw {hits}")
                res["ok"] = False
            results.append(res)

        if "py-submit" in flows:
            k = args.submits
            expected = [f"pysub-{i:06d}" for i in range(k)]
            peer.post(f"/local/submit?room={urllib.parse.quote(args.hosted)}&count={k}&prefix=pysub-")

            def got_sub():
                node.poll()
                return len(node.texts(args.hosted, "pysub-"))

            wait_for(got_sub, lambda: len(set(node.texts(args.hosted, "pysub-"))) >= k and not node.poll(300),
                     args.stall)
            st = peer.status()["submitted"].get(args.hosted, 0)
            results.append(verdict("py-submit", node.texts(args.hosted, "pysub-"), expected,
                                   f"(peer saw {st} accepted)"))

        sender = f"mimi://{args.node_domain}/u/alice"
        if "node-submit" in flows:
            k = args.submits
            expected = [f"nodesub-{i:06d}" for i in range(k)]
            refusals = {}
            for start in range(0, k, 250):
                for code, body in node.submit_batch(args.remote, sender, expected[start:start + 250]):
                    if code != 200:
                        key = f"{code} {body[:120].decode('utf-8', 'replace').strip()}"
                        refusals[key] = refusals.get(key, 0) + 1
                if refusals and start == 0:
                    break  # the path is down: one batch shows it
            texts = peer.status()["hub"].get(args.remote, {}).get("texts", [])
            extra = f"(node answered: {refusals})" if refusals else ""
            results.append(verdict("node-submit", [t for t in texts if t.startswith("nodesub-")],
                                   expected, extra))

        if "node-hub-notify" in flows:
            expected = [f"nodehub-{i:06d}" for i in range(n)]
            refusals = {}
            restarted = []

            def delivered():
                return [t for t in peer.status()["follow"].get(args.hosted, {}).get("delivered", [])
                        if t.startswith("nodehub-")]

            # Once half is submitted (the node still sending it, in batches of FanoutMessages),
            # the peer is killed; the rest is submitted while it is down, then it starts again.
            # So the outage is in the middle of the flow however fast either side is.
            batch = min(1000, max(1, n // 4))
            for start in range(0, n, batch):
                for code, body in node.submit_batch(args.hosted, sender, expected[start:start + batch]):
                    if code != 200:
                        key = f"{code} {body[:120].decode('utf-8', 'replace').strip()}"
                        refusals[key] = refusals.get(key, 0) + 1
                if not restarted and start + batch >= n // 2 and n >= 3:
                    restarted.append(start + batch)
                    say(f"killing the Python peer (kill -9) with {start + batch} submitted")
                    peer.kill()
            if restarted:
                say("starting the Python peer again")
                peer.start()
            wait_for(lambda: len(delivered()), lambda: len(set(delivered())) >= n, args.stall)
            st = peer.status()["follow"].get(args.hosted, {})
            extra = f"(peer killed with {restarted[0]} submitted; " if restarted else "(no restart; "
            extra += (f"{st.get('duplicates', 0)} duplicate FanoutMessages answered 201, "
                      f"{st.get('duplicates_in_new_bodies', 0)} of them in bodies not seen before")
            extra += f"; node refused {refusals})" if refusals else ")"
            res = verdict("node-hub-notify", delivered(), expected, extra)
            if n >= 3 and not (restarted and restarted[0] < n):
                say("node-hub-notify: FAILED  the peer was not restarted in the middle of the flow")
                res["ok"] = False
            if st.get("duplicates_in_new_bodies", 0):
                say("node-hub-notify: FAILED  a resend was not byte-identical to what was sent before, "
                    "so a follower applying the draft's same-body rule would deliver it twice")
                res["ok"] = False
            results.append(res)
    finally:
        peer.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
