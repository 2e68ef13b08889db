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


@register_order("middle-out")
def _middle_out(n: int) -> list[int]:
    """middle, middle+1, middle−1, middle+2, …"""
    mid, result = n // 2, []
    for k in range(n):
        for i in (mid + k, mid - k) if k else (mid,):
            if 0 <= i < n and i not in result:
                result.append(i)
    return result


@register_order("front-to-back")
def _front_to_back(n: int) -> list[int]:
    return list(range(n))


@register_order("back-to-front")
def _back_to_front(n: int) -> list[int]:
    return list(reversed(range(n)))


def parse_order(order) -> str | tuple[int, ...]:
    """A registered name, or an explicit order (``"3,2,1,0"`` or a sequence of integers) as a tuple."""
    if isinstance(order, str):
        if order in ORDERS:
            return order
        items = [x.strip() for x in order.split(",")]
        if len(items) > 1 or items[0].isdigit():
            if not all(x.isdigit() for x in items):
                raise VacError(f"bad --order '{order}': a comma list of layer indices needs integers only")
            return tuple(int(x) for x in items)
        raise VacError(f"unknown order '{order}'; choose {', '.join(ORDERS)} or a comma list of layers")
    try:
        layers = tuple(int(i) for i in order)
    except (TypeError, ValueError):
        raise VacError(f"bad --order {order!r}: layer indices must be integers") from None
    return layers


def layer_order(order, n_layers: int) -> list[int]:
    """Layer indices in compression order."""
    order = parse_order(order)
    if isinstance(order, str):
        return ORDERS[order](n_layers)
    if sorted(order) != list(range(n_layers)):
        raise VacError(f"an explicit --order must be a permutation of 0..{n_layers - 1}")
    return list(order)


def order_name(order: list[int] | tuple[int, ...]) -> str | None:
    """The registered name of an explicit order, if it is one."""
    n = len(order)
    return next((name for name, fn in ORDERS.items() if tuple(fn(n)) == tuple(order)), None)
