"""Load-balance report: the markdown table, the heatmaps and the report writer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from moe_router.metrics import LoadBalanceMetrics
from moe_router.report import (
    TABLE_COLUMNS,
    UNSELECTED_MASS_NOTE,
    _relative_load,
    cell_text_color,
    contrast_ratio,
    load_balance_table,
    load_heatmaps_figure,
    plot_load_heatmap,
    plot_load_heatmaps,
    write_load_balance_report,
)
from moe_router.routing import Routing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def layer_values(**overrides: float) -> dict[str, torch.Tensor]:
    values = {
        "tokens_per_expert": torch.tensor([4.0, 4.0, 4.0, 4.0]),
        "max_vio_batch_mean": 0.5,
        "max_vio_batch_last": 0.75,
        "max_vio_global": 0.25,
        "load_cv": 0.125,
        "load_entropy": math.log(4),
        "effective_experts": 4.0,
        "dead_expert_fraction": 0.0,
        "router_entropy": 0.98765,
        "drop_rate": 0.0,
        "active_experts_per_token": 2.0,
        "soft_mass_outside": 0.03125,
    }
    values.update(overrides)
    return {key: torch.as_tensor(value, dtype=torch.float32) for key, value in values.items()}


def routed_metrics(ids: list[list[int]], num_experts: int = 4) -> LoadBalanceMetrics:
    expert_ids_TK = torch.tensor(ids)
    scores_TE = torch.full((len(ids), num_experts), 1.0 / num_experts)
    metric = LoadBalanceMetrics(num_experts)
    metric.update(
        Routing(expert_ids_TK, torch.ones(expert_ids_TK.shape), scores_TE, scores_TE.log())
    )
    return metric


# ---------------------------------------------------------------------------------------------
# Table.
# ---------------------------------------------------------------------------------------------


def test_table_exact_markdown():
    table = load_balance_table(
        {
            "layer0": layer_values(),
            "a|b": layer_values(max_vio_global=1.0, dead_expert_fraction=0.25, drop_rate=0.0625),
        }
    )
    expected = (
        "| Layer | MaxVio (batch mean) | MaxVio (global) | CV | Load entropy | Eff. experts "
        "| Dead frac. | Router entropy | Drop rate | Active experts/token "
        "| Unselected score mass |\n"
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
        "| layer0 | 0.500 | 0.250 | 0.125 | 1.386 | 4.000 "
        "| 0.000 | 0.988 | 0.000 | 2.000 | 0.031 |\n"
        # A "|" in a name is escaped; 0.0625 rounds half to even.
        "| a\\|b | 0.500 | 1.000 | 0.125 | 1.386 | 4.000 "
        "| 0.250 | 0.988 | 0.062 | 2.000 | 0.031 |\n"
    )
    assert table == expected


def test_table_options_and_metric_entries():
    metric = routed_metrics([[0, 1], [0, 2], [0, 1]])  # c = [3, 2, 1, 0]
    table = load_balance_table({"topk / layer0": metric}, row_header="Gate / layer", digits=1)
    header, align, row = table.splitlines()
    assert header.startswith("| Gate / layer | MaxVio (batch mean) |")
    assert align.count("--:") == len(TABLE_COLUMNS)
    # MaxVio 1.0 (batch and global), dead fraction 0.25 -> "0.2" at one digit (round half even).
    assert row.startswith("| topk / layer0 | 1.0 | 1.0 |")
    assert row.split(" | ")[6] == f"{0.25:.1f}"
    assert load_balance_table({"x": metric.compute()}, digits=1).splitlines()[2] == row.replace(
        "topk / layer0", "x"
    )


@pytest.mark.parametrize(
    ("metrics_by_layer", "kwargs", "match"),
    [
        ({}, {}, "metrics_by_layer must be a non-empty mapping"),
        ([("layer0", {})], {}, "metrics_by_layer must be a non-empty mapping"),
        ({"layer0": [1.0, 2.0]}, {}, "metrics for 'layer0' must be a LoadBalanceMetrics"),
        ({"layer0": {"load_cv": 0.1}}, {}, r"metrics for 'layer0' lack the keys \['max_vio"),
        ({"layer0": layer_values()}, {"digits": -1}, "digits must be an int >= 0, got -1"),
    ],
)
def test_table_bad_arguments(metrics_by_layer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_balance_table(metrics_by_layer, **kwargs)


# ---------------------------------------------------------------------------------------------
# Heatmaps.
# ---------------------------------------------------------------------------------------------


def test_relative_load_is_one_when_balanced():
    loads_LE = np.array([[5.0, 5.0, 5.0, 5.0], [8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected = np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(_relative_load(loads_LE), expected)


def test_heatmap_png_written(tmp_path):
    loads_LE = torch.tensor([[3.0, 2.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    path = plot_load_heatmap(
        loads_LE, tmp_path / "sub" / "load.png", layer_names=["l0", "l1", "l2"], title="t"
    )
    assert path == tmp_path / "sub" / "load.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    height, width, _ = imread(path).shape
    assert width > height > 100


def test_heatmap_panels_side_by_side(tmp_path):
    loads_LE = [[3, 2, 1, 0], [1, 1, 1, 1]]
    single = plot_load_heatmap(loads_LE, tmp_path / "one.png")
    panels = plot_load_heatmaps(
        {"topk": loads_LE, "soft_topk": np.array([[1, 1, 1, 1], [4, 0, 0, 0]])},
        tmp_path / "two.png",
        layer_names=["a", "b"],
    )
    assert panels.read_bytes().startswith(PNG_MAGIC)
    assert imread(panels).shape[1] > 1.5 * imread(single).shape[1]


def test_heatmap_large_and_vector_formats(tmp_path):
    loads_LE = torch.rand(12, 64, generator=torch.Generator().manual_seed(0))  # not annotated
    assert (
        plot_load_heatmap(loads_LE, tmp_path / "big.svg").read_text().lstrip().startswith("<?xml")
    )


@pytest.mark.parametrize(
    ("loads", "kwargs", "match"),
    [
        ([1.0, 2.0], {}, r"2-D \[layers, experts\]"),
        (np.zeros((0, 4)), {}, r"non-empty 2-D"),
        ([[1.0, -1.0]], {}, "finite and >= 0"),
        ([[1.0, float("nan")]], {}, "finite and >= 0"),
        ([[1.0, 2.0]], {"layer_names": ["a", "b"]}, r"one name per layer \(1"),
        ([[1.0, 2.0]], {"dpi": 0}, "dpi must be a positive int"),
    ],
)
def test_heatmap_bad_arguments(tmp_path, loads, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_load_heatmap(loads, tmp_path / "x.png", **kwargs)


def test_heatmap_bad_path_and_panels(tmp_path):
    with pytest.raises(ValueError, match=r"path must end in one of \('.png'"):
        plot_load_heatmap([[1.0, 2.0]], tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="loads_by_panel must be a non-empty mapping"):
        plot_load_heatmaps({}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Report writer.
# ---------------------------------------------------------------------------------------------


def test_write_report(tmp_path):
    metrics = {
        "layer0": routed_metrics([[0, 1], [0, 2], [0, 1]]),
        "layer1": routed_metrics([[3, 1], [2, 0], [1, 3]]),
    }
    report = write_load_balance_report(metrics, tmp_path / "val", title="Validation", stem="epoch3")
    assert report.markdown_path == tmp_path / "val" / "epoch3.md"
    assert report.table == load_balance_table(metrics)
    assert report.markdown_path.read_text() == (
        f"# Validation\n\n{report.table}\n{UNSELECTED_MASS_NOTE}\n\n![Validation](epoch3.png)\n"
    )
    assert report.heatmap_path.read_bytes().startswith(PNG_MAGIC)
    records = json.loads(report.json_path.read_text())
    assert list(records) == ["layer0", "layer1"]
    assert records["layer0"]["tokens_per_expert"] == [3.0, 2.0, 1.0, 0.0]
    assert records["layer1"]["tokens_per_expert"] == [1.0, 2.0, 1.0, 2.0]
    assert records["layer0"]["max_vio_global"] == 1.0
    assert records["layer1"]["dead_expert_fraction"] == 0.0
    assert set(records["layer0"]) == set(LoadBalanceMetrics.SCALAR_KEYS) | {"tokens_per_expert"}


def test_write_report_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="stem must be a plain non-empty file name stem"):
        write_load_balance_report({"l": layer_values()}, tmp_path, stem="a/b")
    values = layer_values()
    del values["tokens_per_expert"]
    with pytest.raises(ValueError, match="lack 'tokens_per_expert'"):
        write_load_balance_report({"l": values}, tmp_path)
    with pytest.raises(ValueError, match="same number of experts"):
        write_load_balance_report(
            {"a": layer_values(), "b": layer_values(tokens_per_expert=[1.0, 2.0])}, tmp_path
        )
    with pytest.raises(ValueError, match="metrics_by_layer must be a non-empty mapping"):
        write_load_balance_report({}, tmp_path)


def test_cell_text_color_picks_the_better_contrast():
    assert cell_text_color((0.02, 0.19, 0.38, 1.0)) == "white"  # dark blue
    assert cell_text_color((0.4, 0.0, 0.12, 1.0)) == "white"  # dark red
    assert cell_text_color((0.97, 0.97, 0.97, 1.0)) == "black"
    assert contrast_ratio((1, 1, 1), (0, 0, 0)) == pytest.approx(21.0)


def test_heatmap_cell_numbers_stay_readable_on_dark_cells():
    from matplotlib.colors import to_rgba

    # Relative loads 0.3, 1, 1, 1.7 and 0, 0.5, 1.5, 2: every shade of the scale.
    figure = load_heatmaps_figure({"a": [[3, 10, 10, 17], [0, 5, 15, 20]]})
    (ax,) = [ax for ax in figure.axes if ax.images]
    image = ax.images[0]
    values = np.asarray(image.get_array())
    assert len(ax.texts) == 8
    for text in ax.texts:
        column, row = text.get_position()
        cell = image.cmap(image.norm(values[int(row), int(column)]))
        assert contrast_ratio(to_rgba(text.get_color()), cell) >= 4.5, text.get_text()


def test_unselected_score_mass_is_labelled_for_every_gate():
    header = load_balance_table({"topk / layer0": layer_values()}).splitlines()[0]
    assert "Unselected score mass" in header and "Soft mass" not in header
    assert "softmax for topk" in UNSELECTED_MASS_NOTE


def test_a_layer_name_with_a_line_break_stays_one_table_row():
    values = {key: 0.0 for key, _ in TABLE_COLUMNS}
    table = load_balance_table({"layer\n0|a": values})
    assert len(table.splitlines()) == 3
    assert "| layer 0\\|a |" in table
