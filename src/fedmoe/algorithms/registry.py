"""The methods fedmoe knows: one line each. ``algorithm.name`` takes these names, and
``algorithm.<name>`` is the method's own config section (see each method's file)."""

from . import fcmoe, fedit, flame, flex, local, rank_hetero, scaffold
from .base import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    fedit.METHOD,
    flame.METHOD,
    rank_hetero.TRIVIAL,
    rank_hetero.HETLORA,
    rank_hetero.FLEXLORA,
    flex.METHOD,
    scaffold.METHOD,
    fcmoe.METHOD,
    local.METHOD,
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown algorithm '{name}'; available: {', '.join(METHODS)}")
    return METHODS[name]
