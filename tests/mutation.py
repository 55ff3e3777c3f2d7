"""Mutation testing of one or more pack modules with only the tests that cover each mutated line.

    taskset -c 1 .venv/bin/python tests/mutation.py nodes/mask.py core/images.py --sample 40 --seed 0

Each mutant is one small change made with `ast` (a comparison flipped, an arithmetic operator swapped, a constant
changed, a condition negated, `and`/`or` swapped, a `not` dropped, a return value replaced by None, a statement
removed). The repository is copied to a temporary folder once and imported from there (PYTHONPATH before the
editable install); a coverage run of the module's test files records which test covers which line; each mutant then
runs only the tests covering its line (all the selected tests for a line run only at import, such as a dataclass
field's default), with a time limit. Prints killed / survived / timeout / uncovered per module and every survivor, to
be killed by a new test or judged equivalent.

Why not mutmut 3 or cosmic-ray: the repository root is the package `stylora` (package-dir {"stylora": "."}).
mutmut 3 names its trampolined mutants after the file path (`nodes.mask.x_...`) and copies the sources to
mutants/, while the tests import `stylora.nodes.mask` from the editable install: no test ever reaches a mutant
("could not find any test case for any mutant"). cosmic-ray 8 works with a PYTHONPATH link to a copy, but runs
one fixed test command for every mutant and has no sampling: 396 mutants of nodes/mask.py at ~6 s each on one
core is ~40 minutes for one module.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", ".venv-ci", "mutants", "__pycache__", ".pytest_cache", ".ruff_cache"}
COMPARE_FLIP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}


@dataclass(frozen=True)
class Mutant:
    module: str  # path relative to the repository, e.g. nodes/mask.py
    index: int  # position in the module's list of mutants (stable for a given source)
    line: int
    what: str  # e.g. "< -> <=", "return None", "remove statement"
    source: str  # the mutated module's source


# --- Making mutants -------------------------------------------------------------------------------------------

def _is_docstring(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) \
        or isinstance(parent, ast.Expr) and isinstance(node, ast.Constant) and isinstance(node.value, str)


def _in_annotation_or_message(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Type annotations and f-string / message parts: changing them changes no behaviour a test should pin."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.JoinedStr):
            return True
        if isinstance(parent, (ast.arg, ast.AnnAssign)) and child is getattr(parent, "annotation", None):
            return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)) and child is parent.returns:
            return True
        child, parent = parent, parents.get(parent)
    return False


def _is_logging_call(node: ast.AST) -> bool:
    call = node.value if isinstance(node, ast.Expr) else None
    return isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and \
        isinstance(call.func.value, ast.Name) and call.func.value.id in ("logger", "logging")


def _changes(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[tuple[str, ast.AST | None]]:
    """The one-node replacements for `node`: (description, new node; None removes a statement)."""
    out: list[tuple[str, ast.AST | None]] = []
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE_FLIP:
        new = copy.deepcopy(node)
        new.ops = [COMPARE_FLIP[type(node.ops[0])]()]
        out.append((f"{_op(node.ops[0])} -> {_op(new.ops[0])}", new))
    elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAP:
        new = copy.deepcopy(node)
        new.op = BINOP_SWAP[type(node.op)]()
        out.append((f"{_op(node.op)} -> {_op(new.op)}", new))
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append((f"{_op(node.op)} -> {_op(new.op)}", new))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("drop not", copy.deepcopy(node.operand)))
    elif isinstance(node, ast.Constant) and not _is_docstring(node, parents) \
            and not _in_annotation_or_message(node, parents):
        v = node.value
        if isinstance(v, bool):
            out.append((f"{v} -> {not v}", ast.Constant(not v)))
        elif isinstance(v, int):
            out.append((f"{v} -> {v + 1}", ast.Constant(v + 1)))
        elif isinstance(v, float):
            out.append((f"{v!r} -> {v * 2 + 1!r}", ast.Constant(v * 2 + 1)))
    if isinstance(node, (ast.If, ast.While, ast.IfExp)):
        new = copy.deepcopy(node)
        new.test = ast.UnaryOp(ast.Not(), copy.deepcopy(node.test))
        out.append(("negate condition", new))
    if isinstance(node, ast.Return) and node.value is not None and \
            not (isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return None", ast.Return(ast.Constant(None))))
    if isinstance(node, (ast.Expr, ast.AugAssign, ast.Raise, ast.Assert, ast.Continue, ast.Break)) \
            and not _is_docstring(node, parents) and not _is_logging_call(node):
        out.append(("remove statement", None))
    return out


def _op(op: ast.AST) -> str:
    names = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
             ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
             ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**", ast.BitAnd: "&", ast.BitOr: "|",
             ast.And: "and", ast.Or: "or"}
    return names.get(type(op), type(op).__name__)


def _replace(tree: ast.Module, target: ast.AST, new: ast.AST | None) -> ast.Module:
    """A copy of `tree` with `target` (found by identity in the original) replaced; None: a removed statement
    (`pass` where the body would be empty)."""
    clone = copy.deepcopy(tree, memo := {})
    twin = memo[id(target)]
    for parent in ast.walk(clone):
        for field, value in ast.iter_fields(parent):
            if value is twin:
                setattr(parent, field, new)
                return clone
            if isinstance(value, list) and any(v is twin for v in value):
                items = [v for v in value if v is not twin] if new is None else \
                    [new if v is twin else v for v in value]
                setattr(parent, field, items or [ast.Pass()])
                return clone
    raise LookupError("mutation target not found in its tree")


def make_mutants(module: str, source: str) -> list[Mutant]:
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    mutants = []
    for node in ast.walk(tree):
        for what, new in _changes(node, parents):
            mutated = ast.unparse(ast.fix_missing_locations(_replace(tree, node, new)))
            mutants.append(Mutant(module, len(mutants), node.lineno, what, mutated))
    return mutants


# --- Which tests cover which line ------------------------------------------------------------------------------

def covering_tests(work: Path, module: str, test_args: list[str], env: dict[str, str],
                   limit_s: float) -> tuple[dict[int, set[str]], set[int]]:
    """line -> pytest node ids (test functions) that execute it, from one coverage run with per-test contexts; and
    the lines run outside every test, at import (class bodies such as dataclass defaults, decorators)."""
    import coverage

    rc = work / ".mutation-coveragerc"
    rc.write_text(f"[run]\ndynamic_context = test_function\ndata_file = {work / '.mutation-coverage'}\n"
                  f"include = {work / 'stylora' / module}\n")
    subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest", "-q", "-x",
                    "-p", "no:randomly", "-p", "no:cacheprovider", *test_args], cwd=work / "stylora", env=env,
                   capture_output=True, timeout=limit_s, check=False)
    data = coverage.CoverageData(basename=str(work / ".mutation-coverage"))
    data.read()
    target = next((f for f in data.measured_files() if f.endswith(module)), None)
    if target is None:
        return {}, set()
    by_line: dict[int, set[str]] = {}
    at_import: set[int] = set()
    for line, contexts in data.contexts_by_lineno(target).items():
        for ctx in contexts:
            if ctx:  # "test_nodes.test_mask_feather" (module.function; a class adds a part)
                test_module, _, name = ctx.partition(".")
                by_line.setdefault(line, set()).add(f"tests/{test_module}.py::{name.replace('.', '::')}")
            else:  # the empty context: run while pytest imported the test files
                at_import.add(line)
    return by_line, at_import


def _line_span(source: str) -> dict[int, int]:
    """Each line of a statement -> the statement's first line (coverage reports statements by their first line)."""
    span = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt):
            first = node.lineno
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # A def line runs at import, outside every test: its defaults are covered by the tests that run
                # the body (the first statement after the docstring).
                body = [b for b in node.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
                first = body[0].lineno if body else first
            body_start = min((c.lineno for f in ("body", "orelse", "handlers", "finalbody")
                              for c in getattr(node, f, []) or []), default=(node.end_lineno or first) + 1)
            for line in range(node.lineno, min(node.end_lineno or node.lineno, body_start - 1) + 1):
                span.setdefault(line, first)
    return span


# --- The run --------------------------------------------------------------------------------------------------

def run(modules: list[str], test_args: list[str] | None, sample: int | None, seed: int, limit_s: float,
        only: set[int] | None = None) -> int:
    # 1. A copy of the repository that `import stylora` finds first (PYTHONPATH before the editable install).
    tmp = Path(tempfile.mkdtemp(prefix="stylora-mutation-"))
    work = tmp / "work"
    shutil.copytree(REPO, work / "stylora", ignore=lambda d, names: [n for n in names if n in SKIP_DIRS])
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
    table = []
    try:
        for module in modules:
            # 2. The module's mutants (a seeded sample when asked) and the tests covering each line.
            path = work / "stylora" / module
            original = path.read_text(encoding="utf-8")
            mutants = make_mutants(module, original)
            chosen = sorted(random.Random(seed).sample(mutants, min(sample, len(mutants))) if sample else mutants,
                            key=lambda m: m.index)
            if only is not None:  # e.g. the survivors of an earlier run, after new tests were added
                chosen = [m for m in mutants if m.index in only]
            args = test_args or default_test_files(module)
            start = time.monotonic()
            cover, at_import = covering_tests(work, module, args, env, limit_s * 20)
            span = _line_span(original)
            print(f"{module}: {len(mutants)} mutants, running {len(chosen)}; coverage map of {len(cover)} lines "
                  f"from {' '.join(args)} in {time.monotonic() - start:.0f} s", flush=True)
            # 3. Each mutant against its covering tests, in the copy; the original is put back after each.
            counts = {"killed": 0, "survived": 0, "timeout": 0, "uncovered": 0}
            survivors = []
            for m in chosen:
                tests = sorted(cover.get(span.get(m.line, m.line), set()) | cover.get(m.line, set()))
                if not tests and span.get(m.line, m.line) in at_import:
                    # Run once at import (a dataclass default, a decorator; a def line maps to its body above): no
                    # test function's context holds the line, but every candidate test may see its effect.
                    tests = list(args)
                if not tests:
                    counts["uncovered"] += 1
                    survivors.append((m, "no test runs this line"))
                    continue
                path.write_text(m.source, encoding="utf-8")
                try:
                    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly",
                                           "-p", "no:cacheprovider", *tests], cwd=work / "stylora", env=env,
                                          capture_output=True, timeout=limit_s, check=False)
                    outcome = "survived" if proc.returncode == 0 else "killed"
                except subprocess.TimeoutExpired:
                    outcome = "timeout"
                finally:
                    path.write_text(original, encoding="utf-8")
                counts[outcome] += 1
                if outcome == "survived":
                    survivors.append((m, f"{len(tests)} test(s) pass"))
                print(f"  #{m.index} line {m.line} {m.what}: {outcome}", flush=True)
            table.append((module, len(mutants), len(chosen), counts, time.monotonic() - start))
            # 4. The survivors, with the original line, to kill with a test or to judge equivalent.
            lines = original.splitlines()
            for m, why in survivors:
                print(f"  SURVIVED {module}:{m.line} #{m.index} {m.what} ({why}): {lines[m.line - 1].strip()[:100]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # 5. The table.
    print(f"\n{'module':28} {'mutants':>7} {'run':>5} {'killed':>6} {'survived':>8} {'timeout':>7} {'uncovered':>9} "
          f"{'killed %':>8} {'minutes':>7}")
    for module, total, ran, c, seconds in table:
        score = 100 * (c["killed"] + c["timeout"]) / max(ran, 1)
        print(f"{module:28} {total:7} {ran:5} {c['killed']:6} {c['survived']:8} {c['timeout']:7} {c['uncovered']:9} "
              f"{score:8.1f} {seconds / 60:7.1f}")
    return 0


def default_test_files(module: str) -> list[str]:
    """The test files that import the module by its dotted name."""
    dotted = "stylora." + module.removesuffix(".py").replace("/", ".")
    parent, _, leaf = dotted.rpartition(".")
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if dotted in (text := p.read_text(encoding="utf-8")) or f"from {parent} import {leaf}" in text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+", help="module paths relative to the repository, e.g. nodes/mask.py")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="pytest arguments selecting the candidate tests (default: the test files importing "
                             "the module); the coverage run narrows them per line")
    parser.add_argument("--sample", type=int, default=None, help="run a random sample of N mutants per module")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per mutant before it counts as a timeout (default 120)")
    parser.add_argument("--mutants", default=None,
                        help="comma-separated mutant numbers (#N in a report) to run instead of a sample")
    args = parser.parse_args(argv)
    for module in args.modules:
        if not (REPO / module).is_file():
            parser.error(f"module {module!r}: no such file under {REPO}")
    if args.sample is not None and args.sample < 1:
        parser.error(f"--sample must be >= 1, got {args.sample}")
    try:
        only = {int(x) for x in args.mutants.split(",")} if args.mutants else None
    except ValueError:
        parser.error(f"--mutants: comma-separated numbers, got {args.mutants!r}")
    return run(args.modules, args.tests, args.sample, args.seed, args.timeout, only)


if __name__ == "__main__":
    sys.exit(main())
