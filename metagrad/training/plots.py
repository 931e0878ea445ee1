"""Figures: the metric against adaptation steps (MAML Fig. 3), for sinusoid regression the
predictions before and after adaptation (MAML Fig. 2), and a run's training curve.

Every figure keeps its legend outside the panels (no curve is hidden behind it), labels both
axes of every panel, lets the axis limits follow the data, and shows accuracy in percent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from metagrad.algorithms.blackbox import BlackBox
from metagrad.algorithms.maml import MAML
from metagrad.tasks.sinusoid import SinusoidTasks
from metagrad.training.evaluation import EvalRow


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Writes ``fig`` to ``path`` (the format from its suffix) with nothing cut off at the edges,
    closes it and returns the path."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def legend_outside(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend for all ``axes`` (each label once, first handle wins), right of the panels.
    The figure must use the constrained layout, which makes room for it."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize=8)


def axis_label(metric: str) -> str:
    """The name of ``metric`` on an axis, with its unit (accuracy is shown in percent)."""
    return "accuracy (%)" if metric == "accuracy" else metric


def format_metric_axis(ax: Axes, metric: str) -> None:
    """Shows the y axis of ``ax`` in percent if ``metric`` is accuracy (values stay fractions)."""
    if metric == "accuracy":
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))


def plot_metric_vs_steps(rows: list[EvalRow], metric: str, path: Path) -> Path:
    """The mean query ``metric`` (95% CI band) of every (method, shots) against the number of
    adaptation steps; a method evaluated at 0 steps only (the black box) is one point with its
    level dotted across. Writes ``path`` and returns it."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for method, shots in sorted({(r.method, r.shots) for r in rows}):
        sel = sorted((r for r in rows if r.method == method and r.shots == shots),
                     key=lambda r: r.steps)
        steps = [r.steps for r in sel]
        mean = torch.tensor([r.mean for r in sel])
        ci = torch.tensor([r.ci95 for r in sel])
        if steps == [0]:  # no gradient steps (the black box): one point, its level dotted
            line = ax.errorbar(steps, mean, yerr=ci, marker="s", ms=5, capsize=3,
                               label=f"{method}, K={shots} (conditioned, no steps)").lines[0]
            ax.axhline(float(mean[0]), color=line.get_color(), ls=":", lw=1)
            continue
        line = ax.plot(steps, mean, marker="o", ms=3, label=f"{method}, K={shots}")[0]
        ax.fill_between(steps, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("number of gradient steps")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"mean query {axis_label(metric)}, 95% CI")
    format_metric_axis(ax, metric)
    ax.set_title(f"{metric} after adaptation, {rows[0].tasks} test tasks")
    ax.grid(alpha=0.3)
    legend_outside(fig, [ax])
    return save_figure(fig, path)


def plot_sinusoid_predictions(learners: dict[str, MAML | BlackBox], shots: int, path: Path,
                              generator: torch.Generator, steps: tuple[int, ...] = (0, 1, 10),
                              panels: int = 2) -> Path:
    """For ``panels`` test tasks (rows) and each learner (columns): the true function, the K
    support points and the prediction after each number of ``steps`` (MAML Fig. 2); a black
    box's one prediction, conditioned on the support points. The y range covers every curve.
    Writes ``path`` and returns it."""
    tasks = SinusoidTasks(shots=shots, queries=1)
    amp, phase = tasks.sample_functions(panels, generator)
    batch = tasks.batch_for(amp, phase, generator)
    grid = torch.linspace(-5, 5, 200).view(1, -1, 1)
    truth = SinusoidTasks.evaluate(amp, phase, grid.expand(panels, -1, -1))
    fig, axes = plt.subplots(panels, len(learners), figsize=(4.5 * len(learners) + 2, 3 * panels),
                             squeeze=False, layout="constrained")
    for col, (name, learner) in enumerate(learners.items()):
        for row in range(panels):
            ax = axes[row][col]
            ax.plot(grid[0, :, 0], truth[row, :, 0], "r-", lw=1.5, label="ground truth")
            if isinstance(learner, BlackBox):
                pred = learner.predict(batch.support_x[row:row + 1],
                                       batch.support_y[row:row + 1], grid)
                ax.plot(grid[0, :, 0], pred[0, :, 0], "-", color="C0", lw=1,
                        label="conditioned on the support set")
            else:
                _plot_steps(ax, learner, batch.support_x[row], batch.support_y[row], grid, steps)
            ax.plot(batch.support_x[row, :, 0], batch.support_y[row, :, 0], "k^",
                    label="support points")
            ax.set_xlabel("x")
            ax.set_ylabel("y")
            ax.set_title(f"{name}, K={shots}, task {row + 1}", fontsize=10)
            ax.grid(alpha=0.3)
    legend_outside(fig, axes.flat)
    return save_figure(fig, path)


