"""The layers of docs/architecture.md import one way: kernels <- ops <- model <- train.

Read from the source with ``ast`` (importing a module loads the layers below it), so a new
import that points up, or an ops module that reaches for transformers, fails here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each folder (or module) and the modules it must not import (a prefix matches its submodules).
FORBIDDEN = {
    "kernels": ("quietstar.ops", "quietstar.model", "quietstar.train", "transformers"),
    "quietstar/_checks.py": ("quietstar.ops", "quietstar.model", "quietstar.train", "transformers"),  # serves every layer
    "quietstar/ops": ("quietstar.model", "quietstar.train", "transformers"),
    "quietstar/model": ("quietstar.train",),
}


def package_of(path: Path) -> str:
    """The package a module file belongs to once installed (``kernels/`` is ``quietstar.kernels``)."""
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    return "quietstar." + package if package.startswith("kernels") else package


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` imports (and every name it imports from one, as ``module.name``),
    relative imports resolved against ``package``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def upward(source: str, package: str, forbidden: tuple[str, ...]) -> list[str]:
    """The imports of ``source`` that fall under one of ``forbidden``."""
    names = imported_modules(source, package)
    return sorted(name for name in names if any(name == f or name.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_its_own(folder):
    path = ROOT / folder
    files = [path] if path.is_file() else sorted(path.glob("*.py"))
    assert files, f"no modules under {folder}"
    found = {str(path.relative_to(ROOT)): upward(path.read_text(), package_of(path), FORBIDDEN[folder]) for path in files}
    assert not {path: names for path, names in found.items() if names}


def test_the_layering_check_sees_relative_and_absolute_upward_imports():
    source = "from ..model import attention\nfrom . import layout\nimport transformers.activations\n"
    found = upward(source, package_of(ROOT / "quietstar" / "ops" / "example.py"), FORBIDDEN["quietstar/ops"])
    assert found == ["quietstar.model", "quietstar.model.attention", "transformers.activations"]
    assert package_of(ROOT / "kernels" / "tree_attention.py") == "quietstar.kernels"


def test_importing_quietstar_loads_the_ops_and_the_model_layer_at_its_first_use():
    """``import quietstar`` (what the ops' users and the benchmark's op workers do) does not
    import transformers; the model layer's names and ``quietstar.model`` load when first asked for."""
    code = (
        "import sys, quietstar\n"
        "assert 'transformers' not in sys.modules and 'quietstar.model' not in sys.modules\n"
        "from quietstar import QuietStarModel, tree_attention\n"
        "assert QuietStarModel is sys.modules['quietstar.model'].QuietStarModel\n"
        "assert quietstar.model is sys.modules['quietstar.model'] and 'patch' in dir(quietstar)\n"
        "try:\n"
        "    quietstar.no_such_name\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_name' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
