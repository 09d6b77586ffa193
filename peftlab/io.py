"""Writing files so that nothing a user has is lost (docs/guarantees.md).

Every file goes to a temporary name beside its target, is fsynced, gets the mode the umask gives and is then
renamed into place (the directory fsynced too), so a crash or power cut leaves the old file or the new one,
never a torn one. A directory a command writes is locked for that command (`output_lock`); OS errors become
one line naming the path (`os_error_message`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from peftlab.errors import PeftlabError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entries to disk (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, give it the umask's mode and rename it
    into place. The temporary file is removed whatever happens."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: an adapter must be readable by a server
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def make_temp_dir(beside: Path) -> Path:
    """A new hidden directory next to `beside` (same filesystem, so it can be renamed onto it), with the umask's
    mode."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def finalize_tree(directory: Path) -> None:
    """Give every file under `directory` the umask's mode (libraries write some 0600) and flush it to disk."""
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), mode)
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def move_files_into(source: Path, target: Path) -> None:
    """Rename each file of `source` (flat) onto the same name in `target`, each rename atomic; then remove the
    emptied `source`."""
    finalize_tree(source)
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        os.replace(child, target / child.name)
    source.rmdir()
    fsync_path(target)


@contextmanager
def temp_dir_beside(target: Path) -> Iterator[Path]:
    """A temporary directory next to `target` that is removed on the way out, whatever happens (the caller
    renames or moves what it wants to keep before leaving)."""
    tmp = make_temp_dir(target)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- locks -----------------------------------------------------------------------------------------------------

def lock_path(target: Path) -> Path:
    """The lock file of an output: hidden, beside it (inside, it would become part of a merged model)."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


@contextmanager
def output_lock(target: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold `target` for this process while `command` writes it. A second writer gets a one-line error naming
    the holder's pid. The lock is the kernel's (flock, through `filelock`): a killed holder releases it, so a
    stale lock file never blocks."""
    from filelock import FileLock, Timeout

    path = lock_path(Path(target))
    if blocking := file_in_the_way(Path(target)):
        raise PeftlabError(f"{target}: {blocking} is a file, not a directory: choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = _read_holder(path)
        raise PeftlabError(f"{target} is being written by another peftlab command ({holder}): wait for it to "
                           "finish, or choose another output") from None
    try:
        with open(path, "w", encoding="utf-8") as f:  # for the message a second writer gets
            f.write(f"pid {os.getpid()}, peftlab {command}\n")
        yield
    finally:
        lock.release()


def _read_holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "pid unknown"
    except OSError:
        return "pid unknown"


# ---- OS errors as one line ---------------------------------------------------------------------------------------

_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or write to another disk",
    errno.EFBIG: "file too large for this file system or process limit: free space or write elsewhere",
    errno.EACCES: "permission denied: choose a path you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a path you can write to, or fix its permissions",
    errno.EROFS: "read-only file system: choose an output on a writable disk",
    errno.ENOTDIR: "a part of this path is a file, not a directory: choose another path",
    errno.EISDIR: "this is a directory where a file is expected: choose a file path",
    errno.EEXIST: "already exists: choose another path",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter path",
}


def as_os_error(error: BaseException) -> OSError | None:
    """The OSError inside an error: itself, or what a Rust-backed writer (safetensors, tokenizers) reports as
    '... (os error 28)'."""
    if isinstance(error, OSError):
        return error
    if match := re.search(r"\(os error (\d+)\)", str(error)):
        number = int(match.group(1))
        return OSError(number, os.strerror(number))
    return None


def os_error_message(error: OSError) -> str:
    """`path: what went wrong: what to do` on one line, for any OSError a command meets."""
    if error.errno is None:  # libraries raise OSError with a message of their own
        from peftlab.errors import first_line

        return first_line(error, limit=300)
    where = error.filename if error.filename is not None else "a file"
    fix = _FIXES.get(error.errno or -1) or f"{error.strerror or type(error).__name__}: check the path and the disk"
    return f"{where}: {fix}"


