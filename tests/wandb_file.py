"""Read back what a W&B run really wrote: the records of an offline `.wandb` run file, without a network.

The file is a 7-byte header (`:W&B` + 3 bytes) and then a LevelDB-style log in 32 KiB blocks counted from the
start of the file. Each chunk has a 7-byte header: crc32 (4 bytes), length (2, little-endian), type
(1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST). Assembled chunks are `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    """Every Record in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, pending, records = 7, b"", []
    while offset + 7 <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < 7:  # too small for a chunk header: padding up to the next block
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            offset += left_in_block
            continue
        payload = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _value(item) -> object:
    return json.loads(item.value_json)


@dataclass
class RunFile:
    """The run's identity, config, history rows and final summary, as the run file holds them."""

    path: Path
    run: object = None
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)
    exit_code: int | None = None  # None: the run never finished

    @property
    def tags(self) -> list[str]:
        return list(self.run.tags)


def load_run(path: Path, wait: float = 30.0) -> RunFile:
    """Parse a .wandb file (or the single one inside an offline-run directory). wandb's service process writes the
    file: it may still be writing when the run's `finish()` has returned (seen once in a suite run: the file then
    held no run record yet), so the file is read again, for up to `wait` seconds, until it holds the run's exit."""
    import time

    deadline = time.monotonic() + wait
    while True:
        run_file = _parse_run(Path(path))
        if run_file.exit_code is not None or time.monotonic() > deadline:
            return run_file
        time.sleep(0.5)


def _parse_run(path: Path) -> RunFile:
    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    run_file = RunFile(path)
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_file.run = record.run
            for item in record.run.config.update:
                run_file.config[item.key] = _value(item)
        elif kind == "config":
            for item in record.config.update:
                run_file.config[item.key] = _value(item)
        elif kind == "history":
            run_file.history.append({item.key or "/".join(item.nested_key): _value(item)
                                     for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run_file.summary[item.key or "/".join(item.nested_key)] = _value(item)
        elif kind == "artifact":
            run_file.artifacts.append(record.artifact)
        elif kind == "exit":
            run_file.exit_code = record.exit.exit_code
    # Config values are stored as {"value": ..., "desc": ...}.
    run_file.config = {k: (v["value"] if isinstance(v, dict) and "value" in v else v)
                       for k, v in run_file.config.items()}
    return run_file


def offline_runs(wandb_dir: Path) -> list[Path]:
    """The offline run directories under WANDB_DIR (wandb writes them to WANDB_DIR/wandb/)."""
    return sorted(Path(wandb_dir).glob("wandb/offline-run-*"))
