#!/usr/bin/env python3
"""A protocol-06 HTTPS peer that shares no code with mimi-relay: Python standard library only
(http.server, http.client, ssl), bodies through interop/protocol06/mimi06.py.

    peer.py --domain py.example --listen 127.0.0.1:8601 --cert C --key K --trust T \
            --peer a.example=127.0.0.1:8441 --state DIR --control 127.0.0.1:8602 \
            [--host-room mimi://py.example/r/pyroom=a.example] \
            [--follow mimi://a.example/r/lobby] [--replay N] [--compat]

What it does, by the draft's rules only (no MIMI-Seq / MIMI-Next-Seq, HTTP/1.1, no ALPN):
* serves `GET /.well-known/mimi-protocol-directory` naming its own paths: an absolute URL
  without a port for notify, a relative one for submitMessage; `--compat` also answers the
  `/v1/{endpoint}/{param}` paths mimi-relay uses when it reads no directory;
* as **hub** of each --host-room: accepts submitMessage from a provider (200 with a
  SubmitMessageResponse; a retry of the same body gets the first answer), orders events in a
  durable log, and fans each out to every follower but the sender with `/notify`, one request
  in flight per (room, follower), one FanoutMessage per request, retrying the same bytes
  until 201 (honouring Retry-After);
* as **follower** of each --follow room: accepts `/notify` from the room's hub only, splits
  the body into FanoutMessages, delivers each one whose hash it has not seen (durable log),
  and answers 201 either way;
* mutual TLS: peers are authenticated by a certificate chaining to --trust (a CA bundle, or
  a peer's self-signed certificate) whose DNS name is a --peer domain, and `From` must match.

A loopback-only plain HTTP control port (--control) lets a test driver inject local traffic
and read what happened: POST /local/generate?room=R&count=N (hub: N messages from a local
user), POST /local/submit?room=R&count=N&prefix=P (as a provider of a user in R, submit N
messages to R's hub), GET /local/status (JSON). State survives a restart (even kill -9): logs
are appended and flushed before anything is answered.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import json
import os
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "protocol06"))
import mimi06 as m  # noqa: E402

MAX_BODY = 1 << 20
DEDUP_WINDOW = 1 << 17  # FanoutMessage hashes remembered per room
ENDPOINTS = ("notify", "submitMessage")


def log(msg: str) -> None:
    print(f"py-peer: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Durable logs: length-prefixed records, flushed and fsynced before an answer goes out.


class RecordLog:
    def __init__(self, path: Path):
        self.path = path
        self.records: list[bytes] = []
        if path.exists():
            data = path.read_bytes()
            pos = 0
            while pos + 4 <= len(data):
                (n,) = struct.unpack(">I", data[pos:pos + 4])
                if pos + 4 + n > len(data):
                    break  # a torn last write: it was never acknowledged
                self.records.append(data[pos + 4:pos + 4 + n])
                pos += 4 + n
            if pos != len(data):
                with open(path, "r+b") as f:
                    f.truncate(pos)
        self.f = open(path, "ab")

    def append(self, *recs: bytes) -> None:
        """Append records durably (one fsync for all of them)."""
        self.f.write(b"".join(struct.pack(">I", len(r)) + r for r in recs))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.records.extend(recs)


class Counter:
    """A durable integer (the number of events a follower acknowledged)."""

    def __init__(self, path: Path):
        self.path = path
        self.value = int(path.read_text()) if path.exists() else 0

    def set(self, v: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(v))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.value = v


def key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# State


class Peer:
    def __init__(self, args):
        self.args = args
        self.domain = args.domain
        self.peers = dict(p.split("=", 1) for p in args.peer)  # domain -> host:port
        self.state = Path(args.state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Condition()
        self.stop = threading.Event()
        # Hub: room -> followers, durable event log (FanoutMessage bytes + the sender's
        # provider), acknowledged counters per follower, and answers already given.
        self.hosted = {}
        for spec in args.host_room:
            room, followers = spec.split("=", 1)
            self.hosted[room] = followers.split(",")
        self.events = {r: RecordLog(self.state / f"hub-{key(r)}.log") for r in self.hosted}
        self.acked = {(r, f): Counter(self.state / f"hub-{key(r)}-{f}.acked")
                      for r, fs in self.hosted.items() for f in fs}
        # --replay: after a restart, send the last N acknowledged events again, as a hub
        # that cannot tell whether its last acknowledgements were recorded would; the
        # follower must answer 201 and not deliver them twice (section 5.5).
        for c in self.acked.values():
            c.value = max(0, c.value - args.replay)
        self.answers = {}  # (provider, sha256(body)) -> SubmitMessageResponse bytes
        self.last_ts = 0
        for r, lg in self.events.items():
            for rec in lg.records:
                origin, fanout, answer_key = self._unpack_event(rec)
                ts = m.FanoutMessage.dec(m.Reader(fanout))["timestamp"]
                self.last_ts = max(self.last_ts, ts)
                if answer_key:
                    self.answers[(origin, answer_key)] = self._accepted(ts)
        # Follower: room -> one durable log of delivered FanoutMessages (b"M" + bytes) and of
        # whole /notify bodies seen (b"B" + SHA-256), written together in one append.
        self.followed = list(args.follow)
        self.delivered = {r: RecordLog(self.state / f"follow-{key(r)}.log") for r in self.followed}
        self.seen = {r: {} for r in self.followed}
        self.bodies = {r: {} for r in self.followed}
        for r, lg in self.delivered.items():
            for rec in lg.records:
                if rec[:1] == b"M":
                    self._remember(self.seen[r], hashlib.sha256(rec[1:]).digest())
                else:
                    self._remember(self.bodies[r], rec[1:])
        self.duplicates = {r: 0 for r in self.followed}
        self.rebatched = {r: 0 for r in self.followed}
        self.submitted = {}  # room -> count of our local submissions accepted by the hub
        self.clients = PeerClients(self)

    @staticmethod
    def _pack_event(origin: str, fanout: bytes, answer_key: bytes) -> bytes:
        o = origin.encode()
        return struct.pack(">H", len(o)) + o + struct.pack(">H", len(answer_key)) + answer_key + fanout

    @staticmethod
    def _unpack_event(rec: bytes):
        (n,) = struct.unpack(">H", rec[:2])
        origin = rec[2:2 + n].decode()
        (k,) = struct.unpack(">H", rec[2 + n:4 + n])
        answer_key = rec[4 + n:4 + n + k]
        return origin, rec[4 + n + k:], answer_key

    @staticmethod
    def _remember(seen: dict, h: bytes) -> None:
        seen[h] = True
        if len(seen) > DEDUP_WINDOW:
            del seen[next(iter(seen))]  # dicts keep insertion order: drop the oldest

    @staticmethod
    def _accepted(ts: int) -> bytes:
        return m.encode("SubmitMessageResponse", {
            "protocol": "mls10", "statusCode": "accepted", "accepted_timestamp": ts, "frank": None})

    def accept_events(self, room: str, origin: str, app_messages: list, answer_key: bytes = b"") -> bytes:
        """Order application messages in a hosted room (durably, before answering); returns
        the submit answer. `answer_key` (a submission's body hash) makes a retry idempotent."""
        with self.lock:
            if answer_key and (origin, answer_key) in self.answers:
                return self.answers[(origin, answer_key)]
            ts = max(int(time.time() * 1000), self.last_ts)
            self.last_ts = ts
            recs = [self._pack_event(origin, m.encode("FanoutMessage", {
                "timestamp": ts, "message": msg, "frank": None}), answer_key) for msg in app_messages]
            self.events[room].append(*recs)
            answer = self._accepted(ts)
            if answer_key:
                self.answers[(origin, answer_key)] = answer
            self.lock.notify_all()
            return answer

    def status(self) -> dict:
        with self.lock:
            hub = {}
            for r, lg in self.events.items():
                texts = [text_of(self._unpack_event(rec)[1]) for rec in lg.records]
                hub[r] = {"events": len(lg.records), "texts": texts,
                          "acked": {f: self.acked[(r, f)].value for f in self.hosted[r]}}
            follow = {r: {"delivered": [text_of(rec[1:]) for rec in lg.records if rec[:1] == b"M"],
                          "duplicates": self.duplicates[r],
                          "duplicates_in_new_bodies": self.rebatched[r]}
                      for r, lg in self.delivered.items()}
            return {"hub": hub, "follow": follow, "submitted": dict(self.submitted)}


def text_of(fanout: bytes) -> str:
    """The demo payload: the PrivateMessage ciphertext as text (mimi-relay client's convention)."""
    msg = m.FanoutMessage.dec(m.Reader(fanout))["message"]
    pm = msg.get("private_message")
    return bytes.fromhex(pm["ciphertext"]).decode("utf-8", "replace") if pm else msg["wire_format"]


def app_message(room: str, text: str) -> dict:
    """An MLS PrivateMessage frame whose ciphertext is the text (as `mimi-relay client send`)."""
    return {"version": "mls10", "wire_format": "mls_private_message", "private_message": {
        "group_id": room.encode().hex(), "epoch": 1, "content_type": "application",
        "authenticated_data": "", "encrypted_sender_data": bytes(16).hex(),
        "ciphertext": text.encode().hex()}}


# ---------------------------------------------------------------------------------------
# Outgoing requests: directory, URL templates, one keep-alive HTTP/1.1 connection per peer.


class PeerConnection(http.client.HTTPSConnection):
    """Connects to the configured address; TLS server name and certificate check use the
    provider domain (as `curl --resolve` would)."""

    def __init__(self, host: str, port: int, domain: str, ctx: ssl.SSLContext):
        super().__init__(host, port, context=ctx, timeout=10)
        self.domain = domain

    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.domain)


