"""Figure export: offline HTML (atomic), PNG through kaleido and Chromium, a clear message without
them, and the one-file report with figures, text and tables."""

from __future__ import annotations

import json
import os
import re
import sys

import plotly.graph_objects as go
import pytest
from PIL import Image

import steerlab as sl
from steerlab.viz import Pre, Section, report, save, save_html, save_png


def scatter(values=(3.0, 1.0, 2.0), name="series") -> go.Figure:
    fig = go.Figure(go.Scatter(x=list(range(len(values))), y=list(values), name=name, mode="markers"))
    fig.update_layout(title="a scatter", xaxis_title="x label", yaxis_title="y label")
    return fig


def figure_json(page: str) -> list[dict]:
    """The data arrays passed to Plotly.newPlot in a page (one per figure)."""
    out = []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', page, flags=re.S):
        out.append(json.loads(m.group(1)))
    return out


def test_html_is_offline_and_holds_the_numbers(tmp_path):
    path = save_html(scatter((4.5, -1.25, 7.0)), tmp_path / "sub" / "fig.html")
    page = path.read_text()
    assert "<script src=" not in page, "nothing is fetched: plotly.js is inline"
    assert len(page) > 3_000_000 and re.search(r"plotly\.js v\d", page), "plotly.js is embedded"
    (data,) = figure_json(page)
    assert data[0]["y"] == [4.5, -1.25, 7.0] and data[0]["name"] == "series"
    assert sorted(os.listdir(path.parent)) == ["fig.html"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_html(scatter(), tmp_path / "fig.html")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_html(scatter((9.0,)), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["fig.html"]


def test_png_through_kaleido_and_chromium(tmp_path):
    assert sl.viz.find_browser() is not None, "the test command installs chromium (apt-get install chromium)"
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 3], marker_color="#d62728"))
    path = save(fig, tmp_path / "bar.png", width=320, height=200, scale=1)
    img = Image.open(path).convert("RGB")
    assert img.size == (320, 200)
    colours = img.getcolors(maxcolors=320 * 200)
    red = sum(n for n, (r, g, b) in colours if r > 180 and g < 80 and b < 80)
    assert red > 1000, "the bars are drawn in red"


def test_png_without_a_browser_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    with pytest.raises(sl.ConfigError) as e:
        save_png(scatter(), tmp_path / "fig.png")
    assert str(e.value) == (
        f"PNG export of {str(tmp_path / 'fig.png')!r} needs a Chrome or Chromium browser for kaleido, and none was found "
        f"(BROWSER_PATH={str(tmp_path / 'no-chrome')!r} is not an executable): install one (Debian: apt-get install chromium; "
        "or run plotly_get_chrome), or save HTML instead"
    )
    assert not (tmp_path / "fig.png").exists()


def test_png_without_kaleido_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    with pytest.raises(sl.ConfigError) as e:
        save_png(scatter(), tmp_path / "fig.png")
    # a clone installs extras from its own folder: the message says how, and that HTML always works
    assert str(e.value) == (
        f"PNG export of {str(tmp_path / 'fig.png')!r} needs the 'kaleido' package: pip install 'kaleido>=1.0' "
        "(in a clone of steerlab: pip install -e '.[png]'); or write HTML, which always works"
    )


def test_save_by_suffix_and_bad_arguments(tmp_path):
    assert save(scatter(), tmp_path / "f.HTML").read_text().lower().startswith("<!doctype html>")
    with pytest.raises(sl.ConfigError, match=r"cannot write a figure to '.*f\.pdf': expected a \.html or \.png file name"):
        save(scatter(), tmp_path / "f.pdf")
    with pytest.raises(sl.ConfigError, match="fig: expected a plotly.graph_objects.Figure; got dict"):
        save_html({"data": []}, tmp_path / "f.html")


def test_report_holds_every_block_in_order_with_plotly_once(tmp_path, smollm):
    catalog = sl.wrap(*smollm).sites
    figs = {"first figure": scatter((1.0, 2.0), name="one"), "second figure": scatter((5.0,), name="two")}
    path = report(
        figs, tmp_path / "report.html", title="Demo <report>", intro="What we asked.\n\nWhat we found.",
        sections=[
            Section("Sites", ["The catalog of SmolLM2:", catalog]),
            ("Numbers", [{"layer": 3, "iia": 0.91234}, {"layer": 5, "iia": 0.5}]),
            ("Generations", Pre("before: ' Rome'\nafter:  ' Paris'")),
            ("A figure in a section", scatter((8.0, 9.0), name="three")),
        ],
    )
    page = path.read_text()
    assert page.count("Plotly.newPlot") == 3 and page.count("<script") == 4  # the bundle once + one per figure
    assert "<title>Demo &lt;report&gt;</title>" in page and "<h1>Demo &lt;report&gt;</h1>" in page
    order = ["What we asked.", "What we found.", "<h2>Sites</h2>", "blocks.29.resid_post", "<h2>Numbers</h2>", "<td>0.9123</td>",
             "<h2>Generations</h2>", "after:  &#x27; Paris&#x27;", "<h2>A figure in a section</h2>", "steerlab-figure-1",
             "<h2>first figure</h2>", "steerlab-figure-2", "<h2>second figure</h2>", "steerlab-figure-3"]
    at = [page.index(s) for s in order]
    assert at == sorted(at)
    assert [d[0]["name"] for d in figure_json(page)] == ["three", "one", "two"]
    assert [d[0]["y"] for d in figure_json(page)] == [[8.0, 9.0], [1.0, 2.0], [5.0]]
    assert "<th>layer</th><th>iia</th>" in page


def test_report_text_is_escaped_and_bad_blocks_are_named(tmp_path):
    page = report([], tmp_path / "r.html", sections=[("x", "<script>alert(1)</script>")]).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    with pytest.raises(sl.ConfigError, match="a report block of type int cannot be shown: expected text, a plotly Figure"):
        report([], tmp_path / "r.html", sections=[("x", [1])])
    with pytest.raises(sl.ConfigError, match=r"sections\[0\]: expected Section\(heading, blocks\) or a \(heading, blocks\) pair; got str"):
        report([], tmp_path / "r.html", sections=["just text"])
    with pytest.raises(sl.ConfigError, match=r"figures\[1\]: expected a plotly.graph_objects.Figure; got str"):
        report([scatter(), "not a figure"], tmp_path / "r.html")
