"""pytest hooks loaded by `--cuda-emulator` (tests/conftest.py): say in the header and the summary
that the CUDA tests ran on a CPU emulator, and list the kernel entry points of kernels/*.cu that
no test launched. A run of at least the emulated CI selection (the whole test tree, nothing
deselected that is gpu and not emulator_slow) fails when one is left out, so a marker or a
deselection cannot silently drop a kernel from the emulated CI run."""

from __future__ import annotations

import shutil
from pathlib import Path

import cupy
import pytest
from cupy import _emu

_unlaunched: list[str] = []
_state = {"entry_points": 0, "fails_run": False, "partial": False}

if Path(cupy.__file__).resolve().parent.parent != Path(__file__).resolve().parent:
    raise pytest.UsageError(f"--cuda-emulator: the real CuPy ({cupy.__file__}) was imported first")
if shutil.which("g++") is None:
    raise pytest.UsageError("--cuda-emulator needs g++ (C++17) to build the kernels")


def all_entry_points() -> dict[str, list[str]]:
    """kernels/<family>.cu -> its `extern "C" __global__` names, after the preprocessor (some
    entry points are stamped out by macros)."""
    from gpuml.backend.cuda.kernels import compile_options
    from gpuml.paths import kernel_dir

    folder = kernel_dir()
    return {path.stem: list(_emu.entry_points(_emu.preprocess(path.read_text(), compile_options(folder))))
            for path in sorted(folder.glob("*.cu"))}


def pytest_report_header(config: pytest.Config) -> str:
    return (f"cupy: {cupy.__version__} from {Path(cupy.__file__).parent} - kernels built with g++ and run on the "
            "CPU, blocks one after another: a logic check, not a GPU (no timing, no inter-block races)")


def pytest_deselected(items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords and "emulator_slow" not in item.keywords for item in items):
        _state["partial"] = True


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _emu.launch_counts:
        return
    names = [f"{fam}.{name}" for fam, entries in all_entry_points().items() for name in entries]
    _state["entry_points"] = len(names)
    _unlaunched[:] = [n for n in names if n.split(".", 1)[1] not in _emu.launch_counts]
    ci_selection = session.config.args_source == pytest.Config.ArgsSource.TESTPATHS and not _state["partial"]
    if _unlaunched and ci_selection and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        _state["fails_run"] = True


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _emu.launch_counts:
        return
    tr = terminalreporter
    tr.section("CUDA kernels on the CPU emulator (tests/cuda_emulator; not a GPU)")
    total = _state["entry_points"]
    tr.line(f"{sum(_emu.launch_counts.values())} emulated launches; {total - len(_unlaunched)} of the "
            f"{total} entry points of kernels/*.cu launched at least once")
    if _unlaunched:
        tr.line(f"never launched: {', '.join(_unlaunched)}", red=True)
    if _state["fails_run"]:
        tr.line("this fails the run: launch each from a gpu test not marked emulator_slow", red=True)