class PeerClients:
    def __init__(self, peer: Peer):
        self.peer = peer
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(peer.args.cert, peer.args.key)
        ctx.load_verify_locations(peer.args.trust)
        # A peer's self-signed certificate in --trust is its own anchor (pinning).
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        self.ctx = ctx
        self.local = threading.local()
        self.directories = {}

    def _conn(self, domain: str) -> "PeerConnection":
        conns = self.local.__dict__.setdefault("conns", {})
        if domain not in conns:
            host, port = self.peer.peers[domain].rsplit(":", 1)
            conns[domain] = PeerConnection(host, int(port), domain, self.ctx)
        return conns[domain]

    def request(self, domain: str, method: str, path: str, body: bytes = b""):
        c = self._conn(domain)
        headers = {"Host": domain, "From": f"mimi@{self.peer.domain}",
                   "Content-Type": "application/octet-stream"}
        try:
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read(MAX_BODY + 1)
        except (OSError, http.client.HTTPException):
            c.close()
            self.local.conns.pop(domain, None)
            raise

    def url(self, domain: str, endpoint: str, param: str) -> str:
        """The path for an endpoint at a peer, from its directory (fetched once), else /v1."""
        d = self.directories.get(domain)
        if d is None:
            status, _, body = self.request(domain, "GET", "/.well-known/mimi-protocol-directory")
            d = json.loads(body) if status == 200 else {}
            self.directories[domain] = d
            log(f"directory of {domain}: {d if d else 'none (status %d), using /v1' % status}")
        template = d.get(endpoint) or f"/v1/{endpoint}/{{param}}"
        start, end = template.index("{"), template.index("}")
        target = template[:start] + urllib.parse.quote(param, safe="") + template[end + 1:]
        parsed = urllib.parse.urlsplit(target)
        return parsed.path + (f"?{parsed.query}" if parsed.query else "")

    def post(self, domain: str, endpoint: str, param: str, body: bytes):
        return self.request(domain, "POST", self.url(domain, endpoint, param), body)


