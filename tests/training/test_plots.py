"""Figures: every figure function writes a PNG whose legends lie outside every panel's data area
and whose panels all have axis labels; sinusoid predictions are not clipped; the training curve
reads supervised and meta-RL records and a resumed run's file."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metagrad.algorithms.blackbox import BlackBox
from metagrad.algorithms.maml import MAML
from metagrad.models.mlp import sinusoid_mlp
from metagrad.rl.maml_rl import MAMLRL, RLConfig
from metagrad.training import plots
from metagrad.training.evaluation import EvalRow
from metagrad.training.rl_plots import plot_navigation_trajectories

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch) -> list[Figure]:
    """Every figure the plotting functions save, kept for inspection."""
    saved: list[Figure] = []
    save = plots.save_figure

    def keep(fig: Figure, path, dpi: int = 120) -> Path:
        saved.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr("metagrad.training.rl_plots.save_figure", keep)
    return saved


def check_readable(fig: Figure) -> None:
    """Legends do not overlap any panel's data area; every panel labels both axes."""
    canvas = FigureCanvasAgg(fig)  # a closed figure's canvas does not draw
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends, "the figure has no legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            data = ax.get_window_extent(renderer)
            overlap_w = min(box.x1, data.x1) - max(box.x0, data.x0)
            overlap_h = min(box.y1, data.y1) - max(box.y0, data.y0)
            assert overlap_w <= 0 or overlap_h <= 0, (ax.get_title(), box, data)
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG


def rows(metric: str) -> list[EvalRow]:
    return [EvalRow(method, 5, steps, mean, 0.02, 100, "test")
            for method, base in (("maml", 0.9), ("pretrained", 0.5))
            for steps, mean in ((0, 0.2), (1, base - 0.1), (3, base))] + [
        EvalRow("blackbox", 5, 0, 0.7, 0.03, 100, "test")]


@pytest.mark.parametrize("metric", ["accuracy", "mse"])
def test_metric_vs_steps(tmp_path, figures, metric):
    out = plots.plot_metric_vs_steps(rows(metric), metric, tmp_path / "m.png")
    assert is_png(out)
    check_readable(figures[0])
    ax = figures[0].axes[0]
    percent = "%" in ax.yaxis.get_major_formatter()(0.5, 0)
    assert percent == (metric == "accuracy")
    assert ("%" in ax.get_ylabel().replace("95%", "")) == (metric == "accuracy")


def test_sinusoid_predictions_cover_every_curve(tmp_path, figures):
    torch.manual_seed(0)
    model = sinusoid_mlp()
    # a large step size: predictions after adaptation far outside the sinusoids' ±5
    maml = MAML(model, F.mse_loss, inner_lr=0.5, inner_steps=1)
    box = BlackBox.from_model(sinusoid_mlp(), F.mse_loss, width=16, layers=1, heads=2)
    out = plots.plot_sinusoid_predictions({"maml": maml, "blackbox": box}, 5, tmp_path / "p.png",
                                          torch.Generator().manual_seed(1), steps=(0, 1, 3))
    assert is_png(out)
    fig = figures[0]
    check_readable(fig)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        low, high = ax.get_ylim()
        for line in ax.get_lines():
            y = line.get_ydata()
            assert low <= min(y) and max(y) <= high, (ax.get_title(), line.get_label())
    labels = fig.legends[0].get_texts()
    assert {t.get_text() for t in labels} >= {"ground truth", "support points", "after 3 steps",
                                              "conditioned on the support set"}


def test_navigation_trajectories(tmp_path, figures):
    torch.set_num_threads(1)
    learner = MAMLRL(RLConfig(meta_batch=2, rollouts=2, horizon=5, hidden=(8,)))
    goals = torch.tensor([[0.3, -0.2], [-0.4, 0.1]])
    out = plot_navigation_trajectories({"maml": learner}, goals, 1, 2, 0, tmp_path / "t.png")
    assert is_png(out)
    check_readable(figures[0])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SUPERVISED = [{"iteration": i, "seconds": i / 10, "loss/maml": 1 / i, "loss/pretrained": 2 / i}
              | ({"val/accuracy": 0.5 + i / 400} if i % 100 == 0 else {})
              for i in range(50, 201, 50)]
RL = [{"iteration": i, "seconds": 1.0, "maml/pre_return": -40 + i, "maml/post_return": -30 + i,
       "maml/kl": 0.01, "pretrained/pre_return": -45 + i, "pretrained/post_return": -44 + i}
      | ({"maml/val_return": -20 + i} if i % 2 == 0 else {})
      for i in range(1, 7)]


def curves(fig: Figure) -> dict[str, tuple[list, list]]:
    """label -> (x, y) of every line of the figure."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in fig.axes for line in ax.get_lines()}


def test_training_curve_supervised(tmp_path, figures):
    out = plots.plot_training_curve(write_jsonl(tmp_path / "metrics.jsonl", SUPERVISED),
                                    tmp_path / "curve.png")
    assert is_png(out)
    fig = figures[0]
    check_readable(fig)
    lines = curves(fig)
    assert lines["maml"] == ([50, 100, 150, 200], [1 / 50, 1 / 100, 1 / 150, 1 / 200])
    assert lines["accuracy, after adaptation"] == ([100, 200], [0.75, 1.0])
    train, val = fig.axes
    assert val.get_ylabel() == "validation accuracy (%)"
    assert val.yaxis.get_major_formatter()(0.75, 0).startswith("75")
    assert train.get_xlabel() == val.get_xlabel() == "iteration"


def test_training_curve_rl(tmp_path, figures):
    plots.plot_training_curve(write_jsonl(tmp_path / "metrics.jsonl", RL), tmp_path / "c.png")
    fig = figures[0]
    check_readable(fig)
    train, val = ([line.get_label() for line in ax.get_lines()] for ax in fig.axes)
    assert train == ["maml, before adaptation", "maml, after adaptation",
                     "pretrained, before adaptation", "pretrained, after adaptation"]
    assert val == ["maml, after adaptation"]
    assert fig.axes[1].get_lines()[0].get_xdata().tolist() == [2, 4, 6]
    assert fig.axes[1].get_ylabel() == "validation return"


def test_training_curve_of_a_resumed_run(tmp_path, figures):
    """Interrupted after iteration 200, resumed from the checkpoint at 100: 150 and 200 are
    logged again (with other values) and the curve shows each iteration once, the later value."""
    again = [r | {"loss/maml": 9.0} for r in SUPERVISED[2:]]
    path = write_jsonl(tmp_path / "metrics.jsonl", SUPERVISED + again + [
        {"iteration": 250, "seconds": 1.0, "loss/maml": 8.0, "loss/pretrained": 0.1}])
    assert [r["iteration"] for r in plots.read_metrics(path)] == [50, 100, 150, 200, 250]
    plots.plot_training_curve(path, tmp_path / "c.png")
    assert curves(figures[0])["maml"] == ([50, 100, 150, 200, 250],
                                          [1 / 50, 1 / 100, 9.0, 9.0, 8.0])


def test_training_curve_without_records(tmp_path, figures):
    """A run stopped before its first log line still gets a figure, which says so."""
    (tmp_path / "metrics.jsonl").write_text("")
    assert is_png(plots.plot_training_curve(tmp_path / "metrics.jsonl", tmp_path / "c.png"))
    texts = [t.get_text() for ax in figures[0].axes for t in ax.texts]
    assert texts == ["no meta-training records", "no validation records"]


def test_read_metrics_names_a_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "loss/maml": 1.0}\n{"loss/maml": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        plots.read_metrics(path)
