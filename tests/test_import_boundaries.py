"""The import direction of the style guide: the pure-PyTorch core never imports Lightning or timm."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = ["functional.py", "projections.py", "rules.py", "config.py", "engine", "_registry.py", "nn"]
FORBIDDEN_IN_PURE = ("lightning", "pytorch_lightning", "timm", "lightning_tpsgd.strategy", "lightning_tpsgd.cli")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level
            names.add(prefix + (node.module or ""))
    return names


def _files(entries):
    for entry in entries:
        path = ROOT / "lightning_tpsgd" / entry
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


@pytest.mark.parametrize("path", list(_files(PURE)), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_is_pure_pytorch(path):
    for name in _imports(path):
        assert not name.startswith(FORBIDDEN_IN_PURE), f"{path.name} imports {name}"
        assert name not in (".strategy", ".cli", "..strategy", "..cli"), f"{path.name} imports {name}"


ZOO = sorted((ROOT / "zoo").rglob("*.py"))


@pytest.mark.parametrize("path", ZOO, ids=lambda p: str(p.relative_to(ROOT)))
def test_zoo_does_not_import_the_strategy_and_only_the_builder_imports_timm(path):
    for name in _imports(path):
        assert not name.startswith(("lightning_tpsgd.strategy", "lightning_tpsgd.cli")), f"{path.name} imports {name}"
        if name.startswith("timm"):
            assert path.name == "_builder.py", f"{path.name} imports timm"
            assert not any(part.startswith("_") for part in name.split(".")), f"{path.name} imports private {name}"


@pytest.mark.parametrize("path", ZOO, ids=lambda p: str(p.relative_to(ROOT)))
def test_zoo_imports_no_private_names(path):
    """A name that two modules use is public in one of them; the engine is used through its public API."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            private = [alias.name for alias in node.names if alias.name.startswith("_")]
            assert not private, f"{path.name} imports private {private} from {node.module}"
            if node.module and node.module.startswith("lightning_tpsgd"):
                assert node.module in ("lightning_tpsgd", "lightning_tpsgd.engine", "lightning_tpsgd.nn"), node.module


def test_only_the_engine_detaches_block_outputs():
    for path in _files(["functional.py", "projections.py", "rules.py", "strategy.py", "cli.py"]):
        assert ".detach()" not in path.read_text() or path.name == "strategy.py", path.name
