"""A caching allocator (tcmalloc or jemalloc) under CPU training, preloaded when `peftlab` starts.

glibc's malloc fragments under a training step's churn of large, short-lived tensors: the process holds far more
than is live. tcmalloc reuses freed blocks instead (figures: bench/RESULTS.md). PyTorch's own CPU launcher
(`torch.backends.xeon.run_cpu`) preloads it for the same reason. A preload only works from process start, so the
`peftlab` command re-executes itself once with LD_PRELOAD set, before torch loads. Python code that imports peftlab
keeps whatever allocator its process has.

jemalloc is the fallback because Debian's Python images ship it. Its default decay hands freed pages back to the
system within seconds, so every step faults them in again; unless MALLOC_CONF is set, peftlab turns decay off, which
makes it cache like tcmalloc.

PEFTLAB_ALLOCATOR: `auto` (default: tcmalloc where installed, else jemalloc, else the system's), `tcmalloc`,
`jemalloc`, `system`, or a path to a shared library.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from peftlab.errors import PeftlabError

ENV = "PEFTLAB_ALLOCATOR"
LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
INSTALL_HINT = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # keep freed pages for reuse (module docstring)


def find_library(name: str) -> str | None:
    """The installed shared object for allocator `name` (a soname the loader resolves), or None."""
    for lib in LIBRARIES[name]:
        found = ctypes.util.find_library(lib)
        if found:
            return found
    return None


def choose_library(choice: str) -> str | None:
    """The library to preload for a PEFTLAB_ALLOCATOR value; None means the system allocator."""
    choice = choice.strip() or "auto"
    if choice == "system":
        return None
    if choice == "auto":
        return find_library("tcmalloc") or find_library("jemalloc")
    if choice in LIBRARIES:
        found = find_library(choice)
        if found is None:
            raise PeftlabError(f"{ENV}={choice} but lib{choice} is not installed: install it (Debian/Ubuntu: "
                               f"apt install {INSTALL_HINT[choice]}) or set {ENV}=system")
        return found
    if "/" in choice:
        if not Path(choice).is_file():
            raise PeftlabError(f"{ENV}={choice}: no such file; give the path of a shared library, or one of "
                               "auto, tcmalloc, jemalloc, system")
        return choice
    raise PeftlabError(f"{ENV}={choice!r} is not an allocator: use auto, tcmalloc, jemalloc, system or a "
                       "path to a shared library")


def preload_environment(environ: Mapping[str, str], platform: str = sys.platform) -> dict[str, str] | None:
    """The environment to re-execute under so the chosen allocator is preloaded; None when nothing changes
    (system allocator, not Linux, or already preloaded, which also ends the re-execution)."""
    if not platform.startswith("linux"):
        return None
    library = choose_library(environ.get(ENV, "auto"))
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if library is None or Path(library).name in {Path(p).name for p in preloaded}:
        return None
    environ = {**environ, "LD_PRELOAD": " ".join([*preloaded, library])}
    if "jemalloc" in Path(library).name and "MALLOC_CONF" not in environ:
        environ["MALLOC_CONF"] = JEMALLOC_CONF
    return environ


def reexec_with_allocator() -> None:
    """Replace this process with itself under the chosen allocator (same pid, argv and environment
    otherwise). Call it first thing in a command-line entry point, never from library code."""
    environ = preload_environment(os.environ)
    if environ is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def allocator_in_use() -> str:
    """Which malloc this process really runs on, read from its loaded libraries."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in (*LIBRARIES, "mimalloc"):
        if f"/lib{name}" in maps:
            return name
    return "system"
