#!/usr/bin/env python3
"""Generate keygate route-map include files from Appwrite's route data.

Reads reference/appwrite/{routes.tsv,routes-1.9.6.tsv,roles.tsv,scopes.tsv} and writes
config/appwrite.yaml (Appwrite main) and config/appwrite-1.9.6.yaml (release 1.9.6).

    python3 scripts/gen_appwrite_routes.py          # regenerate both files
    python3 scripts/gen_appwrite_routes.py --check  # exit 1 if a committed file is stale

Standard library only. Output is deterministic (TSV order throughout, no timestamps).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF = "reference/appwrite"

# (source TSV, output file, description for the header comment)
TARGETS = [
    (f"{REF}/routes.tsv", "config/appwrite.yaml", "Appwrite main"),
    (f"{REF}/routes-1.9.6.tsv", "config/appwrite-1.9.6.yaml", "Appwrite release 1.9.6"),
]

ROUTE_COLUMNS = [
    "method", "path", "scopes", "rate_limit", "rate_time_seconds",
    "rate_key", "auth", "service", "sdk_method",
]

# Scalars that are safe unquoted in YAML flow context and are not YAML 1.1/1.2 keywords.
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
_KEYWORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "none"}


def read_tsv(rel: str, columns: list[str] | None = None) -> list[dict[str, str]]:
    path = ROOT / rel
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{rel}: empty file")
    header = lines[0].split("\t")
    if columns is not None and header != columns:
        raise ValueError(f"{rel}: unexpected header {header}, want {columns}")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if "\r" in line:
            raise ValueError(f"{rel}:{n}: carriage return in line")
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{rel}:{n}: {len(fields)} fields, want {len(header)}")
        row = dict(zip(header, fields))
        row["_line"] = str(n)
        rows.append(row)
    return rows


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def quote(value: str) -> str:
    """A double-quoted YAML scalar."""
    if "$" in value:
        # keygate expands ${ENV} in every config string; nothing in the data needs a literal `$`.
        raise ValueError(f"refusing to emit `$` (keygate would treat it as an env reference): {value!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"control character in value: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def scalar(value: str) -> str:
    """A scope name: plain when safe, double-quoted otherwise."""
    if _PLAIN.match(value) and value.lower() not in _KEYWORDS:
        return value
    return quote(value)


def flow_list(items: list[str]) -> str:
    return "[" + ", ".join(scalar(i) for i in items) + "]"


def render(source_rel: str, description: str) -> str:
    scope_rows = read_tsv(f"{REF}/scopes.tsv")
    role_rows = read_tsv(f"{REF}/roles.tsv")
    routes = read_tsv(source_rel, ROUTE_COLUMNS)

    guests = [r for r in role_rows if r["role"] == "guests"]
    if len(guests) != 1:
        raise ValueError(f"{REF}/roles.tsv: expected exactly one `guests` row, found {len(guests)}")
    guest_scopes = split_list(guests[0]["scopes"])

    scopes: list[str] = []
    for r in scope_rows:
        name = r["scope"].strip()
        if not name:
            raise ValueError(f"{REF}/scopes.tsv:{r['_line']}: empty scope name")
        if name not in scopes:
            scopes.append(name)
    known = set(scopes)

    route_lines = []
    for r in routes:
        where = f"{source_rel}:{r['_line']}"
        method = r["method"].strip()
        path = r["path"]
        if not method or not path:
            raise ValueError(f"{where}: empty method or path")
        route_scopes = split_list(r["scopes"])
        if not route_scopes:
            raise ValueError(f"{where}: {method} {path} has no scopes (every /v1 route should)")
        for s in route_scopes:
            if s not in known:
                known.add(s)
                scopes.append(s)
        parts = [
            f"methods: [{scalar(method)}]",
            f"path: {quote(path)}",
            f"scopes: {flow_list(route_scopes)}",
        ]
        if r["rate_limit"].strip():
            limit = int(r["rate_limit"].strip())
            window = int(r["rate_time_seconds"].strip())
            key = re.sub(r",\s+", ",", r["rate_key"].strip())
            if limit <= 0 or window <= 0 or not key:
                raise ValueError(f"{where}: bad rate limit {limit}/{window}s key {key!r}")
            parts.append(f"rate_limit: {{ limit: {limit}, window: {window}s, key: {quote(key)} }}")
        elif r["rate_time_seconds"].strip() or r["rate_key"].strip():
            raise ValueError(f"{where}: rate window/key without a rate limit")
        route_lines.append("  - { " + ", ".join(parts) + " }")

    out = [
        f"# Generated by scripts/gen_appwrite_routes.py from {source_rel} — do not edit.",
        f"# Source: {description}, {len(routes)} routes.",
        f"guest_scopes: {flow_list(guest_scopes)}",
        f"scopes: {flow_list(scopes)}",
        "routes:",
        *route_lines,
    ]
    return "\n".join(out) + "\n"


def first_difference(old: str, new: str) -> str:
    old_lines, new_lines = old.split("\n"), new.split("\n")
    for i in range(max(len(old_lines), len(new_lines))):
        a = old_lines[i] if i < len(old_lines) else "<end of file>"
        b = new_lines[i] if i < len(new_lines) else "<end of file>"
        if a != b:
            return f"line {i + 1}:\n  committed: {a}\n  generated: {b}"
    return "(no line differs)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare committed files with what would be generated; exit 1 if stale")
    args = parser.parse_args()

    stale = False
    for source_rel, out_rel, description in TARGETS:
        text = render(source_rel, description)
        out = ROOT / out_rel
        if args.check:
            current = out.read_text(encoding="utf-8") if out.exists() else None
            if current is None:
                print(f"{out_rel}: missing (run python3 scripts/gen_appwrite_routes.py)")
                stale = True
            elif current != text:
                print(f"{out_rel}: stale, first difference at {first_difference(current, text)}")
                stale = True
            else:
                print(f"{out_rel}: up to date")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
            print(f"wrote {out_rel}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
