"""Load-balance reports: a markdown table per layer and a layers × experts load heatmap.

Shape legend: L layers, E experts.

Typical use at the end of a validation pass, with one ``LoadBalanceMetrics`` per MoE layer::

    report = write_load_balance_report(
        {f"layer{i}": m for i, m in enumerate(model.val_balance)}, "runs/x/val"
    )

and, to put several gates side by side, ``plot_load_heatmaps({"topk": loads_LE, ...}, path)``.

Plots are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, no
display, no change to the process-wide backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "LoadBalanceReport",
    "TABLE_COLUMNS",
    "UNSELECTED_MASS_NOTE",
    "annotate_cells",
    "cell_text_color",
    "contrast_ratio",
    "load_balance_table",
    "load_heatmaps_figure",
    "plot_load_heatmap",
    "plot_load_heatmaps",
    "write_load_balance_report",
]

# (metric key, column header), in table order.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("max_vio_batch_mean", "MaxVio (batch mean)"),
    ("max_vio_global", "MaxVio (global)"),
    ("load_cv", "CV"),
    ("load_entropy", "Load entropy"),
    ("effective_experts", "Eff. experts"),
    ("dead_expert_fraction", "Dead frac."),
    ("router_entropy", "Router entropy"),
    ("drop_rate", "Drop rate"),
    ("active_experts_per_token", "Active experts/token"),
    ("soft_mass_outside", "Unselected score mass"),
)

# Printed under every table: the column is about the gate's scores, soft or not, so a topk row
# (its softmax mass outside the k picks) is not read as a soft gate's leak.
UNSELECTED_MASS_NOTE = (
    "Unselected score mass: share of each token's gate scores (softmax for topk, soft top-k "
    "weights for soft gates) on experts it is not dispatched to."
)

_PLOT_SUFFIXES = (".png", ".svg", ".pdf")
# Cells are annotated with their value only while the numbers stay legible.
_MAX_ANNOTATED_CELLS = 256

MetricsOrValues = Metric | Mapping[str, Tensor | float]


@dataclass(frozen=True)
class LoadBalanceReport:
    """Where ``write_load_balance_report`` put its files, and the table it wrote.

    Attributes:
        markdown_path: Title, table and a link to the heatmap.
        heatmap_path: The layers × experts load heatmap (PNG).
        json_path: Per layer, every scalar metric and the tokens per expert.
        table: The markdown table.
    """

    markdown_path: Path
    heatmap_path: Path
    json_path: Path
    table: str


def _values(name: str, entry: MetricsOrValues) -> Mapping[str, Tensor | float]:
    if isinstance(entry, Metric):
        entry = entry.compute()
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"metrics for {name!r} must be a LoadBalanceMetrics or the dict its compute() "
            f"returns, got {type(entry).__name__}"
        )
    return entry


def _check_names(metrics_by_layer: Mapping[str, MetricsOrValues], argument: str) -> None:
    if not isinstance(metrics_by_layer, Mapping) or len(metrics_by_layer) == 0:
        raise ValueError(
            f"{argument} must be a non-empty mapping of name -> metrics, got {metrics_by_layer!r}"
        )


def _table_cell(text: str) -> str:
    """One markdown table cell: pipes escaped, line breaks as spaces (a newline ends a row)."""
    return " ".join(text.replace("|", "\\|").splitlines())


def load_balance_table(
    metrics_by_layer: Mapping[str, MetricsOrValues],
    *,
    row_header: str = "Layer",
    digits: int = 3,
) -> str:
    """A markdown table of the load-balance metrics, one row per layer.

    Args:
        metrics_by_layer: Row name -> a ``LoadBalanceMetrics`` (its ``compute()`` is called) or
            the dict it returned. Rows keep the mapping's order; a comparison driver can pass
            names such as ``"topk / layer0"`` and ``row_header="Gate / layer"``.
            Under DDP pass the dicts (``compute()`` must run on every rank).
        row_header: Header of the first column.
        digits: Digits after the decimal point.

    Returns:
        The table: a header, an alignment row and one row per entry, lines joined by ``\\n``,
        with a trailing newline. Columns follow ``TABLE_COLUMNS``.

    Raises:
        ValueError: If ``metrics_by_layer`` is empty or not a mapping, an entry is neither a
            metric nor a mapping or lacks a column's key, or ``digits`` is negative.
    """
    _check_names(metrics_by_layer, "metrics_by_layer")
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be an int >= 0, got {digits!r}")
    headers = [row_header] + [header for _, header in TABLE_COLUMNS]
    lines = [
        "| " + " | ".join(_table_cell(header) for header in headers) + " |",
        "|:--|" + "--:|" * len(TABLE_COLUMNS),
    ]
    for name, entry in metrics_by_layer.items():
        values = _values(name, entry)
        missing = [key for key, _ in TABLE_COLUMNS if key not in values]
        if missing:
            raise ValueError(f"metrics for {name!r} lack the keys {missing}")
        cells = [_table_cell(str(name))]
        cells += [f"{float(values[key]):.{digits}f}" for key, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _loads_array(name: str, loads_LE: Tensor | np.ndarray | Sequence) -> np.ndarray:
    if isinstance(loads_LE, Tensor):
        loads_LE = loads_LE.detach().to("cpu", torch.float64).numpy()
    loads_LE = np.asarray(loads_LE, dtype=np.float64)
    if loads_LE.ndim != 2 or 0 in loads_LE.shape:
        raise ValueError(
            f"loads for {name!r} must be a non-empty 2-D [layers, experts] array, "
            f"got shape {loads_LE.shape}"
        )
    if not np.isfinite(loads_LE).all() or (loads_LE < 0).any():
        raise ValueError(f"loads for {name!r} must be finite and >= 0, got {loads_LE}")
    return loads_LE


def _relative_load(loads_LE: np.ndarray) -> np.ndarray:
    """Each layer's load over its mean load (1 = balanced); a layer with no load is all 0."""
    mean_L1 = loads_LE.mean(axis=1, keepdims=True)
    return np.divide(loads_LE, mean_L1, out=np.zeros_like(loads_LE), where=mean_L1 > 0)


