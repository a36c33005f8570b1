"""The folders are the architecture: a short root of entry points, and an import graph in which the
engine never imports torch, the built-in objective's ML code imports neither optuna nor the CLI
flags, and the reports never reach into training. Checked on the source (every import statement,
also inside functions) and on real imports."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "psearch"
ENTRY_POINTS = {"parallel_search.py", "single_gpu_hyperparameter_search.py", "summarize.py",
                "model.py", "dataset.py"}
# The modules that bridge the study (optuna) and the ML code: the built-in objective, one rank of
# it on several devices, and the hyperparameters its trials suggest.
BRIDGE = {PACKAGE / "writer_id" / "objective.py", PACKAGE / "writer_id" / "builtin.py",
          PACKAGE / "writer_id" / "ddp_objective.py"}


def imported(path: Path) -> set[str]:
    """Every module name an import statement of `path` names (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).glob("*.py"))


def offending(paths, forbidden) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(n for n in imported(path)
                     if any(n == f or n.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_the_root_holds_the_entry_points_and_little_else():
    root_py = {p.name for p in ROOT.glob("*.py")}
    assert ENTRY_POINTS <= root_py and len(root_py) <= 8, sorted(root_py)


def test_the_engine_never_imports_torch_nor_any_objective():
    """The engine knows an objective only through engine/objectives.py: the entry points hand it
    the built-in one, so nothing under psearch/engine names psearch.writer_id (not even lazily)."""
    assert modules("engine")
    forbidden = ("torch", "torchvision", "psearch.writer_id", "psearch.reports")
    assert offending(modules("engine"), forbidden) == {}
    # nor by a module name in a string (importlib, `python -m`)
    mentions = [p.name for p in modules("engine") if "psearch.writer_id" in p.read_text()]
    assert mentions == [], f"the engine names the built-in objective in {mentions}"


def test_loading_every_engine_module_loads_no_objective():
    code = ("import sys, pkgutil, importlib, psearch.engine as e\n"
            "for m in pkgutil.iter_modules(e.__path__):\n"
            "    importlib.import_module('psearch.engine.' + m.name)\n"
            "assert not [m for m in sys.modules if m.startswith('psearch.writer_id')], "
            "sorted(m for m in sys.modules if m.startswith('psearch.'))\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_ml_code_imports_neither_optuna_nor_the_cli_flags():
    ml = [p for p in modules("writer_id") if p not in BRIDGE]
    assert len(ml) >= 10
    assert offending(ml, ("optuna", "psearch.engine.config", "psearch.engine.study",
                          "psearch.engine.launcher", "psearch.engine.worker")) == {}


def test_reports_read_results_but_never_reach_into_training():
    assert offending(modules("reports"), ("torch", "psearch.writer_id.objective",
                                          "psearch.writer_id.train",
                                          "psearch.writer_id.model")) == {}


@pytest.mark.parametrize("code", [
    # the launcher's command line, and every engine module imported together
    "import runpy, sys\nsys.argv = ['parallel_search.py', '--help']\n"
    "try:\n    runpy.run_path('parallel_search.py', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    "import pkgutil, importlib, psearch.engine as e\n"
    "for m in pkgutil.iter_modules(e.__path__):\n    importlib.import_module('psearch.engine.' + m.name)\n",
    # the demo's data generator and the summary's tables
    "import psearch.writer_id.synthetic, psearch.reports.summary, psearch.reports.plots\n",
])
def test_these_load_no_torch(code):
    check = code + "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    subprocess.run([sys.executable, "-c", "import sys\n" + check], cwd=ROOT, check=True,
                   capture_output=True)


def test_ml_modules_load_without_optuna():
    code = ("import sys, pkgutil, importlib, psearch.writer_id as w\n"
            "for m in pkgutil.iter_modules(w.__path__):\n"
            f"    if m.name not in {sorted(p.stem for p in BRIDGE)}:\n"
            "        importlib.import_module('psearch.writer_id.' + m.name)\n"
            "assert 'optuna' not in sys.modules and 'psearch.engine.config' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
