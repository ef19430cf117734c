"""The commands apart from the library (issue 9): ``onnxprune.commands`` parses, checks and prints;
the library never imports it; a command's defaults are the library's."""

import ast
from pathlib import Path

import pytest

import onnxprune
from onnxprune.commands.autotune import AutotuneCommand
from onnxprune.commands.autotune import build_parser as autotune_parser
from onnxprune.commands.bench import BenchCommand
from onnxprune.commands.bench import build_parser as bench_parser
from onnxprune.commands.eval import EvalCommand
from onnxprune.commands.eval import build_parser as eval_parser
from onnxprune.commands.prune import PruneCommand, build_parser
from onnxprune.errors import UserError
from onnxprune.pipeline import PruneConfig

PACKAGE = Path(onnxprune.__file__).parent
ENTRY_POINTS = {"cli.py"}  # the console script is the commands' entry point, not library


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` (a module of ``package``) imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_commands():
    library = [p for p in PACKAGE.rglob("*.py")
               if p.name not in ENTRY_POINTS and p.relative_to(PACKAGE).parts[0] != "commands"]
    assert len(library) > 30
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported_modules(p, _package_of(p))
                                                     if n.startswith("onnxprune.commands"))
                 for p in library}
    assert not {name: found for name, found in offenders.items() if found}


def _package_of(path: Path) -> str:
    return ".".join(("onnxprune",) + path.relative_to(PACKAGE).parts[:-1])


def test_the_import_scan_sees_relative_imports():
    found = _imported_modules(PACKAGE / "cli.py", "onnxprune")
    assert "onnxprune.commands" in found and "onnxprune.commands.prune" in found
    nested = _imported_modules(PACKAGE / "planning" / "allocate.py", _package_of(PACKAGE / "planning" / "allocate.py"))
    assert "onnxprune.planning.speed_plan" in nested


def test_prune_defaults_are_the_librarys():
    command = PruneCommand.from_args(build_parser().parse_args(["in.onnx", "out.onnx"]))
    assert command.config == PruneConfig()
    assert command.files.input == "in.onnx" and command.files.output == "out.onnx"
    assert not command.console.quiet and not command.console.verbose


def test_prune_options_reach_the_config():
    args = build_parser().parse_args(["in.onnx", "out.onnx", "--groups", "4", "--rate", "0.5", "--exclude", "c1",
                                      "--no-verify", "--calib", "c.npz", "--calib-size", "8", "-q"])
    command = PruneCommand.from_args(args)
    assert (command.config.groups, command.config.rate, command.config.verify) == (4, 0.5, False)
    assert command.config.exclude == ("c1",) and command.exclude == ("c1",)
    assert (command.config.calib, command.config.calib_size, command.files.calib) == ("c.npz", 8, "c.npz")
    assert command.console.quiet


def test_eval_bench_autotune_configs():
    ev = EvalCommand.from_args(eval_parser().parse_args(["m.onnx", "--subset", "--batch-size", "3"]))
    assert (ev.model, ev.data, ev.prefer, ev.batch_size) == ("m.onnx", None, "subset", 3)
    bench = BenchCommand.from_args(bench_parser().parse_args(["a.onnx", "b.onnx", "--batch", "1,4"]))
    assert bench.models == ("a.onnx", "b.onnx") and bench.batches == (1, 4) and bench.settings.provider == "cpu"
    with pytest.raises(UserError, match="--batch expects"):
        BenchCommand.from_args(bench_parser().parse_args(["a.onnx", "--batch", "0"]))
    tune = AutotuneCommand.from_args(autotune_parser().parse_args(["m.onnx", "--provider", "cuda"]))
    assert tune.out == Path("m.latency-cuda.json") and tune.config.provider == "cuda"
    assert tune.config.groups == "auto" and tune.config.target_macs == 0.5


def test_eval_without_any_data_is_one_user_error(tmp_path, monkeypatch):
    """The default data is the command's: absent, it says to pass --data (exit 2 in the CLI)."""
    import onnxprune.commands.eval as ev

    monkeypatch.setattr(ev, "FMNIST_DIR", tmp_path / "none")
    monkeypatch.setattr(ev, "SUBSET_PATH", tmp_path / "none.npz")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(UserError, match=r"no evaluation data: pass --data X\.npz"):
        EvalCommand(str(model)).validate()
