"""The layers import only downwards (docs/architecture.md, "Layers"); read from the source.

    mesh/     peer-to-peer only: no node/, api/, gallery/, quart, hypercorn
              libp2p only inside mesh/p2p/
    gallery/  may use mesh/; no node/, api/
    api/      may use mesh/ and gallery/; never node/
    node/     everything; only node/daemon.py wires api, mesh and node together
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RULES = {
    "mesh": ("node", "api", "gallery", "quart", "quart_trio", "hypercorn", "werkzeug"),
    "gallery": ("node", "api", "quart", "quart_trio", "hypercorn"),
    "api": ("node",),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level.module) of every import in a file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def violations(package: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sources(package):
        for line, mod in imports(path):
            if mod.split(".")[0] in banned:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("package", sorted(RULES))
def test_layer_imports_only_downwards(package: str) -> None:
    assert sources(package), f"no sources under {package}/"
    assert violations(package, RULES[package]) == []


def test_only_mesh_p2p_imports_libp2p() -> None:
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}"
           for pkg in ("mesh", "node", "api", "gallery") for p in sources(pkg)
           if (REPO / "mesh" / "p2p") not in p.parents
           for line, mod in imports(p) if mod.split(".")[0] == "libp2p"]
    assert bad == []
    assert any(mod.split(".")[0] == "libp2p" for p in sources("mesh/p2p") for _, mod in imports(p))


def test_only_the_composition_root_wires_api_and_mesh_into_node() -> None:
    wiring = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in sources("node")
              for line, mod in imports(p) if mod.split(".")[0] == "api"]
    assert wiring and all(w.startswith("node/daemon.py:") for w in wiring), wiring


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rule can fail: a file that breaks it is reported with its file and import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    from node.workers import Worker\n")
    assert imports(bad) == [(1, "os"), (4, "node.workers")]
