"""Figures people read: stage marks on training curves, L_img split by head, legends inside the image,
presets that stay apart on the HR@K curve. Drawn from hand-made logs, ranks and diagnostics (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

from recipes.study import figures as study_figures
from recipes.study.figures import hr_at_k_figure, plot_hr_at_k
from training.diagnostics import ATTENTION_METRICS, ModelDiagnostics
from training.diagnostics.plots import REFERENCE_LABEL, attention_by_layer_figure, plot_attention_by_layer
from training.model.karma import PRESETS
from training.plots import (
    RAMP_LABEL,
    STAGE_LABEL,
    WARMUP_LABEL,
    moving_average,
    plot_training_curves,
    stage_bounds,
    training_curves_figure,
    visual_loss_kind,
)

WARM, ACTION, RAMP = 10, 30, 5  # steps of the warm-up stage, of the action stage, of its LR ramp


def fake_log(img: bool = True, scale: float = 0.1) -> list[dict]:
    """Records shaped like the trainer's train_log.jsonl: warm-up stage, then the action stage."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, WARM + 1):
        loss = 6 - 0.01 * step + 0.01 * rng.random()
        lrs = {"lr_backbone": 3e-4 * scale, "lr_heads": 1e-3}
        records.append({"step": step, "stage": "warmup", "warmup": loss, "total": loss, **lrs})
    for k in range(ACTION):
        factor = (k + 2) / RAMP if k + 1 < RAMP else 1.0 - 0.5 * (k + 1 - RAMP) / ACTION  # LR after the step
        record = {"step": WARM + k + 1, "stage": "action", "act": 7 - 0.05 * k, "gen": 6.0, "recon": 6.1 - 0.001 * k}
        record.update(lr_backbone=3e-4 * factor, lr_heads=1e-3 * factor, total=20 - 0.1 * k)
        if img:
            record["img"] = 1.0 - 0.01 * k
        records.append(record)
    records.append({"step": WARM + ACTION, "stage": "eval", "valid": {"HR@10": 0.1}})
    return records


def write_log(folder: Path, records: list[dict], preset: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    if preset:
        (folder / "checkpoint").mkdir(exist_ok=True)
        config = {"loss": {"preset": preset}, "train": {"warmup_backbone_lr_scale": 0.0}}
        (folder / "checkpoint" / "karma_config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return path


def drawn(fig: Figure) -> Figure:
    fig.canvas.draw()
    return fig


def assert_legends_inside_and_off_the_panels(fig: Figure) -> None:
    """Every figure legend lies inside the figure (nothing cut off) and covers no panel."""
    fig = drawn(fig)
    renderer = fig.canvas.get_renderer()
    assert fig.legends, "the figure has no figure-level legend"
    panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison]
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, (box, fig.bbox)
        assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, (box, fig.bbox)
        for panel in panels:
            assert not Bbox.intersection(box, panel), (box, panel)


# ---- training curves of one run ------------------------------------------------------------------


def test_stage_bounds_read_the_warmup_stage_and_the_logged_lr_ramp() -> None:
    assert stage_bounds(fake_log()) == (WARM, WARM + RAMP - 1)  # the LR logged after step s is step s+1's
    no_warmup = [r for r in fake_log() if r["stage"] != "warmup"]
    assert stage_bounds(no_warmup)[0] == 0
    assert stage_bounds([{"step": 1, "stage": "action", "lr_heads": 1.0}]) == (0, 0)


def test_every_panel_shades_the_warmup_band_and_marks_the_stage_change() -> None:
    fig = training_curves_figure(fake_log(), title="t")
    assert fig is not None
    panels = [ax for ax in fig.axes if ax.axison]
    titles = [ax.get_title() for ax in panels]
    assert len(panels) == 7 and any("learning rate" in t for t in titles)  # 6 loss terms + the LRs
    for ax in panels:
        bands = [p for p in ax.patches if p.get_label() == WARMUP_LABEL]
        assert len(bands) == 1, ax.get_title()
        band = bands[0]
        assert isinstance(band, Rectangle)
        assert band.get_x() == pytest.approx(0.5) and band.get_x() + band.get_width() == pytest.approx(WARM + 0.5)
        lines = [line for line in ax.lines if line.get_label() == STAGE_LABEL]
        assert len(lines) == 1 and list(lines[0].get_xdata()) == [WARM + 0.5] * 2
        assert [p for p in ax.patches if p.get_label() == RAMP_LABEL]
        assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert WARMUP_LABEL in legend_texts and STAGE_LABEL in legend_texts and RAMP_LABEL in legend_texts
    assert_legends_inside_and_off_the_panels(fig)


def test_the_png_names_the_img_loss_and_the_frozen_backbone_from_the_run_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = []
    import training.plots as plots

    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: (figures.append(drawn(fig)), real_save(fig, out))[1])
    log = write_log(tmp_path / "img-mse-s0", fake_log(), preset="img-mse")
    out = plot_training_curves(log, tmp_path / "curves.png")
    assert out is not None and matplotlib.image.imread(out).shape[1] > 800
    (fig,) = figures
    img_titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("L_img")]
    assert img_titles == ["L_img: visual head (MSE regression)"]
    assert "img-mse-s0" in fig.get_suptitle()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert f"{WARMUP_LABEL} (backbone frozen)" in labels  # warmup_backbone_lr_scale = 0
    default = training_curves_figure(fake_log())
    assert any(ax.get_title() == "L_img: visual head (flow matching)" for ax in default.axes)


