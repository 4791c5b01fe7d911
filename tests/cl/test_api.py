"""sparsekern_cl uses only the public sparsekern API."""

import ast
import pathlib

import sparsekern
import sparsekern_cl

PUBLIC_MODULES = {"masks", "convert", "formats", "models", "optim", "choice", "env", "distributed"}
ALLOWED = set(sparsekern.__all__) | PUBLIC_MODULES | {"__version__"}


def violations(source: str, name: str = "<src>") -> list[str]:
    """Uses of sparsekern names that are not public (private modules, underscore names, unexported names)."""
    bad = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "sparsekern":
                continue
            if len(parts) > 1 and (parts[1] not in PUBLIC_MODULES or any(p.startswith("_") for p in parts)):
                bad.append(f"{name}:{node.lineno} from {node.module}")
            for alias in node.names:
                if alias.name.startswith("_") or (len(parts) == 1 and alias.name not in ALLOWED):
                    bad.append(f"{name}:{node.lineno} {alias.name} from {node.module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sparsekern" and len(parts) > 1 and parts[1] not in PUBLIC_MODULES:
                    bad.append(f"{name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sparsekern":
            if node.attr not in ALLOWED:
                bad.append(f"{name}:{node.lineno} sparsekern.{node.attr}")
    return bad


def test_only_public_sparsekern_names():
    files = sorted(pathlib.Path(sparsekern_cl.__file__).parent.rglob("*.py"))
    assert len(files) >= 8
    bad = [v for p in files for v in violations(p.read_text(), p.name)]
    assert not bad, f"private sparsekern use in sparsekern_cl: {bad}"


def test_guard_catches_private_uses():
    assert len(violations("from sparsekern._backends import CallInfo")) == 1
    assert len(violations("from sparsekern.ops._common import grad_pattern")) == 1
    assert len(violations("import sparsekern\nsparsekern._backends.select_backend")) == 1
    assert len(violations("from sparsekern import _backends")) == 1
    assert len(violations("import sparsekern.nn.linear")) == 1
    assert violations("import sparsekern\nfrom sparsekern.masks import random_mask\nsparsekern.sparsify_") == []
