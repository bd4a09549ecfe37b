"""The shape checks: what stopright/upstream/ relies on in a library, checked against the installed one.

Each check names its reach (a key of a ``REACHES`` dict in this package) and,
when it fails, what changed upstream and what to re-read. The repository's
shape tests run them all; :mod:`stopright.upstream.support` runs the cheap ones
at start and keeps the stock behaviour of a part whose check fails.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import textwrap
from collections.abc import Iterable
from typing import Any, NoReturn

from stopright.upstream import source_digest


class ShapeChanged(Exception):
    """An upstream shape stopright relies on changed; the message says which and what to re-read."""


def fail(reach: str, what: str, then: str) -> NoReturn:
    """Raise :class:`ShapeChanged`: ``what`` changed upstream, ``then`` what to re-read, naming the reach."""
    raise ShapeChanged(f"{what}: {then}  [reach: {reach!r}]")


def _library(obj: Any) -> str:
    """``celery 5.7.0`` for an object of Celery (the installed version): who changed."""
    if inspect.ismodule(obj):
        module: str | None = obj.__name__
    else:
        module = getattr(obj if inspect.isclass(obj) or callable(obj) else type(obj), "__module__", None)
    top = (module or "?").split(".")[0]
    try:
        version = importlib.metadata.version(top)
    except Exception:  # a module of no distribution (the standard library, a test's own)
        return top
    return f"{top} {version}"


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


# -- copies: the upstream source, by its digest -------------------------------------------------


def check_digest(reach: str, upstream: Any, pinned: str, copy_in: str) -> None:
    """The installed ``upstream``'s source has the ``pinned`` digest (the version the copy follows)."""
    actual = source_digest(upstream)
    if actual != pinned:
        fail(reach, f"{_library(upstream)} changed {_name(upstream)} (digest {actual}, pinned {pinned})",
              f"re-read it and update the copy in {copy_in}, then the pin")


# -- hooks: overridden or called, by their signature ---------------------------------------------


def _shape(fn: Any) -> list[tuple[str, Any, Any]]:
    """Parameter names, kinds and defaults; annotations left out (ours have them, upstream's not)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _plain(fn: Any) -> str:
    """``fn``'s signature as text, without annotations: ``(self, deadline)``."""
    sig = inspect.signature(fn)
    return str(sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                           return_annotation=sig.empty))


def upstream_definition(ours: type, name: str) -> tuple[type, Any]:
    """The first class after stopright's own in ``ours``' MRO that defines ``name``: what ``super()`` runs."""
    for klass in ours.__mro__:
        if name in vars(klass) and not klass.__module__.startswith("stopright"):
            return klass, vars(klass)[name]
    raise LookupError(name)


def check_override(reach: str, ours: type, name: str) -> None:
    """``ours.name`` overrides a method upstream still has, with the same parameters."""
    try:
        klass, upstream = upstream_definition(ours, name)
    except LookupError:
        bases = [b.__qualname__ for b in ours.__mro__ if not b.__module__.startswith("stopright")]
        fail(reach, f"no upstream class of {ours.__qualname__} ({', '.join(bases)}) defines {name} any more",
              f"re-read the upgrade's {bases[0] if bases else '?'}: {ours.__module__}.{ours.__qualname__}."
              f"{name} overrides a hook that is never called now")
        return
    ours_fn = inspect.getattr_static(ours, name)
    if _shape(upstream) != _shape(ours_fn):
        fail(reach, f"{_library(klass)} changed {klass.__qualname__}.{name}{_plain(upstream)}",
              f"{ours.__module__} overrides it as {name}{_plain(ours_fn)}; re-read the upstream "
              f"method and its callers, and update the override")


def check_signature(reach: str, upstream: Any, params: str) -> None:
    """``upstream`` (a function or class we call) takes the parameters we pass, e.g. ``"self, sig"``."""
    fn = upstream.__init__ if inspect.isclass(upstream) else upstream
    names = [p.name for p in inspect.signature(fn).parameters.values()]
    if names != [p.strip() for p in params.split(",") if p.strip()]:
        fail(reach, f"{_library(upstream)} changed {_name(upstream)}: ({', '.join(names)}), we call it "
              f"with ({params})", "re-read it and update the calls in stopright/upstream/")


