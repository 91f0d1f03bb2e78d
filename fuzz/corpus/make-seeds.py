#!/usr/bin/env python3
"""Writes the seed inputs under fuzz/corpus/<target>/ (small, valid or nearly valid inputs,
in each target's input format). Run from anywhere; rewrites the same files each time."""
import base64, json, os, random, struct

HERE = os.path.dirname(os.path.abspath(__file__))

def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def b64(b):
    return base64.b64encode(b).decode().rstrip("=")

# matrix_send: first byte even = Authorization header value, odd = /send body.
hdr = ('X-Matrix origin="b.example",destination="a.example",key="ed25519:k1",'
       'sig="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/ABCDEFGHIJKLMNOPQRSTUVWXYZabc"')
put("matrix_send", "header", b"\x00" + hdr.encode())
put("matrix_send", "header-no-destination", b"\x00" + b'X-Matrix origin=b.example,key="ed25519:k1",sig="AAAA"')
def req(i, part, parts, body, endpoint="notify", seq=1):
    return {"edu_type": "org.mimi-relay.request", "content": {
        "id": str(i), "endpoint": endpoint, "target": "mimi://a.example/r/club",
        "seq": seq, "part": part, "parts": parts, "body": b64(body)}}
txn = {"origin": "b.example", "origin_server_ts": 1700000000000, "pdus": [],
       "edus": [req(1, 0, 1, b"\x01\x02\x03"), req(2, 0, 2, b"abc", "submitMessage", None),
                req(2, 1, 2, b"def", "submitMessage", None),
                {"edu_type": "m.typing", "content": {"room_id": "!x:b.example"}}]}
for e in txn["edus"]:
    if e["content"].get("seq") is None:
        e["content"].pop("seq", None)
put("matrix_send", "send", b"\x01" + json.dumps(txn).encode())
put("matrix_send", "send-empty", b"\x01" + b'{"origin":"b.example","origin_server_ts":1}')
put("matrix_send", "send-deep", b"\x01" + b'{"origin":"b.example","origin_server_ts":1,"pdus":[' + b"[" * 90 + b"]" * 90 + b"]}")

# api_batch: submitBatch bodies and inbox answers.
def batch(items):
    out = b""
    for room, body in items:
        out += struct.pack(">H", len(room)) + room.encode() + struct.pack(">I", len(body)) + body
    return out
put("api_batch", "one", batch([("mimi://a.example/r/club", b"\x01" + b"x" * 20)]))
put("api_batch", "three", batch([("mimi://a.example/r/club", b"a"), ("mimi://b.example/r/x", b""),
                                 ("mimi://a.example/r/club", b"bb")]))
def inbox(recs):
    out = b""
    for off, ms, frm, room, fan in recs:
        out += struct.pack(">QQ", off, ms)
        out += struct.pack(">H", len(frm)) + frm.encode()
        out += struct.pack(">H", len(room)) + room.encode()
        out += struct.pack(">I", len(fan)) + fan
    return out
put("api_batch", "inbox", inbox([(1, 1700000000000, "b.example", "mimi://b.example/r/x", b"\x00\x01fanout"),
                                 (2, 1700000000001, "a.example", "mimi://a.example/r/club", b"")]))

# mls_commit: mode, pick, then mode-specific bytes (see the target).
for pick in range(4):
    put("mls_commit", f"valid-{pick}", bytes([1, pick]))
    put("mls_commit", f"flip-{pick}", bytes([1, pick, 0, 40, 0x01]))
    put("mls_commit", f"cut-{pick}", bytes([2, pick, 200]))
    put("mls_commit", f"splice-{pick}", bytes([3, pick, 128, 0, 0, 0, 0]))
put("mls_commit", "raw", bytes([0, 0]) + b"\x00\x01\x00\x01" + b"\x00" * 16)

# xmpp_scan: chunk size, then a component stream.
head = ("<stream:stream xmlns='jabber:component:accept' "
        "xmlns:stream='http://etherx.jabber.org/streams' to='a.example'>")
iq = ("<iq type='set' id='1' from='b.example' to='a.example'>"
      "<mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='mimi://a.example/r/club' seq='1'>"
      "AAECAw==</mimi></iq>")
res = "<iq type='result' id='1'><mimi xmlns='urn:mimi-relay:0' status='201' next-seq='2'/></iq>"
for chunk in (1, 7, 255):
    put("xmpp_scan", f"stream-{chunk}", bytes([chunk]) + (head + iq + res + "<r xmlns='urn:xmpp:sm:3'/></stream:stream>").encode())
put("xmpp_scan", "deep", bytes([64]) + (head + "<a>" * 40 + "</a>" * 40).encode())
# The fast path's shapes (the `<mimi/>` text read without the DOM), and near misses.
fast = ("<iq from=\"b.example\" id=\"2\" type=\"set\"><mimi target=\"t&amp;'>\" "
        "endpoint='notify' xmlns='urn:mimi-relay:0' >\r\n AAECAw==\r\n</mimi ></iq>"
        "<iq type='error' id='3'><error type='wait'><unexpected-request "
        "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><mimi xmlns='urn:mimi-relay:0' "
        "status='425'>QUJD</mimi></error></iq>"
        "<iq type='set' id='4'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'>"
        "QU&#74;D</mimi></iq>")
put("xmpp_scan", "fast-path", bytes([13]) + (head + fast + "</stream:stream>").encode())

# Structure-aware targets read their input through `arbitrary`: any bytes are an input.
rng = random.Random(14)
for t in ("https_request", "core_sequences"):
    for i, n in enumerate((16, 64, 256, 1024)):
        put(t, f"random-{i}", bytes(rng.randrange(256) for _ in range(n)))
put("https_request", "ascii", b"\x00\x09a.example/v1/notify/mimi%3A%2F%2Fa.example%2Fr%2Fclub" + b"\x01" * 40)

# mimi_content: the draft's examples, as the interop suite has them.
ex = os.path.join(HERE, "..", "..", "interop", "mimi-content-examples")
for name in sorted(os.listdir(ex)):
    if name.endswith(".cbor"):
        with open(os.path.join(ex, name), "rb") as f:
            put("mimi_content", name[:-5], f.read())
