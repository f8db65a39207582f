"""Mutation testing of the ledger's rules: how many seeded single changes do the tests catch?

Each mutant is one small change to the AST of one function in the modules below (a comparison
flipped, a constant off by one, a condition negated, ``and``/``or`` swapped, a ``raise`` or an
early ``return`` removed, arguments of a hash swapped, a byte order or prefix changed, a limit
moved by one, a state update dropped), inside a function (class attributes and decorators are
left alone). pytest collects the fast tests once (those that need no database); then a child
process is forked per mutant, which puts the mutated code into the already loaded functions
(the file on disk is never touched) and runs the collected tests, stopping at the first
failure, within a timeout. A mutant is
*killed* if a test fails (or it times out), *survives* otherwise.

    nice -n 15 .venv/bin/python tools/mutate.py            # every mutant, one process at a time
    .venv/bin/python tools/mutate.py --sample 40 --seed 3  # a seeded sample, for a quick look
    .venv/bin/python tools/mutate.py --jobs 2 --only merkle

It prints the score per module and every survivor (``file:line function: change``). Survivors
judged equivalent (no test could tell them apart from the original) are listed in
``docs/testing.md``, one line each starting with their key; the score is printed with and
without them. Not part of CI: a full run takes several minutes.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Module file -> the functions mutated (None: all of them).
TARGETS: dict[str, tuple[str, ...] | None] = {
    "ledger/domain.py": None,
    "ledger/money.py": None,
    "ledger/merkle.py": None,
    # The hash chain, and the write path's decisions (idempotency, linked chains).
    "ledger/log.py": ("genesis_hash", "chain_hash", "_Group.decide", "_Group.decide_chain"),
}
# Fast tests: none needs a database (tests that ask for one are deselected).
TESTS = [
    "tests/test_vectors.py",
    "tests/test_decisions.py",
    "tests/test_codes.py",
    "tests/test_limits_both_sides.py",
    "tests/test_domain.py",
    "tests/test_money.py",
    "tests/test_merkle.py",
]
# Names whose calls take arguments in an order that matters (hashes, byte layouts, postings).
SWAPPABLE = re.compile(r"hash|leaf|node|Posting|Entry|Totals|_Moves|move|proof|verify|range|zip")
EQUIVALENT_LIST = ROOT / "docs" / "testing.md"

Variant = tuple[str, Callable[[Any], Any]]


@dataclass(frozen=True)
class Mutant:
    index: int
    """Its number among the mutants of its file."""
    file: str
    line: int
    scope: str
    offset: int
    """Its line, counted from the first line of its function (stable while that function is)."""
    change: str
    nth: int = 0
    """Tells apart the same change at the same place (0 for the first)."""

    @property
    def key(self) -> str:
        nth = f"#{self.nth}" if self.nth else ""
        return f"{self.file}::{self.scope}+{self.offset}::{self.change}{nth}"


def _src(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 60 else text[:57] + "..."


_FLIPS: dict[type[ast.AST], type[ast.AST]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.And: ast.Or,
    ast.Or: ast.And,
}
_SYMBOL = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.Add: "+",
    ast.Sub: "-",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.And: "and",
    ast.Or: "or",
}


class _Mutator(ast.NodeTransformer):
    """Walks a module in a fixed order; numbers every possible change. With ``target`` set,
    applies that one change and leaves everything else as it was."""

    def __init__(self, file: str, scopes: tuple[str, ...] | None, target: int = -1) -> None:
        self.file = file
        self.scopes = scopes
        self.target = target
        self.found: list[Mutant] = []
        self.stack: list[str] = []
        self.starts: list[int] = []
        self.functions = 0  # how many enclosing functions
        self.skip = 0  # inside a docstring, an assert, an annotation or an error message

    # --- bookkeeping ---

    def _scope(self) -> str:
        return ".".join(self.stack) or "<module>"

    def _active(self) -> bool:
        if self.skip or not self.functions:
            return False
        if self.scopes is None:
            return True
        here = self._scope()
        return any(here == s or here.startswith(s + ".") for s in self.scopes)

    def _offer(self, node: ast.AST, variants: list[Variant]) -> ast.AST:
        if not self._active():
            return node
        for change, make in variants:
            index, line = len(self.found), getattr(node, "lineno", 0)
            offset = line - self.starts[-1]
            nth = sum(
                (m.scope, m.offset, m.change) == (self._scope(), offset, change) for m in self.found
            )
            self.found.append(Mutant(index, self.file, line, self._scope(), offset, change, nth))
            if index == self.target:
                new = make(copy.deepcopy(node))
                return ast.copy_location(new, node) if isinstance(new, ast.AST) else new
        return node

    def _visit_scope(self, node: Any) -> Any:
        self.stack.append(node.name)
        self.starts.append(node.lineno)
        # Decorators (dataclass options) are left alone: they shape the class, not the rules.
        function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        if function:
            self.skip += 1
            node.args = self.visit(node.args)
            self.skip -= 1
        self.functions += function
        body = node.body
        start = 0
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            start = 1  # the docstring
        node.body = body[:start] + self._statements(body[start:])
        self.functions -= function
        self.stack.pop()
        self.starts.pop()
        return node

    visit_FunctionDef = _visit_scope
    visit_AsyncFunctionDef = _visit_scope
    visit_ClassDef = _visit_scope

    def _statements(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in body:
            new = self.visit(stmt)
            if new is None:
                continue
            out.extend(new if isinstance(new, list) else [new])
        return out or [ast.Pass()]

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for name, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(node, name, self._statements(value))
            elif isinstance(value, list):
                setattr(node, name, [self.visit(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, name, self.visit(value))
        return node

    def _quiet(self, node: ast.AST) -> ast.AST:
        self.skip += 1
        try:
            return self.generic_visit(node)
        finally:
            self.skip -= 1

    # --- what is never mutated (equivalent by construction, or not a rule) ---

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        # An assert states an invariant correct code never breaks: weakening it cannot be seen.
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        self.skip += 1
        node.annotation = self.visit(node.annotation)
        self.skip -= 1
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        return node  # messages

    def visit_keyword(self, node: ast.keyword) -> ast.AST:
        if node.arg == "strict":
            return node  # zip(..., strict=True) is an assertion too
        return self.generic_visit(node)

    # --- operators ---

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        variants: list[Variant] = []
        for i, op in enumerate(node.ops):
            flip = _FLIPS.get(type(op))
            if flip is not None:

                def make(n: ast.Compare, i: int = i, flip: type[ast.AST] = flip) -> ast.AST:
                    n.ops[i] = flip()  # type: ignore[assignment]
                    return n

                variants.append((f"{_SYMBOL[type(op)]} -> {_SYMBOL[flip]} in `{_src(node)}`", make))
        return self._offer(node, variants)

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        flip = _FLIPS[type(node.op)]

        def make(n: ast.BoolOp) -> ast.AST:
            n.op = flip()  # type: ignore[assignment]
            return n

        return self._offer(
            node, [(f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[flip]} in `{_src(node)}`", make)]
        )

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if isinstance(node.op, ast.Not):
            return self._offer(node, [(f"`{_src(node)}` -> without `not`", lambda n: n.operand)])
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        variants: list[Variant] = []
        flip = _FLIPS.get(type(node.op))
        if flip is not None:

            def make(n: ast.BinOp) -> ast.AST:
                n.op = flip()  # type: ignore[assignment]
                return n

            variants.append(
                (f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[flip]} in `{_src(node)}`", make)
            )
        if isinstance(node.op, ast.Add) and self.file in ("ledger/merkle.py", "ledger/log.py"):
            # Byte layouts: the order of concatenated parts.
            def swap(n: ast.BinOp) -> ast.AST:
                n.left, n.right = n.right, n.left
                return n

            variants.append((f"operands swapped in `{_src(node)}`", swap))
        return self._offer(node, variants)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        flip = _FLIPS.get(type(node.op))
        if flip is None:
            return node

        def make(n: ast.AugAssign) -> ast.AST:
            n.op = flip()  # type: ignore[assignment]
            return n

        return self._offer(
            node, [(f"{_SYMBOL[type(node.op)]}= -> {_SYMBOL[flip]}= in `{_src(node)}`", make)]
        )

    def visit_If(self, node: ast.If) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]

        def make(n: ast.If) -> ast.AST:
            n.test = ast.UnaryOp(ast.Not(), n.test)
            return n

        return self._offer(node, [(f"condition negated: `if {_src(node.test)}`", make)])

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        variants: list[Variant] = []
        if isinstance(value, bool):
            variants.append((f"{value} -> {not value}", lambda n: ast.Constant(not n.value)))
        elif isinstance(value, int):
            variants.append((f"{value} -> {value + 1}", lambda n: ast.Constant(n.value + 1)))
            variants.append((f"{value} -> {value - 1}", lambda n: ast.Constant(n.value - 1)))
        elif isinstance(value, bytes):
            other = bytes([value[0] ^ 1]) + value[1:] if value else b"\x00"
            variants.append((f"{value!r} -> {other!r}", lambda n, o=other: ast.Constant(o)))
        elif value in ("big", "little"):
            other = "little" if value == "big" else "big"
            variants.append(
                (f"byte order {value!r} -> {other!r}", lambda n, o=other: ast.Constant(o))
            )
        elif isinstance(value, str) and getattr(node, "_keyish", False):
            variants.append(
                (f"{value!r} -> {'X' + value!r}", lambda n: ast.Constant("X" + n.value))
            )
        return self._offer(node, variants)

    def visit_Dict(self, node: ast.Dict) -> ast.AST:
        for k in node.keys:
            if isinstance(k, ast.Constant):
                k._keyish = True  # type: ignore[attr-defined]
        return self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if isinstance(node.value, ast.Name) and node.value.id == "limits":

            def plus(n: ast.Attribute, d: int) -> ast.AST:
                return ast.BinOp(n, ast.Add() if d > 0 else ast.Sub(), ast.Constant(1))

            return self._offer(
                node,
                [
                    (f"limits.{node.attr} -> +1", lambda n: plus(n, 1)),
                    (f"limits.{node.attr} -> -1", lambda n: plus(n, -1)),
                ],
            )
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "errors"
        ):
            return self._quiet(node)  # an error's message and extras
        node = self.generic_visit(node)  # type: ignore[assignment]
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (
            len(node.args) >= 2
            and SWAPPABLE.search(name)
            and _src(node.args[0]) != _src(node.args[1])
        ):

            def swap(n: ast.Call) -> ast.AST:
                n.args[0], n.args[1] = n.args[1], n.args[0]
                return n

            return self._offer(node, [(f"arguments swapped in `{_src(node)}`", swap)])
        return node

    # --- statements ---

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        return self._offer(node, [(f"raise removed: `{_src(node)}`", lambda n: ast.Pass())])

    def visit_Return(self, node: ast.Return) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if getattr(node, "_early", False):
            return self._offer(
                node, [(f"early return removed: `{_src(node)}`", lambda n: ast.Pass())]
            )
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if isinstance(node.value, ast.Call):
            return self._offer(node, [(f"call removed: `{_src(node)}`", lambda n: ast.Pass())])
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if any(isinstance(t, ast.Subscript | ast.Attribute) for t in node.targets):
            return self._offer(node, [(f"update removed: `{_src(node)}`", lambda n: ast.Pass())])
        return node


def _mark(tree: ast.Module) -> None:
    """Marks returns that are not their function's last statement, and string constants that
    are compared or used as keys (the ones whose text matters)."""
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            last = fn.body[-1]
            for node in ast.walk(fn):
                if isinstance(node, ast.Return) and node is not last and node.value is not None:
                    node._early = True  # type: ignore[attr-defined]
        if isinstance(fn, ast.Compare):
            for operand in [fn.left, *fn.comparators]:
                if isinstance(operand, ast.Constant):
                    operand._keyish = True  # type: ignore[attr-defined]
        if isinstance(fn, ast.Subscript) and isinstance(fn.slice, ast.Constant):
            fn.slice._keyish = True  # type: ignore[attr-defined]


_SOURCES: dict[str, str] = {}
"""Each target's text as read once at the start: the tree is shared with others who may edit a
file during a run, and every mutant must be numbered against the same text."""


def _source(file: str) -> str:
    if file not in _SOURCES:
        _SOURCES[file] = (ROOT / file).read_text()
    return _SOURCES[file]


def _tree(file: str) -> ast.Module:
    tree = ast.parse(_source(file), filename=str(ROOT / file))
    _mark(tree)
    return tree


def mutants(only: str | None = None) -> list[Mutant]:
    found: list[Mutant] = []
    for file, scopes in TARGETS.items():
        if only and only not in file:
            continue
        walker = _Mutator(file, scopes)
        walker.visit(_tree(file))
        found.extend(walker.found)
    return found


def mutated_code(mutant: Mutant) -> Any:
    walker = _Mutator(mutant.file, TARGETS[mutant.file], target=mutant.index)
    tree = walker.visit(_tree(mutant.file))
    ast.fix_missing_locations(tree)
    return compile(tree, str(ROOT / mutant.file), "exec")


# --- Running ---------------------------------------------------------------------------------
#
# pytest runs once in this process: it imports and collects the fast tests, then, instead of
# running them, our ``pytest_runtestloop`` forks a child per mutant. The child swaps the code of
# the mutated function into the function objects already loaded (so every module that imported
# it sees the change), then runs the collected tests with pytest's own runner, stopping at the
# first failure. Collection is paid once; a killed mutant usually costs a fraction of a second.

# Not about behaviour: the static check that every error code appears in some test.
NOT_RUN = {"test_every_error_code_is_produced_or_named_by_some_test"}


def _functions(namespace: dict[str, Any], module_name: str) -> dict[str, Any]:
    """Qualified name -> function object, for the functions and methods defined in a module."""
    found: dict[str, Any] = {}

    def add(name: str, obj: Any) -> None:
        obj = getattr(obj, "__func__", obj)  # staticmethod, classmethod
        obj = getattr(obj, "__wrapped__", obj)  # functools.lru_cache
        if callable(obj) and hasattr(obj, "__code__"):
            found[name] = obj

    for name, obj in namespace.items():
        if isinstance(obj, type) and obj.__module__ == module_name:
            for attr, member in vars(obj).items():
                if isinstance(member, property):
                    member = member.fget
                add(f"{name}.{attr}", member)
        elif getattr(obj, "__module__", None) == module_name:
            add(name, obj)
    return found


def _compiled(file: str, code: Any = None) -> dict[str, Any]:
    """The functions of ``file`` (as read at the start; mutated if ``code`` is given), defined
    in a namespace of their own."""
    name = file[:-3].replace("/", ".")
    namespace: dict[str, Any] = {"__name__": name, "__file__": str(ROOT / file)}
    source = compile(_source(file), str(ROOT / file), "exec") if code is None else code
    exec(source, namespace)
    return _functions(namespace, name)


def _signature(f: Any) -> tuple[Any, ...]:
    return (f.__code__, f.__defaults__, f.__kwdefaults__)


def _loaded_as_read() -> list[str]:
    """Target files whose loaded functions differ from their text read at the start (someone
    edited them in between): a run against those would measure a mixture."""
    changed = []
    for file in TARGETS:
        name = file[:-3].replace("/", ".")
        live = _functions(vars(sys.modules[name]), name)
        read = _compiled(file)
        if any(_signature(f) != _signature(live[q]) for q, f in read.items() if q in live):
            changed.append(file)
    return changed


def _swap(mutant: Mutant) -> None:
    """Puts the mutated code into the live function objects of the mutant's module: only the
    functions the mutation changed."""
    name = mutant.file[:-3].replace("/", ".")
    module = sys.modules[name]
    base = _compiled(mutant.file)
    try:
        mutated = _compiled(mutant.file, mutated_code(mutant))
    except Exception:
        os._exit(1)  # the mutated module cannot even be imported: any test would fail
    live = _functions(vars(module), name)
    changed = 0
    for qualname, new in mutated.items():
        old = live.get(qualname)
        if old is None or qualname not in base:
            continue
        if _signature(base[qualname]) != _signature(new):
            old.__code__ = new.__code__
            old.__defaults__, old.__kwdefaults__ = new.__defaults__, new.__kwdefaults__
            changed += 1
    for obj in vars(module).values():
        if hasattr(obj, "cache_clear"):
            obj.cache_clear()  # memoised results of the original code
    if not changed:
        raise RuntimeError(f"mutant {mutant.key} changed no function")


def _run_tests(session: Any) -> int:
    """0 if every collected test passes, 1 at the first failure."""
    from _pytest.runner import runtestprotocol

    items = session.items
    for i, item in enumerate(items):
        following = items[i + 1] if i + 1 < len(items) else None
        reports = runtestprotocol(item, nextitem=following, log=False)
        if any(r.failed for r in reports):
            return 1
    return 0


@dataclass
class _Driver:
    """The pytest plugin that turns one test session into a mutation run."""

    selected: list[Mutant]
    jobs: int
    timeout_s: float | None
    results: dict[Mutant, str]
    baseline_s: float = 0.0

    @staticmethod
    def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
        # Tests that need a database would start Postgres for every mutant: deselected.
        kept = [
            i
            for i in items
            if not {"database_url", "server_url"} & set(i.fixturenames)
            and i.originalname not in NOT_RUN
        ]
        deselected = [i for i in items if i not in kept]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
        items[:] = kept

    def pytest_runtestloop(self, session: Any) -> bool:
        edited = _loaded_as_read()
        if edited:
            print(f"\n{', '.join(edited)} changed while the run started: run it again")
            self.results.clear()
            return True
        started = time.monotonic()
        status = _wait(_fork(session, None, 600), 600)
        self.baseline_s = time.monotonic() - started
        if status != "survived":
            print(f"\nthe tests fail without any mutant ({status}): fix them first")
            self.results.clear()
            return True
        timeout_s = self.timeout_s or max(10.0, 3 * self.baseline_s)
        print(
            f"\nbaseline: {len(session.items)} tests pass in {self.baseline_s:.1f} s;"
            f" {len(self.selected)} mutants, timeout {timeout_s:.0f} s",
            flush=True,
        )
        queue: Iterator[Mutant] = iter(self.selected)
        running: dict[int, tuple[Mutant, float]] = {}
        done = 0
        while True:
            while len(running) < self.jobs:
                m = next(queue, None)
                if m is None:
                    break
                running[_fork(session, m, timeout_s)] = (m, time.monotonic())
            if not running:
                return True
            for pid, (m, began) in list(running.items()):
                finished, code = os.waitpid(pid, os.WNOHANG)
                if finished:
                    exit_code = os.waitstatus_to_exitcode(code)
                    self.results[m] = {0: "survived", 1: "killed"}.get(
                        exit_code, f"error({exit_code})"
                    )
                elif time.monotonic() - began > timeout_s:
                    os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    self.results[m] = "timeout"
                else:
                    continue
                del running[pid]
                done += 1
                mark = "S" if self.results[m] == "survived" else "."
                print(mark, end="" if done % 80 else f" {done}\n", flush=True)
            time.sleep(0.01)


def _fork(session: Any, mutant: Mutant | None, timeout_s: float) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        os.setsid()
        signal.alarm(int(timeout_s) + 5)  # never outlives the run, even if the parent dies
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        if mutant is not None:
            _swap(mutant)
        code = _run_tests(session)
    finally:
        os._exit(code)


def _wait(pid: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return {0: "survived", 1: "killed"}.get(code, f"error({code})")
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.02)


def _equivalent_keys() -> set[str]:
    if not EQUIVALENT_LIST.exists():
        return set()
    # Lines "- `KEY` — why" (a key may itself hold backticks: the last "` — " ends it).
    return set(re.findall(r"^- `(.+::.+)` — ", EQUIVALENT_LIST.read_text(), re.M))


def main(argv: list[str] | None = None) -> int:
    import pytest

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sample", type=int, help="run only this many mutants, chosen by --seed")
    parser.add_argument("--seed", type=int, default=12, help="sampling and hypothesis seed")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--only", help="only target files whose path contains this")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 3x baseline)")
    parser.add_argument("--match", help="only mutants whose key contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args(argv)

    every = [m for m in mutants(args.only) if not args.match or args.match in m.key]
    selected = every
    if args.sample:
        chosen = set(
            random.Random(args.seed).sample(range(len(every)), min(args.sample, len(every)))
        )
        selected = [m for i, m in enumerate(every) if i in chosen]
    if args.list:
        for m in selected:
            print(f"{m.file}:{m.line} {m.scope}: {m.change}")
        print(f"{len(selected)} mutants")
        return 0

    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "mutate", database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    settings.load_profile("mutate")
    started = time.monotonic()
    results: dict[Mutant, str] = {}
    driver = _Driver(selected, args.jobs, args.timeout, results)
    pytest.main(
        [
            *[str(ROOT / t) for t in TESTS if (ROOT / t).exists()],
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "-W",
            "ignore",
            f"--hypothesis-seed={args.seed}",
            f"--rootdir={ROOT}",
        ],
        plugins=[driver],
    )
    if not results:
        return 2
    print()
    equivalent = _equivalent_keys()
    survivors = [m for m in selected if results[m] == "survived"]
    errors = [m for m in selected if results[m].startswith("error")]
    for file in dict.fromkeys(m.file for m in selected):
        mine = [m for m in selected if m.file == file]
        mine = [m for m in mine if not results[m].startswith("error")]
        dead = len(mine) - sum(results[m] == "survived" for m in mine)
        print(f"{file}: {dead}/{len(mine)} killed ({100 * dead / len(mine):.1f} %)")
    applied = len(selected) - len(errors)
    killed = applied - len(survivors)
    print(
        f"score: {killed}/{applied} killed = {100 * killed / max(1, applied):.1f} %"
        f" ({sum(results[m] == 'timeout' for m in selected)} of them by timeout;"
        f" {len(errors)} mutants could not be applied and are not counted)"
    )
    unexplained = [m for m in survivors if m.key not in equivalent]
    counted = applied - (len(survivors) - len(unexplained))
    print(
        f"score without the {len(survivors) - len(unexplained)} survivors documented as equivalent"
        f" in docs/testing.md: {counted - len(unexplained)}/{counted}"
        f" = {100 * (counted - len(unexplained)) / max(1, counted):.1f} %"
    )
    if survivors:
        print("\nsurvivors:")
        for m in survivors:
            tag = "  (equivalent)" if m.key in equivalent else ""
            print(f"  {m.file}:{m.line} {m.scope}: {m.change}{tag}")
            print(f"    - `{m.key}`")
    if errors:
        print("\nnot applied (not counted):")
        for m in errors:
            print(f"  {m.file}:{m.line} {m.scope}: {m.change}")
    print(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
