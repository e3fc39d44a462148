"""report.html: the report for a browser, one self-contained page beside report.md.

report.md and pareto.png suit a terminal or a repository; sweeps are compared in a
browser, so the same rows (ftx.tracking.report: the trials, the objective, the
Pareto front) also become a page that needs nothing but itself to view: inline CSS,
a small inline script, and the quality-versus-peak-memory scatter drawn here as
inline SVG (no plotting library, no CDN, no web fonts). Its Content-Security-Policy
forbids every load from outside the file, so a page that did reach out would be
refused by the browser and say so in the console (tests/test_report_html.py checks
that console stays silent in a real headless Chromium).

The page holds: the scatter (x = measured peak memory, y = the ranking objective;
the Pareto front ringed and joined by a step line; a hollow marker at the planner's
predicted memory joined to the measured one; each point labelled and titled for
hover), the trials table sortable by any column (``#sort=KEY`` or ``#sort=-KEY`` in
the URL keeps the order, so a sorted view can be shared), and each run's
configuration as it differs from the first run's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from ftx.tracking import flatten
from ftx.tracking.report import TABLE, Objective, completed, finite_number, mib, pareto_front, sort_rows

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), yellow left out: too pale on white.
_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#555555")
_WIDTH, _HEIGHT = 980, 520
_LEFT, _TOP, _RIGHT, _BOTTOM = 84, 24, 740, 456  # the plot area; the legend goes right of it
_ABSENT = object()  # a config key one run has and the other lacks


def write_html(rows: list[dict[str, Any]], runs: list[Path], objective: Objective, path: Path) -> None:
    """Write report.html for ``rows`` (read from ``runs``, in the same order; the first is the diffs' reference)."""
    path.write_text(render_page(rows, runs, objective), encoding="utf-8")


def render_page(rows: list[dict[str, Any]], runs: list[Path], objective: Objective) -> str:
    """The whole page as one string: every style, script and figure inline, so the file is all a reader needs."""
    direction = "higher" if objective.higher_is_better else "lower"
    done = len(completed(rows, objective))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; \
script-src 'unsafe-inline'">
<title>ftx report: {len(rows)} run(s)</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>ftx report</h1>
<p>{len(rows)} run(s), {done} completed with a quality figure. Ranked by <code>{escape(objective.key)}</code>
({direction} is better); ★ marks the Pareto front of quality against <code>memory.peak_bytes</code>:
no other run is both at least as good and at most as large.</p>
</header>
<section id="plot">
<h2>Quality against peak memory</h2>
{scatter_svg(rows, objective)}
</section>
<section id="trials-section">
<h2>Trials</h2>
<p class="hint">Click a column to sort by it (again to reverse); the address (<code>#sort=KEY</code>,
<code>#sort=-KEY</code>) keeps the order. Hover a row or a point to find its partner.</p>
{trials_table(rows, objective)}
</section>
<section id="configs">
<h2>Configuration, against the first run</h2>
{configs_section(runs)}
</section>
<script>{_JS}</script>
</body>
</html>
"""


@dataclass(frozen=True)
class _Axis:
    """A linear scale from data values to SVG pixels, with round-numbered ticks."""

    ticks: tuple[float, ...]
    start: float  # the pixel of ticks[0]
    end: float  # the pixel of ticks[-1]
    digits: int  # decimals that show the tick step

    def at(self, value: float) -> float:
        lo, hi = self.ticks[0], self.ticks[-1]
        return self.start + (value - lo) / (hi - lo) * (self.end - self.start)

    def label(self, value: float) -> str:
        return f"{value:.{self.digits}f}"


def _axis(values: list[float], start: float, end: float, count: int = 5) -> _Axis:
    """Ticks at 1, 2 or 5 × 10^k (Heckbert's "nice numbers", Graphics Gems 1990) around the values, padded 4%."""
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    lo, hi = lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo)
    magnitude = 10 ** math.floor(math.log10((hi - lo) / count))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= (hi - lo) / count)
    ticks = tuple(i * step for i in range(math.floor(lo / step), math.ceil(hi / step) + 1))
    return _Axis(ticks, start, end, max(0, -math.floor(math.log10(step))))


def scatter_svg(rows: list[dict[str, Any]], objective: Objective) -> str:
    """Quality against peak memory: one point per completed run, the front ringed and stepped, predictions hollow."""
    points = [r for r in completed(rows, objective) if finite_number(r.get("memory.peak_bytes"))]
    if not points:
        return '<p class="empty">No completed run with a quality figure and a peak memory to plot.</p>'
    memories = [mib(r.get(k)) for r in points for k in ("memory.peak_bytes", "memory.predicted_bytes")]
    x = _axis([m for m in memories if m is not None], _LEFT, _RIGHT)
    y = _axis([r[objective.key] for r in points], _BOTTOM, _TOP)
    methods = sorted({str(r.get("method")) for r in points})
    colours = {method: _COLOURS[i % len(_COLOURS)] for i, method in enumerate(methods)}
    front = pareto_front(rows, objective)
    line = sorted((r for r in points if r["run"] in front), key=lambda r: r["memory.peak_bytes"])
    # A step after each front point, as pareto.png draws it: its quality holds until the next, larger run.
    corners = [(x.at(mib(r["memory.peak_bytes"])), y.at(r[objective.key])) for r in line]
    step = "".join(f" H{cx:.1f} V{cy:.1f}" if i else f"M{cx:.1f},{cy:.1f}" for i, (cx, cy) in enumerate(corners))
    body = "\n".join(_point_svg(r, objective, x, y, colours, r["run"] in front) for r in points)
    return (
        f'<svg id="scatter" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        f'aria-label="{escape(objective.key)} against peak memory, one point per completed run">\n'
        f"{_axes_svg(x, y, objective)}\n"
        f'<path class="front-line" d="{step}"/>\n{body}\n{_legend_svg(colours)}\n</svg>'
    )


def _axes_svg(x: _Axis, y: _Axis, objective: Objective) -> str:
    parts = [f'<rect class="frame" x="{_LEFT}" y="{_TOP}" width="{_RIGHT - _LEFT}" height="{_BOTTOM - _TOP}"/>']
    for tick in x.ticks:
        at = x.at(tick)
        parts.append(f'<line class="grid" x1="{at:.1f}" y1="{_TOP}" x2="{at:.1f}" y2="{_BOTTOM}"/>')
        parts.append(f'<text class="tick" x="{at:.1f}" y="{_BOTTOM + 18}" text-anchor="middle">{x.label(tick)}</text>')
    for tick in y.ticks:
        at = y.at(tick)
        parts.append(f'<line class="grid" x1="{_LEFT}" y1="{at:.1f}" x2="{_RIGHT}" y2="{at:.1f}"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 8}" y="{at + 4:.1f}" text-anchor="end">{y.label(tick)}</text>')
    better = "higher" if objective.higher_is_better else "lower"
    middle = (_TOP + _BOTTOM) / 2
    parts.append(
        f'<text class="axis-label" x="{(_LEFT + _RIGHT) / 2}" y="{_BOTTOM + 48}" text-anchor="middle">'
        "peak memory (MiB)</text>"
    )
    parts.append(
        f'<text class="axis-label" transform="translate(22 {middle}) rotate(-90)" text-anchor="middle">'
        f"{escape(objective.key)} ({better} is better)</text>"
    )
    return "\n".join(parts)


def run_label(row: dict[str, Any]) -> str:
    """``method r=16 precision``: what tells the points apart (no rank for full fine-tuning)."""
    rank = f" r={row['method.r']}" if row.get("method.r") is not None else ""
    return f"{row.get('method')}{rank} {row.get('precision')}"


def _point_svg(
    row: dict[str, Any], objective: Objective, x: _Axis, y: _Axis, colours: dict[str, str], on_front: bool
) -> str:
    """One run: the measured point, its predicted twin (hollow, joined by a thin line), a label and a hover title."""
    colour = colours[str(row.get("method"))]
    peak, predicted, quality = mib(row["memory.peak_bytes"]), mib(row.get("memory.predicted_bytes")), row[objective.key]
    px, py = x.at(peak), y.at(quality)
    title = [row["run"], run_label(row), f"{objective.key}: {quality:.4g}", f"peak memory: {peak:.1f} MiB"]
    title.append(f"predicted: {predicted:.1f} MiB" if predicted is not None else "predicted: none recorded")
    if on_front:
        title.append("★ on the Pareto front")
    parts = [
        f'<g class="point{" front" if on_front else ""}" data-run="{escape(row["run"])}" '
        f'data-method="{escape(str(row.get("method")))}">',
        f"<title>{escape(chr(10).join(title))}</title>",
    ]
    if predicted is not None:
        qx = x.at(predicted)
        parts.append(f'<line class="gap" x1="{qx:.1f}" y1="{py:.1f}" x2="{px:.1f}" y2="{py:.1f}" stroke="{colour}"/>')
        parts.append(f'<circle class="predicted" cx="{qx:.1f}" cy="{py:.1f}" r="5" stroke="{colour}"/>')
    if on_front:
        parts.append(f'<circle class="ring" cx="{px:.1f}" cy="{py:.1f}" r="10"/>')
    parts.append(f'<circle class="measured" cx="{px:.1f}" cy="{py:.1f}" r="6" fill="{colour}"/>')
    parts.append(f'<text class="label" x="{px + 9:.1f}" y="{py - 9:.1f}">{escape(run_label(row))}</text>')
    return "".join(parts) + "</g>"


def _legend_svg(colours: dict[str, str]) -> str:
    x, y = _RIGHT + 24, _TOP + 12
    parts = [f'<g class="legend"><text class="legend-title" x="{x}" y="{y}">method</text>']
    for method, colour in colours.items():
        y += 22
        parts.append(f'<circle cx="{x + 6}" cy="{y - 4}" r="6" fill="{colour}"/>')
        parts.append(f'<text x="{x + 20}" y="{y}">{escape(method)}</text>')
    y += 34
    parts.append(f'<circle class="ring" cx="{x + 6}" cy="{y - 4}" r="10"/>')
    parts.append(f'<circle class="neutral" cx="{x + 6}" cy="{y - 4}" r="4"/>')
    parts.append(f'<text x="{x + 20}" y="{y}">on the Pareto front</text>')
    y += 24
    parts.append(f'<path class="front-line" d="M{x - 4},{y - 4} H{x + 16}"/>')
    parts.append(f'<text x="{x + 20}" y="{y}">the front (step)</text>')
    y += 24
    parts.append(
        f'<circle class="neutral" cx="{x + 6}" cy="{y - 4}" r="6"/><text x="{x + 20}" y="{y}">measured peak</text>'
    )
    y += 24
    parts.append(f'<line class="gap legend-gap" x1="{x + 1}" y1="{y - 4}" x2="{x + 14}" y2="{y - 4}"/>')
    parts.append(f'<circle class="predicted legend-predicted" cx="{x + 1}" cy="{y - 4}" r="4"/>')
    parts.append(f'<text x="{x + 20}" y="{y}">predicted by the planner</text>')
    return "".join(parts) + "</g>"


def trials_table(rows: list[dict[str, Any]], objective: Objective) -> str:
    """The report.md table, best first, with each cell's raw value in ``data-value`` for sorting."""
    front = pareto_front(rows, objective)
    numeric = {
        column.key: all(finite_number(v) for r in rows if (v := column.value(r)) is not None) for column in TABLE
    }
    head = [
        '<th data-key="pareto" data-type="number"><button type="button" title="on the Pareto front">★</button></th>'
    ]
    for column in TABLE:
        kind = "number" if numeric[column.key] else "text"
        head.append(
            f'<th data-key="{escape(column.key)}" data-type="{kind}"><button type="button" '
            f'title="{escape(column.key)}">{escape(column.header)}</button></th>'
        )
    body = []
    for row in sort_rows(rows, objective):
        classes = f"{'front ' if row['run'] in front else ''}{row.get('status')}"
        cells = [f'<td data-value="{int(row["run"] in front)}">{"★" if row["run"] in front else ""}</td>']
        for column in TABLE:
            value = column.value(row)
            raw = "" if value is None else repr(value) if numeric[column.key] else str(value)
            align = ' class="num"' if numeric[column.key] else ""
            cells.append(f'<td data-value="{escape(raw)}"{align}>{escape(column.text(row))}</td>')
        body.append(f'<tr data-run="{escape(row["run"])}" class="{escape(classes)}">{"".join(cells)}</tr>')
    return (
        f'<div class="scroll"><table id="trials"><thead><tr>{"".join(head)}</tr></thead>\n'
        f"<tbody>\n{chr(10).join(body)}\n</tbody></table></div>"
    )


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's .hydra/config.yaml, flattened to dotted keys, as written (interpolations unresolved: a
    report must not fail on a resolver or an environment variable it lacks, and the swept key shows anyway)."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return {}
    from omegaconf import OmegaConf

    return flatten(OmegaConf.to_container(OmegaConf.load(config_file), resolve=False))