def _plot_steps(ax: Axes, learner: MAML, support_x: torch.Tensor, support_y: torch.Tensor,
                grid: torch.Tensor, steps: tuple[int, ...]) -> None:
    """The predictions of ``learner`` adapted on the support set for each number of ``steps``,
    one colour per number (the same in every panel)."""
    theta = {n: p.detach() for n, p in learner.params().items()}
    path_params = learner.adapt(support_x, support_y, max(steps), first_order=True,
                                trajectory=True, params=theta)
    for i, k in enumerate(steps):
        with torch.no_grad():
            pred = learner.functional_forward(path_params[k], grid[0], step=k)
        ax.plot(grid[0, :, 0], pred[:, 0], "--" if k == 0 else "-", color=f"C{i}", lw=1,
                label=f"after {k} step{'s' if k != 1 else ''}")


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a run's ``metrics.jsonl`` (one JSON object with an ``"iteration"`` per
    line), in iteration order, as the run that wrote the last record lived them: a resumed run
    starts again from its last checkpoint, which can be older than the last record of the
    interrupted session, so records at or after an iteration that is logged again are dropped.
    Blank lines are skipped; any other line that is not such an object raises ``ValueError``
    naming the file and line."""
    records: list[dict[str, float]] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            iteration = record["iteration"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a metrics record with an iteration: "
                             f"{line[:80]!r}") from None
        while records and records[-1]["iteration"] >= iteration:
            records.pop()
        records.append(record)
    return records


class _Curve(NamedTuple):
    """Where and how one metrics key is drawn."""

    panel: str  # "train" or "val"
    quantity: str  # what the panel's y axis shows
    learner: str  # curves of one learner share a colour in both panels
    label: str
    before_adaptation: bool  # drawn dashed


def _curve_of(key: str) -> _Curve | None:
    """How a metrics key is drawn, or None for keys not drawn: ``loss/<learner>`` and
    ``val/<metric>`` (supervised), ``<learner>/pre_return``, ``<learner>/post_return`` and
    ``<learner>/val_return`` (meta-RL)."""
    group, _, name = key.partition("/")
    if group == "loss":
        return _Curve("train", "meta-training loss (query)", name, name, False)
    if group == "val":
        return _Curve("val", name, "", f"{name}, after adaptation", False)
    if name in ("pre_return", "post_return"):
        when = "before" if name == "pre_return" else "after"
        return _Curve("train", "mean return of the training tasks", group,
                      f"{group}, {when} adaptation", name == "pre_return")
    if name == "val_return":
        return _Curve("val", "return", group, f"{group}, after adaptation", False)
    return None


def plot_training_curve(metrics_jsonl_path: str | Path, out_path: str | Path) -> Path:
    """A run's learning curves from its ``metrics.jsonl`` (:func:`read_metrics`, so a resumed
    run's file is drawn as one run): the meta-training loss (supervised: ``loss/<learner>``) or
    the training tasks' returns before (dashed) and after adaptation (meta-RL:
    ``<learner>/pre_return``, ``<learner>/post_return``) in the upper panel, the validation
    metric (``val/<metric>``, ``<learner>/val_return``) in the lower one, both against the
    iteration; one colour per learner. A panel without records says so; an empty file still
    gives a figure. Writes ``out_path`` (PNG) and returns it."""
    curves: dict[_Curve, tuple[list[int], list[float]]] = {}
    for record in read_metrics(metrics_jsonl_path):
        for key, value in record.items():
            curve = _curve_of(key)
            if curve is not None:
                xs, ys = curves.setdefault(curve, ([], []))
                xs.append(record["iteration"])
                ys.append(value)
    colours = {learner: f"C{i}" for i, learner in enumerate(dict.fromkeys(
        c.learner for c in curves))}
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True, layout="constrained")
    titles = {"train": "meta-training", "val": "validation"}
    for ax, panel in zip(axes, titles, strict=True):
        mine = {c: xy for c, xy in curves.items() if c.panel == panel}
        for curve, (xs, ys) in mine.items():
            ax.plot(xs, ys, "--" if curve.before_adaptation else "-",
                    marker="." if len(xs) < 30 else None, lw=1.2, color=colours[curve.learner],
                    label=curve.label)
        quantities = sorted({c.quantity for c in mine})
        ylabel = ", ".join(axis_label(q) for q in quantities) or "metric"
        ax.set_ylabel(ylabel if panel == "train" else f"validation {ylabel}")
        for quantity in quantities:
            format_metric_axis(ax, quantity)
        ax.set_xlabel("iteration")
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_title(titles[panel], fontsize=10)
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {titles[panel]} records", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
    return save_figure(fig, out_path)
