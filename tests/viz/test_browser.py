"""The HTML report opened in headless Chromium renders its plots (offline, from the embedded plotly.js).

Chromium dumps the DOM after running the page's scripts: each figure's div must hold plotly's
rendered SVG with the figure's own content (its markers, heatmap, axis titles and tick labels).
The README's test command installs Debian's chromium, so this runs in CI.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import plotly.graph_objects as go

import steerlab as sl
from steerlab.viz import report, run_graph


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or sl.viz.find_browser()
    assert path, "no chromium: the README test command installs it (apt-get install chromium)"
    return path


def render_dom(page, tmp_path) -> str:
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000", "--window-size=1200,900", "--dump-dom", page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def figure_parts(dom: str) -> dict[int, str]:
    """The DOM of each report figure, by its number."""
    starts = [(int(m[1]), m.start()) for m in re.finditer(r'id="steerlab-figure-(\d+)"', dom)]
    ends = [s for _, s in starts[1:]] + [len(dom)]
    return {n: dom[s:e] for (n, s), e in zip(starts, ends, strict=True)}


def test_report_renders_its_plots_in_headless_chromium(tmp_path, smollm):
    lab = sl.wrap(*smollm)
    g = sl.Graph()
    clean = g.run("The capital of France is", name="clean")
    x = g.run("The capital of Italy is", [sl.Interchange("blocks.3.attn.z", heads=[5], positions=-1, source=clean)], name="x")
    g.run("The capital of Italy is", [sl.Interchange("blocks.9.resid_post", positions=-1, source=x)], name="y")
    graph_fig = run_graph(g, lab)
    lab.unwrap()

    points = go.Figure(go.Scatter(x=[0, 1, 2, 3, 4, 5, 6], y=[3, 1, 4, 1, 5, 9, 2], mode="markers", name="seven"))
    points.update_layout(title="seven points", xaxis_title="step", yaxis_title="value")
    heat = go.Figure(go.Heatmap(z=[[0.0, 0.5], [0.25, 1.0]], x=["' is'", "' Italy'"], y=["layer 0", "layer 1"]))
    heat.update_layout(title="a heatmap", xaxis_title="position", yaxis_title="layer")
    page = report({"run graph": graph_fig, "points": points, "heat": heat}, tmp_path / "report.html", title="rendering check",
                  sections=[("text", "A paragraph before the figures.")])

    dom = render_dom(page, tmp_path)
    parts = figure_parts(dom)
    assert sorted(parts) == [1, 2, 3]
    for n, part in parts.items():
        assert 'class="main-svg"' in part, f"figure {n} was not rendered by plotly.js"
    # the run graph: its rows' tick labels and its arrows are drawn
    graph_part = parts[1]
    yticks = re.findall(r'<g class="ytick"><text[^>]*data-unformatted="([^"]*)"', graph_part)
    assert yticks == ["clean", "x", "y"]
    assert len(re.findall(r'class="annotation"', graph_part)) == 2
    # the scatter: one drawn point per value, and its axis titles
    scatter_part = parts[2]
    assert len(re.findall(r'class="point"', scatter_part)) == 7
    assert ">step</text>" in scatter_part and ">value</text>" in scatter_part and ">seven points</text>" in scatter_part
    # the heatmap: an image layer with its tick labels
    heat_part = parts[3]
    assert 'class="hm"' in heat_part and "<image" in heat_part
    assert ">layer 1</text>" in heat_part
    assert "A paragraph before the figures." in dom
