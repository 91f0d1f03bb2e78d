#!/usr/bin/env python3
"""The Python side of the protocol-06 cross-check.

    interop/protocol06/check.py [--rust FILE]

Checks that the committed vectors are what gen_vectors.py makes and that mimi06.py decodes
and re-encodes each byte for byte. With --rust FILE (written by mimi-wire's test
`protocol06_vectors`), decodes every encoding mimi-wire made and checks it is the value the
vector states and re-encodes to the same bytes. Exits non-zero on any finding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mimi06 as m

HERE = Path(__file__).resolve().parent


def main() -> int:
    args = sys.argv[1:]
    findings = []
    if subprocess.call([sys.executable, str(HERE / "gen_vectors.py"), "--check"]) != 0:
        findings.append("committed vectors are stale: run interop/protocol06/gen_vectors.py")
    index = json.loads((HERE / "vectors" / "index.json").read_text())
    by_name = {v["name"]: v for v in index["vectors"]}
    for v in index["vectors"]:
        data = (HERE / "vectors" / v["file"]).read_bytes()
        if v["struct"] == "FanoutMessage*":
            parts = [m.canonical_json(by_name[p]["value"]) for p in v["parts"]]
            got = [m.canonical_json(x) for x in m.decode_fanout_sequence(data)]
            if got != parts:
                findings.append(f"{v['name']}: sequence does not split into {v['parts']}")
            continue
        value = m.decode(v["struct"], data)
        if m.canonical_json(value) != m.canonical_json(v["value"]) or m.encode(v["struct"], value) != data:
            findings.append(f"{v['name']}: Python does not round-trip its own vector")
    checked = 0
    if args[:1] == ["--rust"] and len(args) == 2:
        for e in json.loads(Path(args[1]).read_text()):
            checked += 1
            data = bytes.fromhex(e["hex"])
            try:
                value = m.decode(e["struct"], data)
            except m.DecodeError as err:
                findings.append(f"{e['id']}: Python refuses mimi-wire's encoding: {err}")
                continue
            want = by_name[e["name"]]["value"]
            if m.canonical_json(value) != m.canonical_json(want):
                findings.append(f"{e['id']}: mimi-wire encoded a different value: {m.canonical_json(value)}")
            elif m.encode(e["struct"], value) != data:
                findings.append(f"{e['id']}: Python re-encodes mimi-wire's bytes differently")
        if checked == 0:
            findings.append(f"{args[1]}: no encodings to check")
    elif args:
        print(__doc__, file=sys.stderr)
        return 2
    for f in findings:
        print("finding: " + f, file=sys.stderr)
    print(f"protocol06 cross-check: {len(index['vectors'])} vectors, {checked} mimi-wire encodings, "
          f"{len(findings)} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