def config_diff(first: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, first's value, other's value) for every key whose value differs, absent keys included."""
    keys = sorted(first.keys() | other.keys())
    return [
        (k, first.get(k, _ABSENT), other.get(k, _ABSENT))
        for k in keys
        if first.get(k, _ABSENT) != other.get(k, _ABSENT)
    ]


def configs_section(runs: list[Path]) -> str:
    """One <details> per run: the first run's whole config, then each other's differences from it."""
    configs = [read_config(run) for run in runs]
    reference = runs[0].name
    parts = [
        f'<details class="config" data-run="{escape(reference)}"><summary><b>{escape(reference)}</b>: '
        f"the reference, {len(configs[0])} keys</summary>"
        f"{_config_table([(k, v, _ABSENT) for k, v in sorted(configs[0].items())], reference, None)}</details>"
    ]
    for run, config in zip(runs[1:], configs[1:], strict=True):
        if not config:
            summary = "no .hydra/config.yaml"
            diff = []
        else:
            diff = config_diff(configs[0], config)
            summary = f"{len(diff)} key(s) differ" if diff else "the same configuration"
        parts.append(
            f'<details class="config" data-run="{escape(run.name)}" data-differences="{len(diff)}" open>'
            f"<summary><b>{escape(run.name)}</b>: {summary}</summary>"
            f"{_config_table(diff, reference, run.name) if diff else ''}</details>"
        )
    return "\n".join(parts)


def _config_table(items: list[tuple[str, Any, Any]], reference: str, run: str | None) -> str:
    if not items:
        return '<p class="empty">no .hydra/config.yaml</p>'
    header = f"<th>key</th><th>{escape(reference)}</th>" + (f"<th>{escape(run)}</th>" if run else "")
    lines = []
    for key, first, other in items:
        cells = f"<td><code>{escape(key)}</code></td><td>{_config_value(first)}</td>"
        lines.append(f"<tr>{cells}{f'<td>{_config_value(other)}</td>' if run else ''}</tr>")
    return f'<table class="diff"><thead><tr>{header}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


def _config_value(value: Any) -> str:
    if value is _ABSENT:
        return '<span class="absent">absent</span>'
    return f"<code>{escape(value if isinstance(value, str) else json.dumps(value, default=str))}</code>"


_CSS = """
:root { --fg: #1d232b; --muted: #5b6573; --bg: #fff; --panel: #f5f7fa; --line: #d9dee5; --hot: #fff3c4;
  color-scheme: light dark; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e4e8ee; --muted: #9aa4b1; --bg: #14181d; --panel: #1c2229; --line: #323a44; --hot: #4a4020; }
}
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1240px; padding: 24px 32px 64px; color: var(--fg); background: var(--bg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 32px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
code { font: 0.92em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.hint, .empty { color: var(--muted); font-size: 0.92em; }
#scatter { width: 100%; height: auto; background: var(--panel); border-radius: 8px; }
#scatter text { fill: var(--fg); font-size: 13px; }
#scatter .tick { fill: var(--muted); font-size: 12px; }
#scatter .axis-label { font-size: 14px; }
#scatter .frame { fill: var(--bg); stroke: var(--line); }
#scatter .grid { stroke: var(--line); stroke-width: 1; }
#scatter .front-line { fill: none; stroke: var(--muted); stroke-width: 1.6; stroke-dasharray: 6 4; }
#scatter .gap { stroke-width: 1; opacity: 0.7; }
#scatter .predicted { fill: var(--bg); stroke-width: 2; }
#scatter .legend .neutral { fill: var(--fg); }
#scatter .legend .legend-gap { stroke: var(--fg); }
#scatter .legend .legend-predicted { fill: var(--bg); stroke: var(--fg); }
#scatter .ring { fill: none; stroke: var(--fg); stroke-width: 1.6; }
#scatter .label { font-size: 12px; paint-order: stroke; stroke: var(--bg); stroke-width: 3px; }
#scatter .point { cursor: default; }
#scatter .point.hot .measured { stroke: var(--fg); stroke-width: 3; }
#scatter .point.hot .label { font-weight: 700; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#trials thead th { position: sticky; top: 0; background: var(--panel); }
#trials th button { all: unset; cursor: pointer; font-weight: 600; }
#trials th button:focus-visible { outline: 2px solid #0072B2; }
#trials th[aria-sort="ascending"] button::after { content: " ▲"; }
#trials th[aria-sort="descending"] button::after { content: " ▼"; }
#trials tbody tr:nth-child(even) { background: var(--panel); }
#trials tr.front td:first-child { color: #E69F00; font-size: 1.1em; }
#trials tr.failed, #trials tr.pruned, #trials tr.stopped { color: var(--muted); }
#trials tr.hot, details.config.hot > summary { background: var(--hot); }
details.config { border: 1px solid var(--line); border-radius: 6px; margin: 6px 0; padding: 4px 10px; }
details.config summary { cursor: pointer; }
table.diff { margin: 6px 0 8px; width: auto; }
table.diff td { white-space: normal; word-break: break-word; }
.absent { color: var(--muted); font-style: italic; }
"""

# Sorting: a header click writes #sort=[-]KEY, the hashchange handler sorts, so the order survives a reload or a
# shared link. Numbers compare as numbers, text with numeric collation ("trial-2" before "trial-10"); empty cells
# (a figure a run lacks) stay last either way. data-ready on <html> says the script ran to its end.
_JS = """
(() => {
  const table = document.getElementById("trials");
  const heads = [...table.tHead.rows[0].cells];
  const sortBy = (key, descending) => {
    const index = heads.findIndex((th) => th.dataset.key === key);
    if (index < 0) return;
    const numeric = heads[index].dataset.type === "number";
    const body = table.tBodies[0];
    const rows = [...body.rows].sort((a, b) => {
      const x = a.cells[index].dataset.value, y = b.cells[index].dataset.value;
      if (x === "" || y === "") return (x === "") - (y === "");
      const order = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, { numeric: true });
      return descending ? -order : order;
    });
    body.append(...rows);
    heads.forEach((th) => th.removeAttribute("aria-sort"));
    heads[index].setAttribute("aria-sort", descending ? "descending" : "ascending");
    table.dataset.sortedBy = (descending ? "-" : "") + key;
  };
  const fromAddress = () => {
    const match = /sort=(-?)([^&]+)/.exec(decodeURIComponent(location.hash));
    if (match) sortBy(match[2], match[1] === "-");
  };
  heads.forEach((th) => th.querySelector("button").addEventListener("click", () => {
    const descending = th.getAttribute("aria-sort") === "ascending";
    location.hash = "sort=" + (descending ? "-" : "") + th.dataset.key;
  }));
  window.addEventListener("hashchange", fromAddress);
  const partners = (run) => document.querySelectorAll(`[data-run="${CSS.escape(run)}"]`);
  document.querySelectorAll("#trials tbody tr, #scatter .point").forEach((el) => {
    el.addEventListener("mouseenter", () => partners(el.dataset.run).forEach((p) => p.classList.add("hot")));
    el.addEventListener("mouseleave", () => partners(el.dataset.run).forEach((p) => p.classList.remove("hot")));
  });
  fromAddress();
  document.documentElement.dataset.ready = "true";
})();
"""
