"""Our .proto files state the same wire contract as the E2B SDK's own descriptors: every
package, message, field (name, number, type, label, oneof), enum value and method."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import backend.envd.connect

PROTO_DIR = Path(backend.envd.connect.__file__).with_name("proto")

DUMP = r"""
import json
from e2b.envd.process import process_pb
from e2b.envd.filesystem import filesystem_pb

SCALARS = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
           7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32",
           16: "sfixed64", 17: "sint32", 18: "sint64"}

def is_map(m):
    return m.has_field("options") and m.options.map_entry

def kind(f):
    return f.type_name.lstrip(".") if int(f.type) in (11, 14) else SCALARS[int(f.type)]

def message(m, scope, out):
    name = f"{scope}.{m.name}"
    maps = {f"{name}.{n.name}": n for n in m.nested_type if is_map(n)}
    fields = {}
    for f in m.field:
        t = kind(f)
        label = "repeated" if int(f.label) == 3 else ("optional" if f.proto3_optional else "")
        if t in maps:
            entry = {e.name: kind(e) for e in maps[t].field}
            t, label = f"map<{entry['key']},{entry['value']}>", ""
        real = f.has_field("oneof_index") and not f.proto3_optional
        fields[f.name] = [f.number, t, label, m.oneof_decl[f.oneof_index].name if real else None]
    out["messages"][name] = fields
    for n in m.nested_type:
        if not is_map(n):
            message(n, name, out)
    for e in m.enum_type:
        out["enums"][f"{name}.{e.name}"] = {v.name: v.number for v in e.value}

out = {"messages": {}, "enums": {}, "services": {}}
for module in (process_pb, filesystem_pb):
    p = module.desc().proto
    for m in p.message_type:
        message(m, p.package, out)
    for e in p.enum_type:
        out["enums"][f"{p.package}.{e.name}"] = {v.name: v.number for v in e.value}
    for s in p.service:
        out["services"][f"{p.package}.{s.name}"] = {
            x.name: [x.input_type.lstrip("."), x.output_type.lstrip("."),
                     bool(x.client_streaming), bool(x.server_streaming)]
            for x in s.method
        }
print(json.dumps(out))
"""

TOKEN = re.compile(r"//[^\n]*|[A-Za-z_][\w.]*|\d+|<[^>]*>|[{}();=]|\S")


def parse_proto(text: str) -> dict[str, Any]:
    """Just enough of proto3 for our two files; unresolved type names are a test failure."""
    tokens = [t for t in TOKEN.findall(text) if not t.startswith("//")]
    out: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}
    package = ""
    scopes: list[tuple[str, str]] = []  # (kind, full name or oneof name)
    raw_fields: list[tuple[str, str, str, int, str, str | None]] = []
    i = 0

    def scope_name() -> str:
        names = [n for k, n in scopes if k in ("message", "enum", "service")]
        return names[-1] if names else package

    while i < len(tokens):
        t = tokens[i]
        if t in ("syntax", "import"):
            i = tokens.index(";", i) + 1
        elif t == "package":
            package, i = tokens[i + 1], i + 3
        elif t in ("message", "enum", "service"):
            name = f"{scope_name()}.{tokens[i + 1]}"
            scopes.append((t, name))
            if t == "message":
                out["messages"][name] = {}
            elif t == "enum":
                out["enums"][name] = {}
            else:
                out["services"][name] = {}
            i += 3
        elif t == "oneof":
            scopes.append(("oneof", tokens[i + 1]))
            i += 3
        elif t == "}":
            scopes.pop()
            i += 1
        elif t == "rpc":
            end = tokens.index(";", i)
            parts = tokens[i + 1 : end]
            name, rest = parts[0], parts[1:]
            cs = rest[1] == "stream"
            request = rest[2] if cs else rest[1]
            after = rest[rest.index("returns") + 1 :]
            ss = after[1] == "stream"
            response = after[2] if ss else after[1]
            out["services"][scope_name()][name] = [
                f"{package}.{request}",
                f"{package}.{response}",
                cs,
                ss,
            ]
            i = end + 1
        elif scopes and scopes[-1][0] == "enum":
            out["enums"][scope_name()][t] = int(tokens[i + 2])
            i += 4
        else:
            end = tokens.index(";", i)
            parts = tokens[i:end]
            label = parts[0] if parts[0] in ("optional", "repeated") else ""
            parts = parts[1:] if label else parts
            if parts[0] == "map":
                kind, name, number = "map" + parts[1].replace(" ", ""), parts[2], int(parts[4])
            else:
                kind, name, number = parts[0], parts[1], int(parts[3])
            oneof = scopes[-1][1] if scopes[-1][0] == "oneof" else None
            raw_fields.append((scope_name(), name, kind, number, label, oneof))
            i = end + 1

    known = set(out["messages"]) | set(out["enums"]) | {"google.protobuf.Timestamp"}
    for owner, name, kind, number, label, oneof in raw_fields:
        resolved = kind
        if not kind.startswith("map<") and (kind[0].isupper() or "." in kind):
            candidates = [f"{owner}.{kind}", f"{owner.rsplit('.', 1)[0]}.{kind}"]
            candidates += [f"{package}.{kind}", kind]
            found = [c for c in candidates if c in known]
            assert found, f"{owner}.{name}: unknown type {kind}"
            resolved = found[0]
        out["messages"][owner][name] = [number, resolved, label, oneof]
    return out


def test_our_protos_match_the_sdk_descriptors(sdk_python: Path) -> None:
    dumped = subprocess.run(
        [str(sdk_python), "-c", DUMP], capture_output=True, text=True, check=True
    )
    sdk = json.loads(dumped.stdout)
    ours: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}
    for path in sorted(PROTO_DIR.glob("*.proto")):
        parsed = parse_proto(path.read_text())
        for key in ours:
            ours[key].update(parsed[key])
    assert ours["services"] == sdk["services"]
    assert ours["enums"] == sdk["enums"]
    assert sorted(ours["messages"]) == sorted(sdk["messages"])
    for name, fields in sdk["messages"].items():
        assert ours["messages"][name] == fields, name


def test_the_parser_notices_a_wrong_field_number() -> None:
    text = (PROTO_DIR / "filesystem.proto").read_text()
    assert "bool is_symlink = 12;" in text
    wrong = parse_proto(text.replace("bool is_symlink = 12;", "bool is_symlink = 13;"))
    right = parse_proto(text)
    assert wrong["messages"]["filesystem.EntryInfo"] != right["messages"]["filesystem.EntryInfo"]
