"""The local report: run and sweep directories → a table sorted by quality with the
Pareto-optimal rows marked (report.md, trials.csv), a quality-versus-memory plot
(pareto.png) and the same in one self-contained page for a browser (report.html,
ftx.tracking.html). Needs only metrics.json and .hydra/config.yaml, no W&B.

Pareto-optimal: no other completed run is at least as good in quality *and* uses
no more peak memory, while being strictly better in one of them.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftx.tracking import METRICS_FILE, flatten

# Trial columns, in dotted metric names (the same names as metrics.json and W&B).
COLUMNS = (
    "run",
    "status",
    "method",
    "quant",
    "precision",
    "method.r",
    "optim.lr",
    "quality.task_score",
    "quality.eval_loss",
    "memory.peak_bytes",
    "memory.predicted_bytes",
    "params.trainable",
    "throughput.tokens_per_s",
    "sweep_trial.number",  # the Optuna trial, in a sweep by ftx's sweeper
)
_CONFIG_COLUMNS = ("method.r", "method.adapter", "optim.lr", "sweep_trial.number")


@dataclass(frozen=True)
class Column:
    """One column of the trials table, shared by report.md and report.html so they agree."""

    header: str
    key: str  # the dotted metric name
    fmt: str = "{}"
    mib: bool = False  # bytes, shown in MiB

    def value(self, row: dict[str, Any]) -> Any:
        value = row.get(self.key)
        return mib(value) if self.mib else value

    def text(self, row: dict[str, Any]) -> str:
        return _text(self.value(row), self.fmt)


TABLE = (
    Column("run", "run"),
    Column("method", "method"),
    Column("quant", "quant"),
    Column("precision", "precision"),
    Column("r", "method.r"),
    Column("lr", "optim.lr", "{:g}"),
    Column("task score", "quality.task_score", "{:.3f}"),
    Column("eval loss", "quality.eval_loss", "{:.4f}"),
    Column("peak MiB", "memory.peak_bytes", "{:.1f}", mib=True),
    Column("predicted MiB", "memory.predicted_bytes", "{:.1f}", mib=True),
    Column("trainable", "params.trainable", "{:,}"),
    Column("tokens/s", "throughput.tokens_per_s", "{:,.0f}"),
    Column("status", "status"),
)


@dataclass(frozen=True)
class Objective:
    """The quality figure a report ranks by."""

    key: str
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding metrics.json) at or below ``paths``, sorted."""
    runs: set[Path] = set()
    for path in map(Path, paths):
        if (path / METRICS_FILE).is_file():
            runs.add(path)
        else:
            runs.update(p.parent for p in path.rglob(METRICS_FILE))
    return sorted(runs)


def read_trial(run_dir: Path) -> dict[str, Any]:
    """One row: the run's flattened metrics.json plus the swept config values."""
    record = flatten(json.loads((run_dir / METRICS_FILE).read_text()))
    row: dict[str, Any] = {"run": run_dir.name, **record}
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.load(config_file)
        for key in _CONFIG_COLUMNS:
            row[key] = OmegaConf.select(config, key, default=None)
    if row.get("method.adapter", "lora") is None:
        row["method.r"] = None  # the rank means nothing for full fine-tuning
    return row


def choose_objective(rows: list[dict[str, Any]]) -> Objective:
    """Task score where every completed run has one, else held-out loss."""
    done = [r for r in rows if r.get("status") == "completed"]
    if done and all(finite_number(r.get("quality.task_score")) for r in done):
        return Objective("quality.task_score", higher_is_better=True)
    return Objective("quality.eval_loss", higher_is_better=False)


def completed(rows: list[dict[str, Any]], objective: Objective) -> list[dict[str, Any]]:
    """The runs a plot and the Pareto front are about: completed, with a finite quality figure."""
    return [r for r in rows if r.get("status") == "completed" and finite_number(r.get(objective.key))]


