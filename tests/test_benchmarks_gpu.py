"""``benchmarks/gpu.sh``, checked without a GPU: the script parses, every piece's script takes every flag the
script passes it (CUDA run and tiny run alike), and the collector turns recorded tables into one JSON file
and one markdown table that hold every row (the runs themselves are a benchmark, not a test)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
GPU = BENCH / "gpu.sh"


def _pieces() -> list[tuple[str, int, str, list[str]]]:
    """``(name, seconds, script, flags)`` of every piece line of gpu.sh (both the CUDA plan and the tiny one)."""
    out = []
    for name, secs, cmd in re.findall(r'^\s+"(\w+)\|(\d+)\|([^"]+)"$', GPU.read_text(), flags=re.M):
        script, *args = cmd.split()
        out.append((name, int(secs), script, [a for a in args if a.startswith("--")]))
    return out


def _declared(script: Path) -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', script.read_text()))


def test_gpu_sh_parses_and_every_piece_takes_its_flags():
    assert subprocess.run(["bash", "-n", str(GPU)], capture_output=True).returncode == 0
    pieces = _pieces()
    names = [p[0] for p in pieces]
    assert names == ["base", "sweep", "das", "reft", "atp"] * 2  # the tiny plan, then the CUDA plan
    cuda = pieces[5:]
    assert sum(secs for _, secs, _, _ in cuda) <= 480  # the pieces' limits fit the 8-minute budget
    for name, _, script, flags in pieces:
        path = BENCH.parent / script
        if not path.exists():
            assert name == "atp"  # AtP's benchmark joins when it exists; gpu.sh records it as absent
            continue
        assert not (set(flags) - _declared(path)), f"{script} lacks {sorted(set(flags) - _declared(path))}"
        assert {"--device", "--dtype"} <= _declared(path), script
    # the flags gpu.sh adds when a peer is missing
    assert "--no-nnsight" in _declared(BENCH / "bench_base.py") and "--no-pyreft" in _declared(BENCH / "reft_speed.py")


def test_collect_writes_one_json_and_one_markdown_table(tmp_path):
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"script": "bench_base.py", "title": "deep | bf16", "rows": [
            {"measure": "Add ÷ plain", "ours_ms": 1.5, "floor_ms": 1.0, "ratio": 1.5, "target": 1.02, "note": ""}]}) + "\n"
        + json.dumps({"script": "reft_speed.py", "title": "ReFT", "rows": [{"measure": "step ÷ floor", "value": "1.07 (3.2 ms)"}]}) + "\n")
    (tmp_path / "pieces.jsonl").write_text(
        json.dumps({"name": "base", "status": "ok", "seconds": 12, "command": "benchmarks/bench_base.py --device cuda"}) + "\n"
        + json.dumps({"name": "atp", "status": "absent", "seconds": 0, "command": "benchmarks/bench_atp.py"}) + "\n")
    done = subprocess.run([sys.executable, str(BENCH / "_collect.py"), str(tmp_path), "--device", "cpu", "--dtype", "bfloat16"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # an absent piece is no failure
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["machine"]["dtype"] == "bfloat16" and data["machine"]["torch"]
    assert [t["title"] for t in data["tables"]] == ["deep | bf16", "ReFT"] and len(data["pieces"]) == 2
    md = (tmp_path / "gpu.md").read_text()
    assert "| Add ÷ plain | 1.500 | 1.000 | 1.500 | 1.020 |  |" in md and "| step ÷ floor | 1.07 (3.2 ms) |" in md
    assert "## deep | bf16" in md and "| base | ok | 12 |" in md
    (tmp_path / "pieces.jsonl").write_text(json.dumps({"name": "das", "status": "timed out after 90s", "seconds": 90, "command": "x"}) + "\n")
    failed = subprocess.run([sys.executable, str(BENCH / "_collect.py"), str(tmp_path), "--device", "cpu"], capture_output=True, text=True)
    assert failed.returncode == 1 and "not ok: das" in failed.stdout
