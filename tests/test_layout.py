"""The package layout: no import cycles, torch-free modules stay torch-free, one set of defaults."""
from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from mosaic_toolkit.cli.train import command as train_command
from mosaic_toolkit.training.config import DEFAULTS, LIMITS, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"toolkit": "mosaic_toolkit", "backend": "mosaic_backend"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports() -> dict[str, set[str]]:
    """Module -> project modules it imports (lazy imports inside functions included)."""
    graph: dict[str, set[str]] = {}
    files = [p for top in PACKAGES for p in (ROOT / top).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    for path in files:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps |= {c for c in candidates if c in modules and c != name}
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = _top_level_imports()
    assert "mosaic_toolkit.sam.engine" in graph and "mosaic_toolkit.sam.models" in graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodule
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(stack[stack.index(dep):] + [dep])}"
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_toolkit_never_imports_backend():
    graph = _top_level_imports()
    assert not [m for m, deps in graph.items() if m.startswith("mosaic_toolkit")
                and any(d.startswith("mosaic_backend") for d in deps)]


def test_light_modules_do_not_import_torch():
    code = ("import sys\n"
            "import mosaic_toolkit.cli, mosaic_toolkit.cli.train, mosaic_toolkit.sam.params\n"
            "import mosaic_toolkit.training.config, mosaic_toolkit.core.cache, mosaic_toolkit.core.instances\n"
            "import mosaic_backend.config\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_defaults_are_written_once():
    from mosaic_toolkit.training.trainer import train

    signature = inspect.signature(train).parameters
    options = {p.name: p for p in train_command.params}
    for name in ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "score_weight", "max_prompts",
                 "seed", "image_size", "val_every"):
        assert signature[name].default == getattr(DEFAULTS, name), name
        if name in options and name != "image_size":
            assert options[name].default == getattr(DEFAULTS, name), name
    for name, limit in LIMITS.items():
        option = options.get(name)
        if option is not None:  # the CLI refuses what TrainConfig refuses
            low = limit.low + (1 if limit.low_open and isinstance(getattr(DEFAULTS, name), int) else 0)
            assert option.type.min == low and bool(getattr(option.type, "min_open", False)) == (
                limit.low_open and not isinstance(getattr(DEFAULTS, name), int)), name
    assert TrainConfig() == DEFAULTS


def test_internal_errors_are_not_blamed_on_the_input(sam2_engine):
    import numpy as np
    import pytest

    from mosaic_backend.errors import BackendError, status_of
    from mosaic_toolkit.core.errors import InputError, InternalError, MosaicError
    from mosaic_toolkit.core.instances import postprocess

    assert issubclass(InputError, MosaicError) and issubclass(InternalError, MosaicError)
    assert status_of(InputError("x.png: broken")) == 400
    assert status_of(MosaicError("x.png: broken")) == 400
    assert status_of(InternalError("engine returned a 3-D map")) == 500
    assert status_of(BackendError("busy", 409)) == 409
    with pytest.raises(InternalError, match="embedding cache"):
        sam2_engine.decode_points("not-a-key", np.zeros((1, 2), np.float32))
    with pytest.raises(InternalError, match="2-D"):
        postprocess(np.zeros((2, 2, 2), np.int32), 0, 0, 0)


def test_cli_method_choices_are_the_engines():
    from mosaic_toolkit.cli.options import METHODS as CLI_METHODS
    from mosaic_toolkit.sam.params import METHODS

    assert CLI_METHODS == METHODS
