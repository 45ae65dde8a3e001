"""A small stand-in for the Spotbot offline processor, and a field-test tree generator.

`python -m conveyor.examples.spotbot --bin B --time T --protocols P --output-dir D` reads
one field-test log (the binary log, its time index and its protocol list) and writes
`spotbot.db` into D: an `annotation_header` row for the log and one `annotation` row per
record found. Like the real program it reports progress and exits non-zero on bad input.

The binary log is a sequence of records: a 2-byte big-endian protocol id, a 2-byte
big-endian payload length, then the payload. The time file has one timestamp (seconds)
per record. The protocols file is XML: `<protocols><protocol id="1" name="GPS"/>…`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sqlite3
import struct
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

SCHEMA = """
CREATE TABLE annotation_header (
    header_id INTEGER PRIMARY KEY,
    source_bin TEXT NOT NULL,
    source_sha256 TEXT NOT NULL,
    processed_at REAL NOT NULL,
    record_count INTEGER NOT NULL,
    first_ts REAL,
    last_ts REAL
);
CREATE TABLE annotation (
    annotation_id INTEGER PRIMARY KEY,
    header_id INTEGER NOT NULL REFERENCES annotation_header(header_id),
    seq INTEGER NOT NULL,
    ts REAL,
    protocol TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload_len INTEGER NOT NULL,
    detail TEXT
);
"""


class LogError(ValueError):
    pass


def read_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise LogError(f"truncated record header at byte {pos}")
        proto, length = struct.unpack_from(">HH", data, pos)
        pos += 4
        if pos + length > len(data):
            raise LogError(f"record at byte {pos - 4} claims {length} bytes past the end")
        yield proto, data[pos : pos + length]
        pos += length


def read_protocols(path: Path) -> dict[int, str]:
    try:
        root = ET.parse(path).getroot()  # noqa: S314
    except ET.ParseError as exc:
        raise LogError(f"{path}: not valid XML: {exc}") from None
    return {int(p.get("id", "-1")): p.get("name", "?") for p in root.iter("protocol")}


def classify(payload: bytes) -> tuple[str, str]:
    if not payload:
        return "empty", ""
    zeros = payload.count(0)
    if zeros == len(payload):
        return "dropout", f"{len(payload)} zero bytes"
    if payload[:1] == b"!":
        # Its text as it reads: bytes that are not printable ASCII (NULs, which a text
        # column of PostgreSQL refuses, among them) and backslashes written as \xNN.
        text = payload[1:].decode("latin-1").strip(" \t\n\r\v\f")
        return "exception", "".join(
            c if c.isascii() and c.isprintable() and c != "\\" else f"\\x{ord(c):02x}" for c in text
        )
    return "data", f"checksum {sum(payload) & 0xFFFF:04x}"


def process(bin_path: Path, time_path: Path, protocols_path: Path, output_dir: Path) -> int:
    for p in (bin_path, time_path, protocols_path):
        if not p.is_file():
            raise LogError(f"missing input file: {p}")
    if not output_dir.is_dir():
        raise LogError(f"output directory does not exist: {output_dir}")
    data = bin_path.read_bytes()
    records = list(read_records(data))
    times = [float(line) for line in time_path.read_text().split() if line.strip()]
    protocols = read_protocols(protocols_path)
    total = len(records)
    print(f"conveyor:progress 0/{total} parsing {bin_path.name}", flush=True)
    tmp = output_dir / "spotbot.db.tmp"
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    try:
        db.executescript(SCHEMA)
        cur = db.execute(
            "INSERT INTO annotation_header (source_bin, source_sha256, processed_at, "
            "record_count, first_ts, last_ts) VALUES (?, ?, ?, ?, ?, ?)",
            (
                str(bin_path),
                hashlib.sha256(data).hexdigest(),
                time.time(),
                total,
                times[0] if times else None,
                times[-1] if times else None,
            ),
        )
        header_id = cur.lastrowid
        step = max(1, total // 20)
        for seq, (proto, payload) in enumerate(records):
            kind, detail = classify(payload)
            db.execute(
                "INSERT INTO annotation (header_id, seq, ts, protocol, kind, payload_len, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    header_id,
                    seq,
                    times[seq] if seq < len(times) else None,
                    protocols.get(proto, f"proto-{proto}"),
                    kind,
                    len(payload),
                    detail,
                ),
            )
            if (seq + 1) % step == 0:
                print(f"conveyor:progress {seq + 1}/{total} annotating", flush=True)
        db.commit()
    finally:
        db.close()
    # Readers see either no spotbot.db or a complete one.
    os.replace(tmp, output_dir / "spotbot.db")
    print(f"conveyor:progress {total}/{total} wrote spotbot.db", flush=True)
    return total


def write_log(folder: Path, records: int, seed: int = 0) -> Path:
    """Write one field-test log (bin, time, protocols) into `folder`."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i in range(records):
        roll = rnd.random()
        if roll < 0.05:
            payload = b"!" + f"exception {i}".encode()
        elif roll < 0.1:
            payload = bytes(rnd.randint(1, 16))
        else:
            payload = bytes(rnd.randrange(256) for _ in range(rnd.randint(4, 48)))
        chunks.append(struct.pack(">HH", rnd.choice([1, 2, 3]), len(payload)) + payload)
    (folder / "rawbinlog.bin").write_bytes(b"".join(chunks))
    start = 1_670_000_000.0 + seed
    (folder / "rawbinlog.time").write_text(
        "".join(f"{start + i * 0.1:.3f}\n" for i in range(records))
    )
    (folder / "rawbinlog.protocols.xml").write_text(
        '<protocols><protocol id="1" name="GPS"/><protocol id="2" name="CAN"/>'
        '<protocol id="3" name="LTE"/></protocols>\n'
    )
    return folder / "rawbinlog.bin"


def make_field_test_tree(root: Path, devices: int = 3, records: int = 200) -> list[Path]:
    """A field-test day laid out like the real ones: DATE/G2/DRIVE/DEVICE#N/gps/rawbinlog.*"""
    return [
        write_log(
            root / "2022-12-13" / "G2" / "20221213_Driving" / f"A146B#{n}" / "gps", records, seed=n
        )
        for n in range(1, devices + 1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", required=True, type=Path)
    parser.add_argument("--time", required=True, type=Path)
    parser.add_argument("--protocols", required=True, type=Path)
    parser.add_argument("--output-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        n = process(args.bin, args.time, args.protocols, args.output_dir)
    except (LogError, OSError, ValueError) as exc:
        print(f"spotbot: {exc}", file=sys.stderr)
        return 1
    print(f"spotbot: {n} annotations from {args.bin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