def pareto_front(rows: list[dict[str, Any]], objective: Objective) -> set[str]:
    """Names of the completed runs no other run dominates in (quality, peak memory)."""
    done = completed(rows, objective)
    front = set()
    for row in done:
        q, m = row[objective.key], row["memory.peak_bytes"]
        dominated = any(
            (other[objective.key] == q or objective.better(other[objective.key], q))
            and other["memory.peak_bytes"] <= m
            and (objective.better(other[objective.key], q) or other["memory.peak_bytes"] < m)
            for other in done
        )
        if not dominated:
            front.add(row["run"])
    return front


def sort_rows(rows: list[dict[str, Any]], objective: Objective) -> list[dict[str, Any]]:
    """Completed runs best first (ties: less memory first), then the others by name."""
    sign = -1 if objective.higher_is_better else 1

    def key(row: dict[str, Any]) -> tuple:
        value = row.get(objective.key)
        if row.get("status") != "completed" or not finite_number(value):
            return (1, 0.0, 0.0, row["run"])
        return (0, sign * value, row.get("memory.peak_bytes") or 0, row["run"])

    return sorted(rows, key=key)


def markdown_table(rows: list[dict[str, Any]], objective: Objective) -> str:
    front = pareto_front(rows, objective)
    header = ["", *(column.header for column in TABLE)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sort_rows(rows, objective):
        cells = ["★" if row["run"] in front else "", *(column.text(row) for column in TABLE)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(paths: list[str | Path], out_dir: str | Path) -> tuple[Path, str]:
    """Write report.md, trials.csv, pareto.png and report.html to ``out_dir``; return (dir, table)."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no run directories (with {METRICS_FILE}) under: {', '.join(map(str, paths))}")
    rows = [read_trial(run) for run in runs]
    objective = choose_objective(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, objective)
    direction = "higher" if objective.higher_is_better else "lower"
    (out / "report.md").write_text(
        "# ftx report\n\n"
        f"{len(rows)} run(s). Ranked by `{objective.key}` ({direction} is better); "
        "★ marks the Pareto front of quality against `memory.peak_bytes`: "
        "no other run is both at least as good and at most as large.\n\n"
        f"{table}\n\n![quality against peak memory](pareto.png)\n"
    )
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "pareto"], extrasaction="ignore")
        writer.writeheader()
        front = pareto_front(rows, objective)
        for row in sort_rows(rows, objective):
            writer.writerow({**{k: row.get(k) for k in COLUMNS}, "pareto": row["run"] in front})
    plot_pareto(rows, objective, out / "pareto.png")
    from ftx.tracking.html import write_html  # imports this module: a cycle at module level

    write_html(rows, runs, objective, out / "report.html")
    return out, table


def plot_pareto(rows: list[dict[str, Any]], objective: Objective, path: Path) -> None:
    """Quality against peak memory, one marker per method, the front as a step line."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    done = completed(rows, objective)
    front = pareto_front(rows, objective)
    markers = "osD^vP*Xh<>"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, method in enumerate(sorted({str(r.get("method")) for r in done})):
        points = [r for r in done if str(r.get("method")) == method]
        ax.scatter(
            [mib(r["memory.peak_bytes"]) for r in points],
            [r[objective.key] for r in points],
            marker=markers[i % len(markers)],
            s=60,
            label=method,
            zorder=3,
        )
    line = sorted((r for r in done if r["run"] in front), key=lambda r: r["memory.peak_bytes"])
    if line:
        ax.step(
            [mib(r["memory.peak_bytes"]) for r in line],
            [r[objective.key] for r in line],
            where="post",
            color="0.4",
            linestyle="--",
            label="Pareto front",
            zorder=2,
        )
    ax.set_xlabel("peak memory (MiB)")
    better = "higher" if objective.higher_is_better else "lower"
    ax.set_ylabel(f"{objective.key} ({better} is better)")
    ax.set_title("Quality against memory")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finite_number(value: Any) -> bool:
    """A real, finite figure: not None, not a bool, not NaN or inf (a failed run's)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def mib(value: Any) -> float | None:
    """Bytes in MiB, None for a missing figure."""
    return value / 2**20 if finite_number(value) else None


def _text(value: Any, fmt: str = "{}") -> str:
    if value is None:
        return "–"
    return fmt.format(value)
