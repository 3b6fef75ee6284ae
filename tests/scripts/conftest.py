import importlib.util
import sys
import pytest

from tests._paths import ROOT

SCRIPTS = ROOT / "scripts"


def load_script(name: str):
    """Imports scripts/<name>.py by path (scripts/ is not a package), with scripts/ on
    sys.path as when a script runs, so that it can import its sibling modules."""
    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))
    module_name = f"_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def compare_runs():
    return load_script("compare_runs")


@pytest.fixture(scope="session")
def bench():
    return load_script("bench_grouped_mm")


@pytest.fixture(scope="session")
def bench_records():
    return load_script("grouped_mm_records")


@pytest.fixture(scope="session")
def gpu_monitor():
    return load_script("gpu_monitor")


@pytest.fixture(scope="session")
def profile_mm():
    return load_script("profile_grouped_mm")
