"""The methods fedmoe knows: its own, one line each, and those that other installed packages declare under the
entry-point group ``fedmoe.methods`` (``name = "package.module:METHOD"``, a :class:`~fedmoe.algorithms.base.Method`
whose name is the entry point's). ``algorithm.name`` takes these names, and ``algorithm.<name>`` is the method's own
config section (see each method's file).

An installed method is loaded when this module is imported, so the config, the command line, the export and a Flower
node know it as they know fedmoe's own (its module may not import ``fedmoe.config`` or ``fedmoe.federation`` when it
is imported: they import this one). One that cannot be used — its module fails to import, the object is not a
``Method``, its name differs from the entry point's, cannot name a config section or is one of fedmoe's own (or of
the ``algorithm`` section's keys), its config section is not a ``StrictModel`` with defaults, or two packages declare
it — is left out with a warning, and a run that names it is refused with the reason (:func:`unknown_method`)."""

from __future__ import annotations

import importlib.metadata
import keyword
import warnings

from . import fcmoe, fedit, flame, flex, local, rank_hetero, scaffold
from ..configbase import StrictModel
from .base import Client, Method, Server

ENTRY_POINT_GROUP = "fedmoe.methods"

BUILTIN: dict[str, Method] = {m.name: m for m in (
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

# the algorithm section's own keys (fedmoe.config): a method's section algorithm.<name> may not take one
RESERVED = ("name", "server_optimizer", "client_top_k", "budgets")


def _where(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"entry point '{ep.name} = {ep.value}'" + (f" (package {dist.name})" if dist is not None else "")


def _problem(ep, method) -> str | None:
    """Why the object entry point ``ep`` loaded cannot be a method, or None: anything that would stop the config's
    ``algorithm`` section being built from it (and so every fedmoe command, whatever method it runs)."""
    if not isinstance(method, Method):
        return f"{_where(ep)} is a {type(method).__name__}, not a fedmoe.algorithms.Method"
    if method.name != ep.name:
        return (f"{_where(ep)} holds the method named {method.name!r}: its Method.name and the entry point's name "
                "must be the same (algorithm.name takes it)")
    if not (isinstance(method.server, type) and issubclass(method.server, Server)
            and isinstance(method.client, type) and issubclass(method.client, Client)):
        return f"{_where(ep)}: its server and client must be subclasses of fedmoe.algorithms.Server and Client"
    if method.config is not None:
        if not (isinstance(method.config, type) and issubclass(method.config, StrictModel)):
            return (f"{_where(ep)}: its config is {method.config!r}, not a subclass of fedmoe.configbase.StrictModel "
                    "(the class of its section algorithm.<name>, unknown keys refused)")
        try:
            method.config()
        except Exception as e:  # noqa: BLE001 — the section must have a value when the config does not set it
            return (f"{_where(ep)}: its config section has no default ({type(e).__name__}: "
                    f"{str(e).splitlines()[0]}...): give every field a default")
    return None


_IMPORT_CIRCLE = ("; a method's module, when imported, may import fedmoe.algorithms, fedmoe.configbase, fedmoe.moe, "
                  "fedmoe.train and fedmoe.messages, not fedmoe.config or fedmoe.federation (which import the "
                  "methods): its halves read its settings from the config they are given, and RunConfig is for type hints under "
                  "typing.TYPE_CHECKING")


def installed_methods(builtin: dict[str, Method] = BUILTIN, entry_points=None) -> tuple[dict[str, Method],
                                                                                         dict[str, str]]:
    """The methods other packages declare (``entry_points``: those of :data:`ENTRY_POINT_GROUP` by default), and
    ``{name: reason}`` for each declared name that cannot be used."""
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    eps = sorted(entry_points, key=lambda ep: (ep.name, ep.value))
    methods: dict[str, Method] = {}
    broken: dict[str, str] = {}
    declared: dict[str, list] = {}
    for ep in eps:
        declared.setdefault(ep.name, []).append(ep)
    for name, same in declared.items():
        if len({ep.value for ep in same}) > 1:  # (one package installed twice on the path declares it twice alike)
            broken[name] = (f"two installed packages declare a fedmoe method named {name!r}: "
                            f"{'; '.join(_where(ep) for ep in same)}; uninstall one")
            continue
        ep = same[0]
        if name in builtin or name in RESERVED:
            broken[name] = (f"{_where(ep)}: {name!r} is " + ("one of fedmoe's own methods" if name in builtin else
                                                             "a key of the algorithm section")
                            + "; give the method another name")
            continue
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_") or hasattr(StrictModel, name):
            broken[name] = (f"{_where(ep)}: {name!r} cannot name a config section algorithm.<name> (a Python "
                            "identifier, not starting with '_', not a name pydantic's models use); give the method "
                            "another name")
            continue
        try:
            method = ep.load()
        except Exception as e:  # noqa: BLE001 — any failure of another package's import is that package's reason
            circle = isinstance(e, ImportError) and "partially initialized module 'fedmoe" in str(e)
            broken[name] = f"{_where(ep)} could not be loaded: {type(e).__name__}: {e}" + (_IMPORT_CIRCLE if circle
                                                                                          else "")
            continue
        if (problem := _problem(ep, method)) is not None:
            broken[name] = problem
        else:
            methods[name] = method
    return methods, broken


INSTALLED, BROKEN = installed_methods()
for _reason in BROKEN.values():
    warnings.warn(f"fedmoe leaves out an installed method: {_reason}", stacklevel=2)

METHODS: dict[str, Method] = {**BUILTIN, **INSTALLED}


def unknown_method(name: str) -> str:
    """Why ``algorithm.name`` ``name`` names no method, and what to do."""
    if name in BROKEN:
        return f"the method {name!r} is installed but cannot be used: {BROKEN[name]}"
    return (f"unknown algorithm {name!r}; available: {', '.join(METHODS)} (a method of another package is known once "
            f"that package is installed in this environment, declaring it under the entry-point group "
            f"{ENTRY_POINT_GROUP!r}; on Flower, on every node too)")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(unknown_method(name))
    return METHODS[name]


__all__ = ["BROKEN", "BUILTIN", "ENTRY_POINT_GROUP", "METHODS", "get_method", "installed_methods", "unknown_method"]