def test_visual_loss_kind_matches_the_presets() -> None:
    for preset, (*_, head) in PRESETS.items():
        if head != "none":
            assert visual_loss_kind(preset) == head, preset


def test_moving_average_keeps_the_length_and_starts_at_the_first_value() -> None:
    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert moving_average(values, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert moving_average(values, 1).tolist() == values.tolist()


# ---- the study's training curves -----------------------------------------------------------------


def test_flow_and_mse_losses_land_on_different_axes(tmp_path: Path) -> None:
    logs = {
        "action-only": write_log(tmp_path / "a", fake_log(img=False)),
        "karma": write_log(tmp_path / "k", fake_log()),
        "img-mse": write_log(tmp_path / "m", fake_log()),
    }
    fig = study_figures.training_curves_figure(logs, smooth=3)
    assert fig is not None
    img_axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title().startswith("L_img")}
    assert set(img_axes) == {"L_img: visual head (flow matching)", "L_img: visual head (MSE regression)"}
    flow, mse = img_axes["L_img: visual head (flow matching)"], img_axes["L_img: visual head (MSE regression)"]
    assert {line.get_label() for line in flow.lines} & set(logs) == {"karma"}
    assert {line.get_label() for line in mse.lines} & set(logs) == {"img-mse"}
    assert flow.get_ylabel().startswith("velocity MSE") and mse.get_ylabel().startswith("feature MSE")
    for ax in (a for a in fig.axes if a.axison):
        assert [p for p in ax.patches if p.get_label() == WARMUP_LABEL]
        assert [line for line in ax.lines if line.get_label() == STAGE_LABEL]
    act = next(ax for ax in fig.axes if ax.get_title().startswith("L_act"))
    styles = {(line.get_marker(), line.get_linestyle()) for line in act.lines if line.get_label() in logs}
    assert len(styles) == 3  # three runs, three looks
    assert_legends_inside_and_off_the_panels(fig)
    # an explicit kind wins over the name
    only_flow = study_figures.training_curves_figure(logs, smooth=3, img_losses={"img-mse": "flow"})
    assert [ax.get_title() for ax in only_flow.axes if ax.get_title().startswith("L_img")] == [
        "L_img: visual head (flow matching)"
    ]


# ---- HR@K ----------------------------------------------------------------------------------------


def test_hr_at_k_presets_have_distinct_markers_and_styles_and_the_legend_sits_outside(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 300, size=200)
    names = ["action-only", "recon", "karma", "gen", "karma-text", "img-mse", "(most-popular)", "(SASRec)"]
    model_ranks = {name: [ranks, np.roll(ranks, 1)] for name in names}  # identical curves: they overlap
    cold = {name: np.arange(200) % 10 == 0 for name in names}
    fig = hr_at_k_figure(model_ranks, cold, 100, "protocol text")
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 3
    for ax in panels:
        lines = {line.get_label(): line for line in ax.lines}
        assert set(lines) == set(names)
        looks = {(line.get_marker(), line.get_linestyle(), line.get_color()) for line in lines.values()}
        assert len(looks) == len(names)
        presets = [lines[n] for n in names if not n.startswith("(")]
        assert len({(line.get_marker(), line.get_linestyle()) for line in presets}) == len(presets)
        assert len({tuple(line.get_markevery()) for line in presets}) == len(presets)  # markers staggered
        assert "log scale" in ax.get_xlabel() and ax.get_ylabel().startswith("HR@K")
    assert_legends_inside_and_off_the_panels(fig)
    out = plot_hr_at_k(model_ranks, cold, 100, tmp_path / "hr.png", "protocol text")
    assert out.stat().st_size < 200_000


# ---- attention by layer --------------------------------------------------------------------------


def fake_diagnostics(name: str, seed: int, layers: int = 4, heads: int = 2) -> ModelDiagnostics:
    rng = np.random.default_rng(seed)
    return ModelDiagnostics(
        name=name,
        checkpoint="-",
        preset=name,
        recon_trained=False,
        protocol={},
        per_layer={m: rng.random((layers, heads)) for m in ATTENTION_METRICS},
        reference_per_layer={m: np.full(layers, 0.5) for m in ATTENTION_METRICS},
        scalars={},
        references={},
    )


def test_attention_by_layer_legend_is_not_clipped(tmp_path: Path) -> None:
    names = ["warmup-only-s0 (before the action stage)", "action-only-s0", "recon-s0", "karma-s0", "gen-s0"]
    names += ["karma-text-s0", "img-mse-s0"]  # the synthetic study's seven models: one legend row clipped them
    results = [fake_diagnostics(n, k) for k, n in enumerate(names)]
    fig = attention_by_layer_figure(results)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [*names, REFERENCE_LABEL]
    for ax in (a for a in fig.axes if a.axison):
        assert ax.get_ylabel() and ax.get_xlabel().startswith("layer")
    assert_legends_inside_and_off_the_panels(fig)
    info = plot_attention_by_layer(results, tmp_path / "attention_by_layer.png")
    assert info["models"] == names
    assert (tmp_path / "attention_by_layer.png").stat().st_size < 200_000
