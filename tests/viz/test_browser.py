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
import pytest

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


# -- what the figures show, measured on the rendered page ---------------------------------------------------------------

_MEASURE = """
<script>
window.addEventListener('load', () => setTimeout(() => {
  const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const out = {};
  document.querySelectorAll('.js-plotly-plot').forEach(gd => {
    const legend = gd.querySelector('g.legend');
    out[gd.id] = {
      legend: legend ? box(legend) : null,
      colorbars: [...gd.querySelectorAll('g.colorbar')].map(box),
      entries: [...gd.querySelectorAll('g.legend g.traces')].map(t => ({
        name: t.querySelector('text.legendtext').textContent,
        stroke: (t.querySelector('path.js-line') || {style: {}}).style.stroke || null})),
      xticks: [...gd.querySelectorAll('g.xtick text')].map(t => t.textContent),
      ticks: Object.fromEntries([...gd.querySelectorAll('g.xaxislayer-above, g.yaxislayer-above')].map(
        (g, i) => [g.getAttribute('class') + i, [...g.querySelectorAll('text')].map(t => t.textContent)])),
    };
  });
  const pre = document.createElement('pre');
  pre.id = 'steerlab-measure';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 500));
</script>
"""


def measure(page, tmp_path) -> dict:
    """Legend and colour-bar boxes, legend entries with their drawn colour, and tick labels of every figure, from Chromium."""
    import html as html_lib
    import json

    text = page.read_text().replace("</body>", _MEASURE + "</body>")
    measured = page.with_name("measured.html")
    measured.write_text(text)
    dom = render_dom(measured, tmp_path)
    found = re.search(r'<pre id="steerlab-measure">(.*?)</pre>', dom, flags=re.S)
    assert found, "the measuring script did not run"
    return json.loads(html_lib.unescape(found[1]))


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_figures_read_right_in_chromium(tmp_path, smollm):
    """Legends clear of colour bars; DAS and each control in its own colour; integer epoch and step ticks; no blank token label."""
    from steerlab.alignment import search, tasks
    from steerlab.reft import TrainResult
    from steerlab.viz import das_training_curve, iia_heatmap, patching_heatmap, reft_training_curve

    equality = tasks.hierarchical_equality()  # the DAS paper's MLP: a real search with every control in seconds
    mlp, _ = equality.train_model(n_train=20_000, epochs=1)
    train, test = equality.datasets(n_train=512, n_test=256)
    res = search(sl.wrap(mlp, example_input=equality.example_input()), train, test, sites=[equality.site(1), equality.site(2)],
                 sizes=[1, 2], epochs=3, batch_size=64, localist_samples=4)
    lab = sl.wrap(*smollm)
    try:
        base, source = "Review: The movie was awful.\nSentiment:", "Review: The movie was superb.\nSentiment:"
        sweep = sl.sweep(lab, base, source, sites=["blocks.20.resid_post", "blocks.29.resid_post"],
                         metric=sl.metrics.logit_diff(" Positive", " Negative"))
    finally:
        lab.unwrap()
    figures = {"iia": iia_heatmap(res), "das": das_training_curve(res.results[0]), "patch": patching_heatmap(sweep),
               "reft": reft_training_curve(TrainResult([2.0, 1.5, 1.2], epochs=3, seconds=1.0))}
    page = report(figures, tmp_path / "figures.html")
    got = measure(page, tmp_path)
    assert len(got) == 4
    iia, das, patch, reft_curve = (got[f"steerlab-figure-{i}"] for i in range(1, 5))

    # the IIA figure: a colour bar and a legend, apart; DAS, random-init, localist and chance in four colours (two aligned
    # variables: the full vector carries both, so it bounds neither and is not drawn)
    assert len(iia["colorbars"]) == 1 and iia["legend"] is not None
    assert not overlap(iia["legend"], iia["colorbars"][0]), (iia["legend"], iia["colorbars"])
    colour = {e["name"]: e["stroke"] for e in iia["entries"]}
    kinds = {"DAS": "DAS size 1", "random-init": "random-init size 1", "localist": "localist size 1", "chance": "chance"}
    assert all(colour.get(n) for n in kinds.values()), colour
    assert len({colour[n] for n in kinds.values()}) == 4, colour
    assert colour["DAS size 1"] == colour["DAS size 2"]  # sizes differ by dash, not by colour

    # epochs and steps tick at integers only
    for fig in (das, reft_curve):
        ticks = [t for texts in fig["ticks"].values() for t in texts if t]
        xs = [t for key, texts in fig["ticks"].items() if key.startswith("xaxislayer") for t in texts]
        assert xs and all(re.fullmatch(r"\d+", t.replace(",", "")) for t in xs), xs
        assert ticks
    epoch_ticks = [t for key, texts in das["ticks"].items() if key.startswith("xaxislayer") for t in texts]
    assert "1" in epoch_ticks and "3" in epoch_ticks

    # the patching heatmap: normalised by default (0 = base, 1 = source), every token label visible, the newline as ⏎
    assert not overlap(patch["legend"], patch["colorbars"][0]) if patch["legend"] else len(patch["colorbars"]) == 1
    assert patch["xticks"] and all(t.strip() for t in patch["xticks"]), patch["xticks"]
    assert "⏎" in patch["xticks"] and "·Positive" not in patch["xticks"] and "·movie" in patch["xticks"]
    assert figures["patch"].data[0].z[-1][-1] == pytest.approx(1.0, abs=1e-4)  # the last layer's last position restores the source