# -- behaviour relied on: the call sites in the upstream source ---------------------------------


def function_tree(fn: Any) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        raise TypeError(f"not a function: {fn!r}")
    return node  # type: ignore[return-value]


def calls(node: ast.AST | Any) -> list[str]:
    """Every call in ``node`` (an ast node, or a function: its source), as source text, in source order."""
    if not isinstance(node, ast.AST):
        node = function_tree(node)
    found: list[str] = []

    class Visitor(ast.NodeVisitor):
        def visit_Call(self, call: ast.Call) -> None:
            found.append(ast.unparse(call))
            self.generic_visit(call)

    Visitor().visit(node)
    return found


def check_calls(reach: str, upstream: Any, expected: Iterable[str], relied_on: str,
                found: list[str] | None = None) -> None:
    """``upstream``'s source makes these calls, in this order (each a prefix of the call's text).

    ``found``: the calls to look in, when only part of the function counts (default: all of it).
    """
    seen = calls(upstream) if found is None else found
    position = 0
    for want in expected:
        at = next((i for i in range(position, len(seen)) if seen[i].startswith(want)), None)
        if at is None:
            fail(reach, f"{_library(upstream)} changed {_name(upstream)}: no call {want!r}"
                  f"{' after ' + repr(seen[position - 1]) if position else ''}",
                  f"stopright relies on it ({relied_on}); re-read {_name(upstream)} and what stopright "
                  f"does there")
        position = at + 1


def check_no_call(reach: str, upstream: Any, containing: str, relied_on: str) -> None:
    """``upstream``'s source makes no call whose text contains ``containing``."""
    bad = [c for c in calls(upstream) if containing in c]
    if bad:
        fail(reach, f"{_library(upstream)} changed {_name(upstream)}: it now calls {bad[0]!r}",
              f"stopright relies on it not doing so ({relied_on}); re-read it")


def normalized(fn: Any) -> str:
    """``fn``'s source as ``ast.unparse`` writes it (one quoting, no comments), each line stripped."""
    return "\n".join(line.strip() for line in ast.unparse(function_tree(fn)).splitlines())


def check_text(reach: str, upstream: Any, snippets: Iterable[str], relied_on: str) -> None:
    """``upstream``'s normalized source (:func:`normalized`) holds these snippets, in this order."""
    text = normalized(upstream)
    position = 0
    for want in snippets:
        at = text.find(want, position)
        if at < 0:
            fail(reach, f"{_library(upstream)} changed {_name(upstream)}: no {want!r} in its source"
                  f"{' after the previous one' if position else ''}",
                  f"stopright relies on it ({relied_on}); re-read {_name(upstream)} and what stopright "
                  f"does there")
        position = at + len(want)


# -- private attributes --------------------------------------------------------------------------


def check_attributes(reach: str, obj: Any, names: Iterable[str], what: str = "") -> None:
    """``obj`` (a real object or class of the library) has every one of ``names``."""
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        if not what:
            holder = obj if inspect.isclass(obj) else type(obj)
            what = obj.__name__ if inspect.ismodule(obj) else _name(holder)
        fail(reach, f"{_library(obj)} changed {what}: no {', '.join(missing)}",
              "re-read where stopright/upstream/ uses it and what replaced it")


def self_attributes(fn: Any) -> set[str]:
    """The names ``fn`` reads or sets on ``self``."""
    return {node.attr for node in ast.walk(function_tree(fn)) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "self"}


def check_self_attributes(reach: str, copy: Any, upstream_cls: type) -> None:
    """Every ``self.<name>`` of our ``copy`` is still an attribute of ``upstream_cls``: a class attribute,
    or one its classes' source sets or uses on ``self`` (instance attributes live in ``__init__``)."""
    sources = "\n".join(inspect.getsource(k) for k in upstream_cls.__mro__ if k.__module__ != "builtins")
    missing = sorted(n for n in self_attributes(copy)
                     if not hasattr(upstream_cls, n) and f"self.{n}" not in sources)
    if missing:
        fail(reach, f"{_library(upstream_cls)} changed {upstream_cls.__qualname__}: no "
              f"{', '.join('self.' + n for n in missing)}",
              f"the copy {_name(copy)} uses them; re-read the class and update the copy, then the pin")
