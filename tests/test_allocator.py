"""The `peftlab` command preloads a caching allocator (PEFTLAB_ALLOCATOR) without changing what it trains."""

import json
import os
import subprocess
import sys

import pytest
from test_distributed import config_yaml, losses

import peftlab
from peftlab.accel import allocator
from peftlab.accel.allocator import choose_library, preload_environment
from peftlab.errors import PeftlabError


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly these allocators are installed."""
    def use(**libraries):
        monkeypatch.setattr(allocator, "find_library", lambda name: libraries.get(name))
    return use


def test_auto_prefers_tcmalloc_then_jemalloc_then_system(installed):
    installed(tcmalloc="libtcmalloc_minimal.so.4", jemalloc="libjemalloc.so.2")
    assert choose_library("auto") == choose_library("") == "libtcmalloc_minimal.so.4"
    assert choose_library("jemalloc") == "libjemalloc.so.2"
    assert choose_library("system") is None
    installed(jemalloc="libjemalloc.so.2")
    assert choose_library("auto") == "libjemalloc.so.2"
    installed()
    assert choose_library("auto") is None


def test_bad_choices_say_what_to_do(installed, tmp_path):
    installed()
    with pytest.raises(PeftlabError, match="apt install libtcmalloc-minimal4.*PEFTLAB_ALLOCATOR=system"):
        choose_library("tcmalloc")
    with pytest.raises(PeftlabError, match="no such file"):
        choose_library(str(tmp_path / "missing.so"))
    with pytest.raises(PeftlabError, match="'tcmaloc' is not an allocator: use auto, tcmalloc"):
        choose_library("tcmaloc")
    library = tmp_path / "libmine.so"
    library.write_bytes(b"")
    assert choose_library(str(library)) == str(library)


def test_preload_keeps_other_preloads_and_stops_once_preloaded(installed):
    installed(tcmalloc="libtcmalloc_minimal.so.4")
    env = preload_environment({"LD_PRELOAD": "/opt/libother.so", "HOME": "/root"}, platform="linux")
    assert env == {"LD_PRELOAD": "/opt/libother.so libtcmalloc_minimal.so.4", "HOME": "/root"}
    assert preload_environment(env, platform="linux") is None  # the re-executed process goes on
    assert preload_environment({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, platform="linux") is None
    assert preload_environment({"PEFTLAB_ALLOCATOR": "system"}, platform="linux") is None
    assert preload_environment({}, platform="darwin") is None


def test_jemalloc_keeps_freed_pages_unless_the_user_configured_it(installed):
    installed(jemalloc="libjemalloc.so.2")
    env = preload_environment({}, platform="linux")
    assert env == {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": allocator.JEMALLOC_CONF}
    mine = preload_environment({"MALLOC_CONF": "narenas:1"}, platform="linux")
    assert mine == {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "narenas:1"}


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc"])
def test_estimate_probes_hand_the_allocator_cache_back(name):
    # the memory estimate's probes measure from a clean slate only if the cache is really released
    library = allocator.find_library(name)
    if library is None:
        pytest.skip(f"lib{name} is not installed")
    code = ("import torch; from peftlab.measure import estimate as e\n"
            "x = [torch.ones(1024, 1024) for _ in range(128)]; del x\n"
            "before = e._current_rss(); e._release_freed_memory(); print(before - e._current_rss())")
    plain = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env = preload_environment({**plain, "PEFTLAB_ALLOCATOR": name}, platform="linux")  # as the command runs
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(done.stdout) > 400 * 2**20  # of the 512 MB freed


def test_importing_the_cli_loads_neither_torch_nor_transformers():
    # the command re-executes itself before the heavy imports, not after
    code = "import sys, peftlab.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_lazy_exports_resolve():
    assert sorted(peftlab.__all__) == sorted(peftlab._EXPORTS)
    for name in peftlab.__all__:
        assert getattr(peftlab, name).__name__ == name
    with pytest.raises(AttributeError):
        peftlab.not_a_name  # noqa: B018


def train_command(tmp_path, data, name: str, choice: str) -> str:
    env = {**os.environ, "PEFTLAB_ALLOCATOR": choice}
    env.pop("LD_PRELOAD", None)
    command = [sys.executable, "-m", "peftlab", "train", "--config", config_yaml(tmp_path, data, name),
               "--output", str(tmp_path / name)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_command_trains_the_same_on_either_allocator(tmp_path, seq_data):
    expected = next((name for name in ("tcmalloc", "jemalloc") if allocator.find_library(name)), "system")
    assert f"Allocator: {expected}\n" in train_command(tmp_path, seq_data, "auto", "auto")
    assert "Allocator: system\n" in train_command(tmp_path, seq_data, "system", "system")
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "system"), rel=1e-6)
    # peak memory depends on the allocator, so the results record it
    assert json.loads((tmp_path / "auto" / "results.json").read_text())["allocator"] == expected
