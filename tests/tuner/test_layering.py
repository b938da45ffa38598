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


FAMILY_WORDS = ("sd1", "sd2", "sdxl", "sd3", "sd35", "flux", "zimage", "StableDiffusionXLPipeline", "FluxPipeline",
                "ZImagePipeline")  # fmt: skip


def _family_mentions(path: Path) -> list[str]:
    """Family names used as identifiers or compared as strings (docstrings and comments are prose, not code)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, ast.Attribute):
            words = [node.attr]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words = [node.value]
        else:
            continue
        found |= {w for w in FAMILY_WORDS for word in words if word == w or word.lower() == w.lower()}
    return sorted(found)


def test_loop_and_trainers_name_no_model_family():
    """Trainers and the loop ask `parts.family`; only `tuner/families/` knows SD1, SDXL, SD3 or Flux."""
    paths = [CORE / "loop.py", *sorted((CORE.parent / "trainers").glob("*.py"))]
    offenders = {str(p.relative_to(CORE.parent)): words for p in paths if (words := _family_mentions(p))}
    assert not offenders, f"family names outside tuner/families/: {offenders}"
