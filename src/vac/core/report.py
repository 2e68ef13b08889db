"""Human-facing output of a compression: rank tables, the kept-rank heatmap, summary tables."""

from __future__ import annotations

from rich.table import Table

from ..models.families import Arch


def rank_grid(arch: Arch, n_layers: int, ranks: dict[str, int], shapes: dict[str, tuple[int, int]]):
    """(kinds, rows): rows[layer][kind] = (rank or None for dense, kept fraction of full rank)."""
    kinds = [arch.kind(n) for n in arch.linears]
    rows = []
    for i in range(n_layers):
        row = {}
        for name in arch.linears:
            path = f"{arch.layer_path(i)}.{name}"
            full = min(shapes[path])
            rank = ranks.get(path)
            row[arch.kind(name)] = (rank, 1.0 if rank is None else rank / full)
        rows.append(row)
    return kinds, rows


def rank_table(kinds, rows) -> Table:
    table = Table(title="rank per layer (d = dense)", show_edge=False)
    table.add_column("layer", justify="right")
    for k in kinds:
        table.add_column(k, justify="right")
    for i, row in enumerate(rows):
        table.add_row(str(i), *["d" if row[k][0] is None else str(row[k][0]) for k in kinds])
    return table


def heatmap(kinds, rows, title: str) -> bytes:
    """PNG (bytes) of the kept rank fraction per layer × matrix type."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [[row[k][1] for k in kinds] for row in rows]
    fig, ax = plt.subplots(figsize=(4 + 0.4 * len(kinds), 1.5 + 0.22 * len(rows)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="kept rank / full rank")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in rows:
        table.add_row(k, v)
    return table