def retry_after(headers: dict) -> float:
    try:
        return min(float(headers.get("Retry-After", "0.2")), 5.0)
    except ValueError:
        return 0.2


def fanout_loop(peer: Peer, room: str, follower: str) -> None:
    """One /notify in flight per (room, follower); each event resent until 201."""
    acked = peer.acked[(room, follower)]
    backoff = 0.05
    while not peer.stop.is_set():
        with peer.lock:
            while acked.value >= len(peer.events[room].records) and not peer.stop.is_set():
                peer.lock.wait(0.5)
            if peer.stop.is_set():
                return
            origin, fanout, _ = peer._unpack_event(peer.events[room].records[acked.value])
        if origin == follower:  # the hub does not echo a provider's own message back to it
            acked.set(acked.value + 1)
            continue
        try:
            status, headers, _ = peer.clients.post(follower, "notify", room, fanout)
        except (OSError, http.client.HTTPException, ValueError) as e:
            log(f"notify {room} -> {follower}: {type(e).__name__}: {e}")
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            continue
        if status == 201:
            acked.set(acked.value + 1)
            backoff = 0.05
        else:
            log(f"notify {room} -> {follower}: {status}")
            time.sleep(max(retry_after(headers), backoff))
            backoff = min(backoff * 2, 2.0)


