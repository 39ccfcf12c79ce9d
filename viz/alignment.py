"""Figures for alignment results: IIA over sites × sizes, DAS training curves,
and representations projected onto a found subspace.

* :func:`iia_heatmap` — a :class:`~steerlab.alignment.SearchResult`: for each
  position spec, DAS IIA as a heatmap over sites × subspace sizes, and beside
  it the same sites as lines with the controls (random-init, localist), the
  full-vector interchange (upper bound) and chance.
* :func:`das_training_curve` — a :class:`~steerlab.alignment.DASResult`: loss
  per step and held-out IIA per epoch, the random-init control beside it, and
  the final localist / full-vector / chance levels (Boundless DAS: the learned
  size too).
* :func:`subspace_projection` — the base inputs of a dataset at the result's
  site and positions, projected onto the found subspace, coloured by the
  causal variable's value.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from steerlab.interventions.errors import ConfigError

__all__ = ["iia_heatmap", "das_training_curve", "subspace_projection", "COLOURS", "integer_axis"]

#: one colour per kind of series, the same in every figure: DAS and each control must be told apart at a glance
COLOURS = {"DAS": "#1f77b4", "random-init": "#d62728", "localist": "#2ca02c", "full vector": "#000000", "chance": "#7f7f7f"}
#: several sizes of one series differ by dash (and marker), not by colour
_SIZE_DASH = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def integer_axis(n: int, *, start: int = 1) -> dict:
    """Axis settings that tick only at integers (epochs, steps) from ``start``, at most about ten ticks for ``n`` values."""
    step = max(1, -(-n // 10))
    return {"tickmode": "linear", "tick0": start, "dtick": step, "tickformat": "d"}


def _key(result, variable: str | None) -> str:
    keys = [k for k in result.iia if k != "all"]
    if variable is None:
        return keys[0] if len(keys) == 1 else "all"
    if variable not in result.iia:
        raise ConfigError(f"variable={variable!r}: this result reports {sorted(result.iia)}")
    return variable


def _val(d, key):
    if d is None:
        return None
    v = d.get(key)
    return None if v is None else v.value


def _pos_label(p) -> str:
    return "all positions" if p is None else f"positions {p!r}"


def iia_heatmap(search, *, variable: str | None = None, title: str | None = None) -> go.Figure:
    """DAS IIA over sites × sizes per position spec, with controls and the upper bound beside it.

    ``variable``: an intervened set (``"WX"``, ``"WX+YZ"``) or ``"all"``
    (default: the only variable, else ``"all"``).
    """
    results = search.results
    if not results:
        raise ConfigError("the search has no candidates to plot")
    key = _key(results[0], variable)
    sites = list(dict.fromkeys(r.site for r in results))
    specs = list(dict.fromkeys(repr(r.positions) for r in results))
    sizes = sorted({sum(r.sizes.values()) // len(r.sizes) for r in results})
    labels = [_site_label(search, s) for s in sites]
    titles = []
    for p in specs:
        titles += [f"DAS IIA ({key}), {_pos_label(eval_spec(p))}", f"controls and upper bound, {_pos_label(eval_spec(p))}"]
    fig = make_subplots(rows=len(specs), cols=2, subplot_titles=titles, horizontal_spacing=0.2, vertical_spacing=0.18)
    chance = search.chance
    for i, p in enumerate(specs, start=1):
        by = {(r.site, sum(r.sizes.values()) // len(r.sizes)): r for r in results if repr(r.positions) == p}
        z, text, hover = [], [], []
        for k in sizes:
            row, trow, hrow = [], [], []
            for s in sites:
                r = by.get((s, k))
                v = _val(r.iia, key) if r else None
                row.append(v)
                trow.append("" if v is None else f"{v:.2f}")
                hrow.append(_hover(r, key) if r else "not run")
            z.append(row)
            text.append(trow)
            hover.append(hrow)
        fig.add_trace(go.Heatmap(
            z=z, x=labels, y=[f"size {k}" for k in sizes], text=text, texttemplate="%{text}", customdata=hover,
            hovertemplate="%{x}, %{y}<br>%{customdata}<extra></extra>", zmin=chance, zmax=1.0, colorscale="Viridis",
            showscale=i == 1,
            # the colour bar sits between the heatmap and the line panel, so it never covers the legend (right of the figure)
            colorbar={"title": {"text": "IIA"}, "len": 0.9 / len(specs), "x": 0.41, "xanchor": "left", "thickness": 14},
        ), row=i, col=1)
        for j, k in enumerate(sizes):
            dash = _SIZE_DASH[j % len(_SIZE_DASH)]
            rs = [by.get((s, k)) for s in sites]
            _line(fig, labels, [_val(r.iia, key) if r else None for r in rs], f"DAS size {k}", COLOURS["DAS"], dash, i, i == 1)
            _line(fig, labels, [_val(r.random_init, key) if r else None for r in rs], f"random-init size {k}", COLOURS["random-init"], dash,
                  i, i == 1)
            _line(fig, labels, [_val(r.localist, key) if r else None for r in rs], f"localist size {k}", COLOURS["localist"], dash, i, i == 1)
        first = [next((r for (s2, _), r in by.items() if s2 == s), None) for s in sites]
        _line(fig, labels, [_val(r.full_vector, key) if r else None for r in first], "full vector (upper bound)", COLOURS["full vector"],
              "solid", i, i == 1)
        _line(fig, labels, [chance] * len(labels), "chance", COLOURS["chance"], "dot", i, i == 1)
        fig.update_xaxes(title_text="site", row=i, col=1)
        fig.update_xaxes(title_text="site", row=i, col=2)
        fig.update_yaxes(title_text="subspace size", row=i, col=1)
        fig.update_yaxes(title_text="IIA", range=[0, 1.02], row=i, col=2)
    fig.update_layout(
        title=title or f"Distributed alignment search: IIA over sites and sizes (chance {chance:.2f})",
        height=380 * len(specs) + 80, legend={"title": {"text": "series"}},
    )
    return fig


def eval_spec(p: str):
    """A position spec back from its repr (for labels only)."""
    try:
        import ast

        return ast.literal_eval(p)
    except (ValueError, SyntaxError):
        return p


def _site_label(search, site: str) -> str:
    layer = getattr(search, "layers", {}).get(site)
    return f"L{layer} {site.rsplit('.', 1)[-1]}" if layer is not None and site.startswith("blocks.") else site


def _hover(r, key: str) -> str:
    bits = [f"DAS {_val(r.iia, key):.3f} ± {r.iia[key].se:.3f} (n={r.iia[key].n})"]
    for name, d in (("random-init", r.random_init), ("localist", r.localist), ("full vector", r.full_vector)):
        v = _val(d, key)
        bits.append(f"{name} {'-' if v is None else f'{v:.3f}'}")
    return "<br>".join(bits)


def _line(fig, x, y, name, colour, dash, row, legend) -> None:
    if all(v is None for v in y):
        return
    fig.add_trace(go.Scatter(
        x=x, y=y, name=name, mode="lines+markers", line={"color": colour, "dash": dash}, legendgroup=name,
        showlegend=legend, hovertemplate=f"{name}<br>%{{x}}: %{{y:.3f}}<extra></extra>",
    ), row=row, col=2)


def das_training_curve(result, *, title: str | None = None) -> go.Figure:
    """Loss per step and held-out IIA per epoch (DAS and its random-init control)."""
    c = result.curve
    fig = make_subplots(rows=1, cols=2, subplot_titles=["training loss", "held-out IIA per epoch"], specs=[[{}, {"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=list(range(1, len(c.loss) + 1)), y=c.loss, name=f"{result.method} loss", mode="lines",
                             line={"color": COLOURS["DAS"]},
                             hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>"), row=1, col=1)
    rc = result.random_init_curve
    if rc is not None:
        fig.add_trace(go.Scatter(x=list(range(1, len(rc.loss) + 1)), y=rc.loss, name="random-init loss", mode="lines",
                                 line={"color": COLOURS["random-init"], "dash": "dash"},
                                 hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>"), row=1, col=1)
    epochs = list(range(1, len(c.epoch_iia) + 1))
    fig.add_trace(go.Scatter(x=epochs, y=c.epoch_iia, name=f"{result.method} IIA", mode="lines+markers", line={"color": COLOURS["DAS"]},
                             hovertemplate="epoch %{x}<br>IIA %{y:.3f}<extra></extra>"), row=1, col=2)
    if rc is not None:
        fig.add_trace(go.Scatter(x=epochs, y=rc.epoch_iia, name="random-init IIA", mode="lines+markers",
                                 line={"color": COLOURS["random-init"], "dash": "dash"},
                                 hovertemplate="epoch %{x}<br>IIA %{y:.3f}<extra></extra>"), row=1, col=2)
    levels = [("chance", result.chance, COLOURS["chance"])]
    loc = _val(result.localist, "all")
    if loc is not None:
        levels.append(("localist", loc, COLOURS["localist"]))
    full = [v.value for v in result.full_vector.values()]
    if full:
        levels.append(("full vector", sum(full) / len(full), COLOURS["full vector"]))
    for name, y, colour in levels:
        fig.add_trace(go.Scatter(x=[epochs[0] if epochs else 1, epochs[-1] if epochs else 1], y=[y, y], name=name, mode="lines",
                                 line={"color": colour, "dash": "dot"}, hovertemplate=f"{name} %{{y:.3f}}<extra></extra>"), row=1, col=2)
    if c.size:
        fig.add_trace(go.Scatter(x=epochs[: len(c.size)], y=c.size, name="learned size", mode="lines+markers",
                                 line={"color": "#9467bd"}, hovertemplate="epoch %{x}<br>size %{y}<extra></extra>"),
                      row=1, col=2, secondary_y=True)
        fig.update_yaxes(title_text="subspace size", row=1, col=2, secondary_y=True)
    fig.update_xaxes(title_text="step", row=1, col=1, **integer_axis(len(c.loss)))
    fig.update_yaxes(title_text="cross-entropy", row=1, col=1)
    fig.update_xaxes(title_text="epoch", row=1, col=2, **integer_axis(len(epochs)))
    fig.update_yaxes(title_text="IIA", range=[0, 1.02], row=1, col=2, secondary_y=False)
    sizes = ", ".join(f"{k}: {v}" for k, v in result.sizes.items())
    fig.update_layout(title=title or f"{result.method} at {result.site} ({sizes}): final IIA {result.iia['all'].value:.3f}")
    return fig


def subspace_projection(result, lab, dataset, *, variable: str | None = None, coloured_by: str | None = None,
                        axes: tuple[int, int] = (0, 1), max_points: int = 2000, title: str | None = None) -> go.Figure:
    """The bases of ``dataset`` at the result's site and positions projected onto the
    subspace found for ``variable``, coloured by ``coloured_by`` (default: that
    variable's value on each base input)."""
    variable = variable or result.variables[0]
    proj = result.project(lab, dataset, variable=variable, coloured_by=coloured_by, max_points=max_points)
    k = proj.coords.shape[1]
    a, b = axes
    if not (0 <= a < k) or (k > 1 and not 0 <= b < k):
        raise ConfigError(f"axes={axes}: the subspace for {variable!r} has {k} dimensions")
    fig = go.Figure()
    for value in dict.fromkeys(proj.values):
        idx = [i for i, v in enumerate(proj.values) if v == value]
        x = proj.coords[idx, a].tolist()
        y = proj.coords[idx, b].tolist() if k > 1 else proj.jitter[idx].tolist()
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", name=f"{proj.variable} = {value!r}", text=[proj.text[i] for i in idx],
            marker={"size": 6, "opacity": 0.7}, hovertemplate="%{text}<br>(%{x:.3f}, %{y:.3f})<extra></extra>",
        ))
    fig.update_layout(
        title=title or f"Representations at {result.site} projected onto the {variable} subspace (size {k}), coloured by {proj.variable}",
        xaxis_title=f"{variable} coordinate {a}", yaxis_title=f"{variable} coordinate {b}" if k > 1 else "jitter",
        legend={"title": {"text": proj.variable}},
    )
    return fig
