"""Starting Julia (through juliacall) and loading the Julia side of the bridge, once per process."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import warnings

# Shipped inside the Python package (package data) so that a wheel install finds it; the Julia
# package julia/ (for `Pkg.dev`) links its src/PyBridge.jl to this same file.
JULIA_SOURCE = pathlib.Path(__file__).resolve().parent / "PyBridge.jl"

INSTALL_HINT = (
    "engine='julia' needs juliacall: `pip install \"pybridge[julia]\"`. On first use juliacall "
    "installs Julia and the packages listed in pybridge/juliapkg.json (minutes, once, online). "
    "Offline or with an existing Julia: set PYTHON_JULIACALL_EXE to the julia binary and "
    "PYTHON_JULIACALL_PROJECT to an environment instantiated from the repository's Project.toml "
    "(`julia --project=DIR -e 'using Pkg; Pkg.instantiate()'`)."
)


class JuliaUnavailableError(ImportError):
    """juliacall is missing or could not start Julia; the message says how to fix it."""


_state: dict = {}


def julia_source() -> pathlib.Path:
    """Where PyBridge.jl lives: $PYBRIDGE_JULIA_SRC, else the copy shipped in this package."""
    path = pathlib.Path(os.environ.get("PYBRIDGE_JULIA_SRC", JULIA_SOURCE))
    if not path.is_file():
        raise JuliaUnavailableError(
            f"the Julia side of the bridge was not found at {path}; set PYBRIDGE_JULIA_SRC to "
            "pybridge/julia_engine/PyBridge.jl of the pybridge repository")
    return path


def _configure_environment():
    # Every right-hand-side call takes the GIL, so extra Julia threads buy nothing and risk
    # deadlocks; respect a user's explicit choice.
    os.environ.setdefault("PYTHON_JULIACALL_THREADS", "1")
    os.environ.setdefault("PYTHON_JULIACALL_OPTLEVEL", "3")


def load():
    """The `PyBridge` Julia module (a juliacall handle); starts Julia on the first call."""
    if "module" in _state:
        return _state["module"]
    if importlib.util.find_spec("juliacall") is None:
        raise JuliaUnavailableError("juliacall is not installed. " + INSTALL_HINT)
    if "torch" in sys.modules and "juliacall" not in sys.modules and not _state.get("warned"):
        # juliacall loaded after torch is a known crash source (two copies of libstdc++/LLVM
        # symbols); importing juliacall before torch avoids it.
        _state["warned"] = True
        warnings.warn("juliacall is being imported after torch; if Julia crashes at start-up, "
                      "`import juliacall` before `import torch`/`import pybridge`.",
                      RuntimeWarning, stacklevel=3)
    _configure_environment()
    try:
        from juliacall import Main as jl  # noqa: the import starts Julia
    except Exception as e:  # juliapkg download failure, missing julia binary, bad project ...
        raise JuliaUnavailableError(f"juliacall could not start Julia ({type(e).__name__}: {e}). "
                                    + INSTALL_HINT) from e
    # Prefer an installed, precompiled PyBridge package (offline environments may `dev` julia/);
    # otherwise include the source into Main, its dependencies coming from the active project.
    if jl.seval('Base.find_package("PyBridge") !== nothing'):
        jl.seval("import PyBridge")
    elif not jl.seval("isdefined(Main, :PyBridge)"):
        jl.seval(f'Base.include(Main, raw"{julia_source()}")')
    _state["module"] = jl.PyBridge
    _state["JuliaError"] = getattr(sys.modules["juliacall"], "JuliaError", Exception)
    return _state["module"]


def julia_error_type():
    return _state.get("JuliaError", Exception)