# ---- outputs that would overwrite a training run -------------------------------------------------------------------

RUN_MARKERS = ("metrics.jsonl", "trainer_state.pt", "adapter_config.json")  # a config.yaml alone is anyone's


def holds_run(directory: Path) -> bool:
    """A training run, one of its checkpoints, or an adapter directory: what no other command may write over."""
    if not directory.is_dir():
        return False
    if any((directory / name).is_file() for name in RUN_MARKERS):
        return True
    return any((p / "trainer_state.pt").is_file() for p in directory.glob("checkpoint-*"))


def _runs_below(directory: Path, depth: int = 3, budget: int = 20_000) -> Path | None:
    """The first run found under `directory` (not itself), looking `depth` levels down and at most `budget`
    entries, so an output of '/' costs little."""
    frontier = [directory]
    for _ in range(depth):
        children = []
        for parent in frontier:
            try:
                entries = [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()]
            except OSError:
                continue
            for child in entries:
                if holds_run(child):
                    return child
                children.append(child)
                budget -= 1
                if budget <= 0:
                    return None
        frontier = children
    return None


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing parent of `path` when it is a file (so nothing can be created below it)."""
    nearest = next((p for p in Path(path).parents if p.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def refuse_run_output(output: str | os.PathLike, flag: str, sources: tuple[Path, ...] = (),
                      may_hold_runs: bool = False, may_be_child_of: Path | None = None) -> None:
    """Refuse an output that is, contains or lies inside a training run (or the checkpoint being read), whatever
    --overwrite says. `may_hold_runs`: a sweep's directory holds its runs by design; `may_be_child_of`: eval's
    own folder inside the checkpoint it scores."""
    out = Path(os.path.abspath(output))
    if blocking := file_in_the_way(out):
        raise PeftlabError(f"{flag} {output}: {blocking} is a file, not a directory: choose another path")
    allowed_parent = Path(os.path.abspath(may_be_child_of)) if may_be_child_of else None
    for source in sources:
        src = Path(os.path.abspath(source))
        if out == src or src in out.parents and out.parent != allowed_parent:
            raise PeftlabError(f"{flag} {output} would write into {source}, the checkpoint this command reads: "
                               "choose an output outside it")
        if out in src.parents:
            raise PeftlabError(f"{flag} {output} holds {source}, the checkpoint this command reads: choose an output "
                               "outside it")
    if holds_run(out):
        raise PeftlabError(f"{flag} {output} is a training run (or one of its checkpoints): choose another output; "
                           "--overwrite never replaces a run from this command")
    inside_allowed = set()
    if allowed_parent and out.parent == allowed_parent:
        inside_allowed = {allowed_parent, *allowed_parent.parents}
    for ancestor in out.parents:
        if holds_run(ancestor) and ancestor not in inside_allowed:
            raise PeftlabError(f"{flag} {output} lies inside the training run {ancestor}: choose an output outside it")
    if not may_hold_runs and out.is_dir() and (inner := _runs_below(out)) is not None:
        raise PeftlabError(f"{flag} {output} holds the training run {inner}: choose another output")


# ---- YAML ------------------------------------------------------------------------------------------------------

MAX_YAML_VALUES = 100_000  # a config has few; a "billion laughs" of aliases (*name) expands to billions


def load_yaml(text: str, source: str = "YAML") -> object:
    """yaml.safe_load, refusing a document whose aliases expand it beyond MAX_YAML_VALUES values (counted on
    the composed graph, before anything is built), everywhere a user's YAML is read."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise PeftlabError(f"{source} expands to more than {MAX_YAML_VALUES:,} values through YAML aliases "
                               "(*name): write the values out instead")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (shared nodes are counted once each time
    they are used, but computed once)."""
    import yaml

    if id(node) not in sizes:
        if isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[id(node)] = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
        else:
            sizes[id(node)] = 1
    return sizes[id(node)]
