"""Collect what ``gpu.sh`` ran into one JSON file and one markdown table.

    python benchmarks/_collect.py OUT_DIR --device cuda --dtype bfloat16

reads ``OUT_DIR/rows.jsonl`` (every table the benchmark scripts printed, through
``_timing.record``) and ``OUT_DIR/pieces.jsonl`` (each piece's command, exit status
and seconds, written by ``gpu.sh``) and writes ``OUT_DIR/gpu.json`` and
``OUT_DIR/gpu.md``: the machine (the card's name, torch, CUDA), then each table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def machine(device: str) -> dict:
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v).replace("|", "\\|")


def markdown(meta: dict, pieces: list[dict], tables: list[dict]) -> str:
    out = [f"# Benchmarks on {meta['device']} ({meta['dtype']})", "",
           f"torch {meta['torch']}, CUDA {meta['cuda']}, Python {meta['python']}, commit {meta['commit']}, {meta['date']}", "",
           "| piece | status | seconds | command |", "|---|---|---|---|"]
    out += [f"| {p['name']} | {p['status']} | {p['seconds']} | `{p['command']}` |" for p in pieces]
    for t in tables:
        rows = t["rows"]
        if not rows:
            continue
        cols = list(dict.fromkeys(k for r in rows for k in r))
        out += ["", f"## {t['title']}", f"({t['script']})", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    meta = {**machine(args.device), "dtype": args.dtype}
    pieces, tables = _lines(args.out / "pieces.jsonl"), _lines(args.out / "rows.jsonl")
    (args.out / "gpu.json").write_text(json.dumps({"machine": meta, "pieces": pieces, "tables": tables}, indent=1) + "\n")
    (args.out / "gpu.md").write_text(markdown(meta, pieces, tables))
    failed = [q["name"] for q in pieces if q["status"] not in ("ok", "absent")]  # absent: a script this checkout lacks
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}: {len(tables)} tables from {len(pieces)} pieces"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
