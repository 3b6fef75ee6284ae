"""Loads scripts/bench_dispatch.py by path (scripts/ is not a package)."""

import importlib.util
import sys
from tests._paths import ROOT

SCRIPT = ROOT / "scripts" / "bench_dispatch.py"


def load_bench_dispatch():
    name = "_script_bench_dispatch"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
