"""Every public function, class and method of the checked modules has a Google-style docstring naming each of its
parameters under `Args:`.

jsonargparse reads these docstrings (through docstring_parser, as here) to explain every key of
`mamba2d fit --model.help ...`; an undocumented parameter is a key the CLI cannot explain. The source is read with
`ast`, so nothing is imported and a module that fails to import is still checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import docstring_parser
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mamba2d"

# Subpackages (every module under them), plain modules, and the package root (its __init__ only): the whole package.
CHECKED = ("mamba2d.analysis", "mamba2d.cli", "mamba2d.data", "mamba2d.models", "mamba2d.ops", "mamba2d.tasks",
           "mamba2d.wsi", "mamba2d.zoo", "mamba2d.checkpoints", "mamba2d.compat", "mamba2d.resources", "mamba2d")

# Overrides of PyTorch / Lightning hooks: their parameters are the framework's and documented there, and
# jsonargparse never builds a CLI key from them. Names ending in "_dataloader" and starting with "on_" are hooks too.
FRAMEWORK_HOOKS = frozenset({
    "forward", "training_step", "validation_step", "test_step", "predict_step", "setup", "configure_optimizers",
    "state_dict", "load_state_dict", "extra_repr",
})

# Hooks of framework base classes that the framework calls with its own arguments (torchmetrics' `Metric.update` /
# `compute`, Lightning's `BasePredictionWriter.write_on_batch_end` / `write_on_epoch_end`): exempt only in a class
# that names the base among its own bases, since these names are ordinary elsewhere (a `compute` function, an
# `update` method of any class). The source is read with `ast`, so a subclass of a subclass is checked in full.
BASE_HOOKS = {
    "Metric": frozenset({"update", "compute"}),
    "BasePredictionWriter": frozenset({"write_on_batch_end", "write_on_epoch_end"}),
}

# Decorators whose class's __init__ parameters are its annotated class attributes.
FIELD_CLASS_DECORATORS = ("dataclass",)
FIELD_CLASS_BASES = ("NamedTuple",)


def is_framework_hook(name: str, bases: tuple[str, ...] = ()) -> bool:
    """Whether method `name` overrides a PyTorch / Lightning / torchmetrics hook (exempt from the check).

    Args:
        name: The method's name.
        bases: The last dotted component of each base of the method's class (`torchmetrics.Metric` -> 'Metric').
    """
    return (name in FRAMEWORK_HOOKS or name.endswith("_dataloader") or name.startswith("on_")
            or any(name in BASE_HOOKS.get(base, ()) for base in bases))


def _documented(docstring: str | None) -> set[str]:
    """Names listed under an Args-style section (Args, Arguments, Parameters, Params), stars stripped."""
    parsed = docstring_parser.parse(docstring or "", style=docstring_parser.DocstringStyle.GOOGLE)
    return {meta.args[1].lstrip("*") for meta in parsed.meta
            if isinstance(meta, docstring_parser.DocstringParam) and meta.args[0] == "param"}


def _parameters(func: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[str]:
    args = func.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in func.decorator_list)
    if method and not static and names and names[0] in ("self", "cls"):
        names = names[1:]
    names += [a.arg for a in args.kwonlyargs]
    return names + [a.arg for a in (args.vararg, args.kwarg) if a is not None]


def _name(node: ast.expr) -> str:
    """The last dotted component of a decorator or base (`dataclasses.dataclass(frozen=True)` -> 'dataclass')."""
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _fields(cls: ast.ClassDef) -> list[str]:
    """The __init__ parameters of a dataclass or NamedTuple: its annotated attributes, ClassVars excepted."""
    return [stmt.target.id for stmt in cls.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            and "ClassVar" not in ast.unparse(stmt.annotation)]


def _check(where: str, docstrings: list[str | None], params: list[str]) -> str | None:
    if not any(docstrings):
        return f"{where}: no docstring"
    documented = set().union(*(_documented(doc) for doc in docstrings))
    missing = [p for p in params if p not in documented]
    return f"{where}: parameters not under Args: {', '.join(missing)}" if missing else None


def offenders(source: str, filename: str) -> list[str]:
    """Every public module-level function, public class and public method of `source` without a docstring that
    names each of its parameters under `Args:`.

    A class may document its __init__ parameters in the class docstring or in __init__'s (jsonargparse reads both);
    a dataclass's or NamedTuple's parameters are its fields. `*args` / `**kwargs` count as documented under either
    spelling. Methods that override framework hooks (`FRAMEWORK_HOOKS`, and `BASE_HOOKS` in a class deriving from
    their base) are exempt.

    Args:
        source: Python source text.
        filename: How messages name the file.

    Returns:
        One `file:line name: problem` line per offender, in source order.
    """
    found = []
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        where = f"{filename}:{node.lineno} {node.name}"
        if not isinstance(node, ast.ClassDef):
            found.append(_check(where, [ast.get_docstring(node)], _parameters(node, method=False)))
            continue
        methods = [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
        init = next((m for m in methods if m.name == "__init__"), None)
        if init is not None:
            params = _parameters(init, method=True)
        elif any(_name(d) in FIELD_CLASS_DECORATORS for d in node.decorator_list) or any(
                _name(b) in FIELD_CLASS_BASES for b in node.bases):
            params = _fields(node)
        else:
            params = []
        found.append(_check(where, [ast.get_docstring(node)] + ([ast.get_docstring(init)] if init else []), params))
        bases = tuple(_name(base) for base in node.bases)
        for method in methods:
            if method.name.startswith("_") or is_framework_hook(method.name, bases):
                continue
            found.append(_check(f"{filename}:{method.lineno} {node.name}.{method.name}",
                                [ast.get_docstring(method)], _parameters(method, method=True)))
    return [problem for problem in found if problem]


def module_files(name: str) -> list[Path]:
    """The source files of a `CHECKED` name: every module of a subpackage, the file of a module, or the package
    root's __init__ for `mamba2d` itself.

    Args:
        name: A dotted module or package name under `mamba2d`.

    Raises:
        FileNotFoundError: When `name` is neither a module nor a package of the source tree.
    """
    path = PACKAGE.parent.joinpath(*name.split("."))
    if name == "mamba2d":
        return [path / "__init__.py"]
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    if path.with_suffix(".py").is_file():
        return [path.with_suffix(".py")]
    raise FileNotFoundError(f"{name}: no module {path}.py and no package {path}/")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for name in CHECKED for path in module_files(name)}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_public_api_is_documented(module: str) -> None:
    path = MODULES[module]
    problems = offenders(path.read_text(), str(path.relative_to(ROOT)))
    assert not problems, f"{len(problems)} undocumented in {module}:\n" + "\n".join(problems)


CHECKER_CASES = {
    "documented function": ('def f(a, *args, **kwargs):\n    """F.\n\n    Args:\n        a: A.\n'
                            '        *args: More.\n        **kwargs: Options.\n    """\n', []),
    "undocumented parameter": ('def f(a, b):\n    """F.\n\n    Args:\n        a: A.\n    """\n',
                               ["x.py:1 f: parameters not under Args: b"]),
    "no docstring": ("def f():\n    pass\n", ["x.py:1 f: no docstring"]),
    "parameter outside Args": ('def f(a):\n    """F.\n\n    Attributes:\n        a: A.\n    """\n',
                               ["x.py:1 f: parameters not under Args: a"]),
    "undocumented kwargs": ('def f(**kwargs):\n    """F."""\n', ["x.py:1 f: parameters not under Args: kwargs"]),
    "private names skipped": ("def _f(a):\n    pass\nclass _C:\n    def g(self, b):\n        pass\n", []),
    "init documented by the class": ('class C:\n    """C.\n\n    Args:\n        a: A.\n    """\n'
                                     '    def __init__(self, a):\n        pass\n', []),
    "init documented by itself": ('class C:\n    def __init__(self, a):\n        """C.\n\n        Args:\n'
                                  '            a: A.\n        """\n', []),
    "init undocumented": ('class C:\n    """C."""\n    def __init__(self, a, *, b=1):\n        pass\n',
                          ["x.py:1 C: parameters not under Args: a, b"]),
    "dataclass field": ('@dataclass(frozen=True)\nclass C:\n    """C.\n\n    Args:\n        a: A.\n    """\n'
                        '    a: int\n    b: int = 0\n    c: ClassVar[int] = 1\n',
                        ["x.py:2 C: parameters not under Args: b"]),
    "method": ('class C:\n    """C."""\n    def m(self, a):\n        """M."""\n    @staticmethod\n'
               '    def s(x):\n        pass\n',
               ["x.py:3 C.m: parameters not under Args: a", "x.py:6 C.s: no docstring"]),
    "framework hooks exempt": ('class C:\n    """C."""\n    def forward(self, x):\n        pass\n'
                               '    def train_dataloader(self):\n        pass\n'
                               '    def on_fit_start(self):\n        pass\n', []),
    "base hooks exempt in a subclass": ('class M(torchmetrics.Metric):\n    """M."""\n'
                                        '    def update(self, x):\n        pass\n'
                                        '    def compute(self):\n        pass\n'
                                        'class W(BasePredictionWriter):\n    """W."""\n'
                                        '    def write_on_batch_end(self, trainer, *args):\n        pass\n'
                                        '    def write_on_epoch_end(self, trainer, predictions):\n        pass\n', []),
    "base hooks checked elsewhere": ('class C(Callback):\n    """C."""\n    def update(self, x):\n        pass\n'
                                     '    def write_on_epoch_end(self, trainer):\n        pass\n'
                                     'def compute(x):\n    pass\n',
                                     ["x.py:3 C.update: no docstring", "x.py:5 C.write_on_epoch_end: no docstring",
                                      "x.py:7 compute: no docstring"]),
}


@pytest.mark.parametrize("case", CHECKER_CASES)
def test_checker(case: str) -> None:
    source, expected = CHECKER_CASES[case]
    assert offenders(source, "x.py") == expected