def submit_loop(peer: Peer, room: str, count: int, prefix: str) -> None:
    """As a provider of a user in `room`: submit `count` messages to its hub, in order."""
    hub = urllib.parse.urlsplit(room).hostname
    sender = {"uri": f"mimi://{peer.domain}/u/pat"}
    for i in range(count):
        body = m.encode("SubmitMessageRequest", {
            "protocol": "mls10", "appMessage": app_message(room, f"{prefix}{i:06d}"),
            "sendingUri": sender})
        while not peer.stop.is_set():
            try:
                status, headers, answer = peer.clients.post(hub, "submitMessage", room, body)
            except (OSError, http.client.HTTPException, ValueError) as e:
                log(f"submit {room}: {type(e).__name__}: {e}")
                time.sleep(0.2)
                continue
            if status == 200 and m.decode("SubmitMessageResponse", answer)["statusCode"] == "accepted":
                with peer.lock:
                    peer.submitted[room] = peer.submitted.get(room, 0) + 1
                break
            log(f"submit {room}: {status} {answer[:80]!r}")
            time.sleep(retry_after(headers))


# ---------------------------------------------------------------------------------------
# Serving


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
    peer: Peer = None

    def log_message(self, fmt, *a):
        if self.peer.args.verbose:
            log(fmt % a)

    def log_error(self, fmt, *a):
        # Protocol errors are always worth a line (e.g. an HTTP/2 preface sent without ALPN).
        log(f"{self.client_address[0]}: {fmt % a}")

    def answer(self, code: int, body: bytes = b"", ctype: str = "application/octet-stream", extra=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype if body else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def refuse(self, code: int, why: str, extra=None):
        self.answer(code, why.encode(), "text/plain", extra)

    def authenticated(self):
        """The provider the client certificate names, if it is a configured peer."""
        cert = self.connection.getpeercert()
        names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"] if cert else []
        for n in names:
            if n in self.peer.peers:
                return n
        return None

    def route(self):
        """(endpoint, param) for this path, or None."""
        path = urllib.parse.urlsplit(self.path).path
        for ep in ENDPOINTS:
            for prefix in [f"/mimi/pl/{ep}/"] + ([f"/v1/{ep}/"] if self.peer.args.compat else []):
                if path.startswith(prefix):
                    return ep, urllib.parse.unquote(path[len(prefix):], errors="strict")
        return None

    def do_GET(self):
        if urllib.parse.urlsplit(self.path).path != "/.well-known/mimi-protocol-directory":
            return self.refuse(405 if self.route() else 404, "not found")
        if self.peer.args.compat:
            base = f"https://{self.peer.domain}/v1"
            d = {ep: f"{base}/{ep}/{{roomId}}" for ep in ENDPOINTS}
        else:
            # Absolute without a port, and relative: both shapes the draft allows.
            d = {"notify": f"https://{self.peer.domain}/mimi/pl/notify/{{roomId}}",
                 "submitMessage": "/mimi/pl/submitMessage/{roomId}"}
        self.answer(200, json.dumps(d).encode(), "application/json")

    def do_POST(self):
        route = self.route()
        length = self.headers.get("Content-Length")
        if route is None:
            return self.refuse(404, "no such endpoint")
        if length is None or not length.isdigit():
            return self.refuse(411, "length required")
        if int(length) > MAX_BODY:
            self.close_connection = True
            return self.refuse(413, "body too large")
        body = self.rfile.read(int(length))
        host = (self.headers.get("Host") or "").split(":", 1)[0]  # port ignored
        if host != self.peer.domain:
            return self.refuse(421, f"this server answers for {self.peer.domain}")
        origin = self.authenticated()
        if origin is None or self.headers.get("From") != f"mimi@{origin}":
            return self.refuse(403, "From does not match the client certificate")
        endpoint, param = route
        if endpoint == "notify":
            return self.notify(origin, param, body)
        return self.submit(origin, param, body)

    def notify(self, origin: str, room: str, body: bytes):
        p = self.peer
        if room not in p.delivered:
            return self.refuse(404, "room not followed")
        if urllib.parse.urlsplit(room).hostname != origin:
            return self.refuse(403, "only the room's hub may notify")
        try:
            r = m.Reader(body)
            parts = []
            while not r.done():
                start = r.pos
                m.FanoutMessage.dec(r)
                parts.append(body[start:r.pos])
            if not parts:
                raise m.DecodeError("empty body")
        except m.DecodeError as e:
            return self.refuse(400, f"malformed FanoutMessage: {e}")
        with p.lock:
            new = []
            for part in parts:
                h = hashlib.sha256(part).digest()
                if h in p.seen[room]:
                    p.duplicates[room] += 1
                    continue
                new.append(part)
                p._remember(p.seen[room], h)
            # The draft's rule is "the same request body": count repeats that a follower
            # comparing whole bodies only would have delivered twice (a resend re-batched).
            body_hash = hashlib.sha256(body).digest()
            known_body = body_hash in p.bodies[room]
            if len(new) < len(parts) and not known_body:
                p.rebatched[room] += len(parts) - len(new)
            recs = [b"M" + part for part in new] + ([] if known_body else [b"B" + body_hash])
            if recs:
                p.delivered[room].append(*recs)  # durable before the 201
            p._remember(p.bodies[room], body_hash)
        self.answer(201)  # duplicates too (section 5.5)

    def submit(self, origin: str, room: str, body: bytes):
        p = self.peer
        if room not in p.hosted:
            return self.refuse(404, "no such room here")
        try:
            req = m.decode("SubmitMessageRequest", body)
        except m.DecodeError as e:
            return self.refuse(400, f"malformed SubmitMessageRequest: {e}")
        sender = urllib.parse.urlsplit(req["sendingUri"]["uri"]).hostname
        if sender != origin:
            return self.refuse(403, "sendingUri is not a user of the sending provider")
        if origin not in p.hosted[room] or m.mls_kind(req["appMessage"]) != "application":
            answer = m.encode("SubmitMessageResponse", {"protocol": "mls10", "statusCode": "notAllowed"})
            return self.answer(200, answer)
        answer = p.accept_events(room, origin, [req["appMessage"]], hashlib.sha256(body).digest())
        self.answer(200, answer)


class TlsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, ctx):
        super().__init__(addr, handler)
        self.ctx = ctx

    def finish_request(self, request, client_address):
        # The handshake runs in the connection's own thread, bounded in time.
        request.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log(f"TLS handshake from {client_address[0]} failed: {e}")
            return
        tls.settimeout(60)
        self.RequestHandlerClass(tls, client_address, self)