def _relative_luminance(rgba: Sequence[float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour with channels in [0, 1]."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast_ratio(rgba_a: Sequence[float], rgba_b: Sequence[float]) -> float:
    """WCAG 2 contrast ratio of two opaque sRGB colours (1 to 21; text wants >= 4.5)."""
    lum_a, lum_b = sorted((_relative_luminance(rgba_a), _relative_luminance(rgba_b)))
    return (lum_b + 0.05) / (lum_a + 0.05)


def cell_text_color(cell_rgba: Sequence[float]) -> str:
    """``"white"`` or ``"black"``, whichever contrasts more with the cell colour.

    The better of the two always reaches a contrast ratio of at least 4.5 (WCAG AA for text).
    """
    on_white = contrast_ratio(cell_rgba, (1.0, 1.0, 1.0))
    on_black = contrast_ratio(cell_rgba, (0.0, 0.0, 0.0))
    return "white" if on_white > on_black else "black"


def annotate_cells(ax, values_RC: np.ndarray, image, *, fontsize: float = 7) -> None:
    """Writes each cell's value (two decimals) on a heatmap, in black or white by contrast.

    Args:
        ax: The axes of the heatmap.
        values_RC: The values drawn, rows x columns.
        image: The ``AxesImage`` of the heatmap (its colormap and norm give each cell's colour).
        fontsize: Font size of the numbers.
    """
    for row in range(values_RC.shape[0]):
        for column in range(values_RC.shape[1]):
            value = values_RC[row, column]
            ax.text(
                column,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color=cell_text_color(image.cmap(image.norm(value))),
            )


def plot_load_heatmaps(
    loads_by_panel: Mapping[str, Tensor | np.ndarray | Sequence],
    path: str | Path,
    *,
    layer_names: Sequence[str] | None = None,
    title: str | None = "Expert load relative to the mean load",
    dpi: int = 150,
) -> Path:
    """One heatmap panel per entry (e.g. per gate), side by side with a shared colour scale.

    Each panel shows layers (rows) × experts (columns), every row divided by its mean load so
    that perfect balance is 1 (a layer with no load at all is drawn as 0). The colormap
    diverges around 1 (blue under-, red over-loaded, white balanced) on one scale for all
    panels, so colours compare across panels. Cells show their value while a panel has at most
    256 of them.

    Args:
        loads_by_panel: Panel title -> load per layer and expert, [L, E] (counts or shares;
            only each row's proportions matter). Panels may differ in E.
        path: Output file, ``.png`` (or ``.svg`` / ``.pdf``); parent folders are created.
        layer_names: Row labels, one per layer of every panel (default ``0 .. L-1``).
        title: Figure title (None for none).
        dpi: Resolution of a raster output.

    Returns:
        The path written.

    Raises:
        ValueError: If the mapping is empty, a load array is not a non-empty 2-D array of finite
            non-negative numbers, ``layer_names`` does not have one name per layer, the suffix
            of ``path`` is not one of .png, .svg, .pdf, or ``dpi`` is not positive.
    """
    _check_names(loads_by_panel, "loads_by_panel")
    path = Path(path)
    if path.suffix.lower() not in _PLOT_SUFFIXES:
        raise ValueError(f"path must end in one of {_PLOT_SUFFIXES}, got {str(path)!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")
    figure = load_heatmaps_figure(loads_by_panel, layer_names=layer_names, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def load_heatmaps_figure(
    loads_by_panel: Mapping[str, Tensor | np.ndarray | Sequence],
    *,
    layer_names: Sequence[str] | None = None,
    title: str | None = "Expert load relative to the mean load",
):
    """The figure of ``plot_load_heatmaps`` (a ``matplotlib.figure.Figure`` on the Agg canvas).

    Args:
        loads_by_panel: As ``plot_load_heatmaps``.
        layer_names: As ``plot_load_heatmaps``.
        title: As ``plot_load_heatmaps``.

    Returns:
        The figure, not saved.

    Raises:
        ValueError: As ``plot_load_heatmaps`` (except for the path and dpi checks).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    _check_names(loads_by_panel, "loads_by_panel")
    relative = {
        name: _relative_load(_loads_array(name, loads)) for name, loads in loads_by_panel.items()
    }
    for name, relative_LE in relative.items():
        if layer_names is not None and len(layer_names) != relative_LE.shape[0]:
            raise ValueError(
                f"layer_names must have one name per layer ({relative_LE.shape[0]} for {name!r}), "
                f"got {len(layer_names)}: {list(layer_names)}"
            )

    # vmin 0 (an idle expert) and vmax >= 2 keep 1 strictly inside the range, as TwoSlopeNorm needs.
    vmax = max(2.0, max(float(r.max()) for r in relative.values()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    num_layers = max(r.shape[0] for r in relative.values())
    widths = [max(3.0, 0.45 * r.shape[1] + 1.5) for r in relative.values()]
    figure = Figure(
        figsize=(sum(widths) + 1.5, max(2.5, 0.45 * num_layers + 1.8)), layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(relative), squeeze=False, width_ratios=widths)[0]
    image = None
    for ax, (name, relative_LE) in zip(axes, relative.items(), strict=True):
        num_rows, num_experts = relative_LE.shape
        image = ax.imshow(
            relative_LE, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest"
        )
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(num_rows), layer_names if layer_names is not None else range(num_rows))
        if num_experts <= 32:
            ax.set_xticks(range(num_experts))
        if relative_LE.size <= _MAX_ANNOTATED_CELLS:
            annotate_cells(ax, relative_LE, image)
    colorbar = figure.colorbar(image, ax=list(axes), shrink=0.9)
    colorbar.set_label("load / mean load (1 = balanced)")
    if title is not None:
        figure.suptitle(title)
    return figure


def plot_load_heatmap(
    loads_LE: Tensor | np.ndarray | Sequence,
    path: str | Path,
    *,
    layer_names: Sequence[str] | None = None,
    title: str | None = "Expert load relative to the mean load",
    dpi: int = 150,
) -> Path:
    """A layers × experts heatmap of the load relative to each layer's mean load.

    The single-panel form of ``plot_load_heatmaps``; see there for the colour scale.

    Args:
        loads_LE: Load per layer and expert, [L, E] (e.g. stacked ``tokens_per_expert``).
        path: Output file, ``.png`` (or ``.svg`` / ``.pdf``); parent folders are created.
        layer_names: Row labels, one per layer (default ``0 .. L-1``).
        title: Figure title (None for none).
        dpi: Resolution of a raster output.

    Returns:
        The path written.

    Raises:
        ValueError: As ``plot_load_heatmaps``.
    """
    return plot_load_heatmaps({"": loads_LE}, path, layer_names=layer_names, title=title, dpi=dpi)


def write_load_balance_report(
    metrics_by_layer: Mapping[str, MetricsOrValues],
    out_dir: str | Path,
    *,
    title: str = "Load balance",
    stem: str = "load_balance",
    digits: int = 3,
) -> LoadBalanceReport:
    """Write ``<stem>.md`` (table + heatmap link), ``<stem>.png`` and ``<stem>.json``.

    Args:
        metrics_by_layer: Layer name -> a ``LoadBalanceMetrics`` or its ``compute()`` dict,
            which must include ``tokens_per_expert`` [E] (the same E for every layer).
        out_dir: Folder to write into (created if missing).
        title: Heading of the markdown file and title of the heatmap.
        stem: File name stem.
        digits: Digits after the decimal point in the table.

    Returns:
        The paths written and the table.

    Under DDP, ``compute()`` is a collective: call it on every rank and pass the resulting
    dicts to this function on rank zero only (passing metric objects from rank zero alone
    would hang).

    Raises:
        ValueError: As ``load_balance_table``; also if ``stem`` is empty or holds a path
            separator, or a layer lacks ``tokens_per_expert`` or the layers differ in E.
    """
    _check_names(metrics_by_layer, "metrics_by_layer")
    if not stem or "/" in stem or "\\" in stem:
        raise ValueError(f"stem must be a plain non-empty file name stem, got {stem!r}")
    # compute() once per layer: it syncs across ranks under DDP.
    values_by_layer = {name: _values(name, entry) for name, entry in metrics_by_layer.items()}
    table = load_balance_table(values_by_layer, digits=digits)
    loads = []
    for name, values in values_by_layer.items():
        if "tokens_per_expert" not in values:
            raise ValueError(f"metrics for {name!r} lack 'tokens_per_expert' for the heatmap")
        loads.append(torch.as_tensor(values["tokens_per_expert"], dtype=torch.float64).cpu())
    if len({load.shape for load in loads}) != 1:
        raise ValueError(
            f"every layer needs the same number of experts, got {[tuple(x.shape) for x in loads]}"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    heatmap_path = plot_load_heatmap(
        torch.stack(loads), out_dir / f"{stem}.png", layer_names=list(values_by_layer), title=title
    )
    markdown_path = out_dir / f"{stem}.md"
    markdown_path.write_text(
        f"# {title}\n\n{table}\n{UNSELECTED_MASS_NOTE}\n\n![{title}]({heatmap_path.name})\n"
    )
    json_path = out_dir / f"{stem}.json"
    records = {
        name: {
            **{
                key: _json_float(value)
                for key, value in values.items()
                if key != "tokens_per_expert" and torch.as_tensor(value).numel() == 1
            },
            "tokens_per_expert": load.tolist(),
        }
        for (name, values), load in zip(values_by_layer.items(), loads, strict=True)
    }
    json_path.write_text(json.dumps(records, indent=2) + "\n")
    return LoadBalanceReport(markdown_path, heatmap_path, json_path, table)


def _json_float(value: Tensor | float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
