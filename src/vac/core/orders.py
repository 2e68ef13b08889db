"""Layer orders of the sequential factorization: a registry of named orders, or an explicit permutation.

A named order is one decorated function ``fn(n_layers) -> list[int]`` (:func:`register_order`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import VacError

ORDERS: dict[str, Callable[[int], list[int]]] = {}


def register_order(name: str):
    """Decorator: register ``fn(n_layers) -> list[int]`` as the layer order ``name``."""

    def deco(fn):
        ORDERS[name] = fn
        return fn

    return deco


def outward(n: int, start: int, up_first: bool = True) -> list[int]:
    """The outward family: ``start``, then alternately one layer further above and below it (``up_first``:
    above first), a side that runs out leaving the other to finish. Start 0 is front-to-back, start
    n − 1 (below first) back-to-front, start n // 2 (above first) middle-out: one compact family of
    2n − 2 distinct orders (the two ends have one side only) over which ``vac search`` moves an order gene (start, side) step by step."""
    if not 0 <= start < n:
        raise VacError(f"an outward order's start must be a layer of 0..{n - 1}, got {start}")
    result = [start]
    for k in range(1, n):
        for i in (start + k, start - k) if up_first else (start - k, start + k):
            if 0 <= i < n:
                result.append(i)
    return result


def outward_gene(order) -> tuple[int, bool] | None:
    """``(start, up_first)`` of an order of the outward family (None: not one); the start's side is
    ``up_first`` unless only the other one exists, so each order has one gene."""
    order = list(order)
    n = len(order)
    if not n:
        return None
    start = order[0]
    up_first = not (n > 1 and order[1] == start - 1 and start + 1 < n)
    return (start, up_first) if outward(n, start, up_first) == order else None


@register_order("middle-out")
def _middle_out(n: int) -> list[int]:
    """middle, middle+1, middle−1, middle+2, …"""
    return outward(n, n // 2)


@register_order("front-to-back")
def _front_to_back(n: int) -> list[int]:
    return list(range(n))


@register_order("back-to-front")
def _back_to_front(n: int) -> list[int]:
    return list(reversed(range(n)))


def _outward_spec(order: str) -> tuple[int, bool] | None:
    """``outward:S`` or ``outward:S:up|down`` as ``(S, up_first)``; None if ``order`` is not of that form."""
    parts = order.split(":")
    if parts[0] != "outward" or len(parts) not in (2, 3):
        return None
    if not parts[1].isdigit() or (len(parts) == 3 and parts[2] not in ("up", "down")):
        raise VacError(f"bad --order '{order}': write outward:START or outward:START:up|down")
    return int(parts[1]), len(parts) == 2 or parts[2] == "up"


def parse_order(order) -> str | tuple[int, ...]:
    """A registered name, ``outward:S[:up|down]`` (:func:`outward`), or an explicit order (``"3,2,1,0"`` or
    a sequence of integers) as a tuple."""
    if isinstance(order, str):
        if order in ORDERS or _outward_spec(order):
            return order
        items = [x.strip() for x in order.split(",")]
        if len(items) > 1 or items[0].isdigit():
            if not all(x.isdigit() for x in items):
                raise VacError(f"bad --order '{order}': a comma list of layer indices needs integers only")
            return tuple(int(x) for x in items)
        raise VacError(f"unknown order '{order}'; choose {', '.join(ORDERS)}, outward:START[:up|down] or a comma "
                       "list of layers")
    try:
        layers = tuple(int(i) for i in order)
    except (TypeError, ValueError):
        raise VacError(f"bad --order {order!r}: layer indices must be integers") from None
    return layers


def layer_order(order, n_layers: int) -> list[int]:
    """Layer indices in compression order."""
    order = parse_order(order)
    if isinstance(order, str):
        spec = _outward_spec(order)
        return outward(n_layers, *spec) if spec else ORDERS[order](n_layers)
    if sorted(order) != list(range(n_layers)):
        raise VacError(f"an explicit --order must be a permutation of 0..{n_layers - 1}")
    return list(order)


def order_name(order: list[int] | tuple[int, ...]) -> str | None:
    """The registered name of an explicit order, if it is one."""
    n = len(order)
    return next((name for name, fn in ORDERS.items() if tuple(fn(n)) == tuple(order)), None)


def describe_order(order) -> str:
    """A registered name, ``outward from S (up|down first)``, or the permutation itself."""
    name = order_name(order)
    if name:
        return name
    gene = outward_gene(order)
    if gene:
        return f"outward from {gene[0]} ({'up' if gene[1] else 'down'} first)"
    return "perm " + ",".join(map(str, order))