class Control(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    peer: Peer = None

    def log_message(self, fmt, *a):
        pass

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/local/status":
            return self.reply(200, self.peer.status())
        self.reply(404, {})

    def do_POST(self):
        u = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        p = self.peer
        room, count, prefix = q.get("room", ""), int(q.get("count", "0")), q.get("prefix", "py-")
        if u.path == "/local/generate" and room in p.hosted:
            p.accept_events(room, p.domain, [app_message(room, f"{prefix}{i:06d}") for i in range(count)])
            return self.reply(200, {"generated": count})
        if u.path == "/local/submit":
            threading.Thread(target=submit_loop, args=(p, room, count, prefix), daemon=True).start()
            return self.reply(202, {"submitting": count})
        self.reply(404, {})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--listen", required=True, help="host:port for HTTPS")
    ap.add_argument("--control", required=True, help="loopback host:port for the control API")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--trust", required=True, help="PEM: a CA bundle or peers' self-signed certificates")
    ap.add_argument("--peer", action="append", default=[], help="DOMAIN=HOST:PORT")
    ap.add_argument("--host-room", action="append", default=[], help="ROOM=FOLLOWER[,FOLLOWER]")
    ap.add_argument("--follow", action="append", default=[], help="ROOM hosted by a peer")
    ap.add_argument("--state", required=True)
    ap.add_argument("--replay", type=int, default=0, help="resend the last N acknowledged events at start")
    ap.add_argument("--compat", action="store_true", help="also serve mimi-relay's /v1 paths")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    peer = Peer(args)
    Handler.peer = Control.peer = peer
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.trust)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS; no ALPN is configured, so none is chosen
    host, port = args.listen.rsplit(":", 1)
    server = TlsServer((host, int(port)), Handler, ctx)
    chost, cport = args.control.rsplit(":", 1)
    if chost not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("--control must be a loopback address")
    control = http.server.ThreadingHTTPServer((chost, int(cport)), Control)
    control.daemon_threads = True
    for room, followers in peer.hosted.items():
        for f in followers:
            threading.Thread(target=fanout_loop, args=(peer, room, f), daemon=True).start()
    threading.Thread(target=control.serve_forever, daemon=True).start()
    log(f"{args.domain} on {args.listen} (control {args.control}), hosting {list(peer.hosted)}, "
        f"following {peer.followed}{', compat /v1 paths' if args.compat else ''}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
