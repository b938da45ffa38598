"""Architecture rules: the core never imports trainers, and the loop never names a method."""

import ast
from pathlib import Path

import tuner

CORE = Path(tuner.__file__).parent
METHOD_WORDS = ("lora", "dreambooth", "textual_inversion", "decoder", "LoraTrainer", "DreamBoothTrainer")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_core_module_imports_trainers():
    offenders = [
        str(path.relative_to(CORE))
        for path in CORE.rglob("*.py")
        if any(name == "trainers" or name.startswith("trainers.") for name in _imports(path))
    ]
    assert not offenders, f"tuner/ must reach trainers only through the registry: {offenders}"


def test_loop_names_no_trainer():
    loop = CORE / "loop.py"
    if not loop.exists():
        return
    tree = ast.parse(loop.read_text(encoding="utf-8"))
    identifiers = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    identifiers |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    named = [w for w in METHOD_WORDS if w in identifiers or any(w == s for s in strings)]
    assert not named, f"loop.py must not branch on methods: {named}"


def test_datasets_folder_is_not_a_package():
    assert not (CORE.parent / "datasets" / "__init__.py").exists()
