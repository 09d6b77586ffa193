"""`peftlab merge`: fold an adapter into its base and write a plain Hugging Face model directory."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.eval.runs import LoadedRun
from peftlab.io import finalize_tree, fsync_path, output_lock, refuse_run_output, temp_dir_beside
from peftlab.methods.inject import merge_and_unload

# what save_pretrained and a tokenizer write: the only files --overwrite may replace
MERGED_FILES = re.compile(r"(generation_)?config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                          r"|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|spiece\.model"
                          r"|chat_template\.(jinja|json)")


def check_merge_output(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an output that is or touches a training run (or the checkpoint read), a file, or a non-empty
    directory without --overwrite; with it, a directory holding anything but an earlier merged model."""
    refuse_run_output(out, "-o", (source,) if source else ())
    if out.exists() and not out.is_dir():
        raise PeftlabError(f"-o {out} is a file, not a directory: choose another -o")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise PeftlabError(f"{out} is not empty: pass --overwrite to replace the merged model in it, or choose "
                           "another -o")
    if foreign := [name for name in entries if not MERGED_FILES.fullmatch(name)]:
        raise PeftlabError(f"{out} holds files merge does not write ({', '.join(foreign[:5])}): --overwrite replaces "
                           "only a merged model; choose an empty or new -o")


def export_merged(run: LoadedRun, output: str | Path, overwrite: bool = False, source: Path | None = None) -> Path:
    """Write safetensors, config and tokenizer that `AutoModel*.from_pretrained(output)` loads: into a directory
    beside `output`, swapped in once complete."""
    out = Path(os.path.abspath(output))
    for config in getattr(run.model, "peftlab_adapters", {}).values():
        if not config.mergeable:
            raise PeftlabError(f"a {config.method} adapter cannot be merged into the weights: keep the adapter "
                               "(peftlab generate -p, peftlab.load_adapter) instead of merging")
    check_merge_output(out, overwrite, source)
    with output_lock(out, "merge"):
        model = merge_and_unload(run.model) if getattr(run.model, "peftlab_adapters", None) else run.model
        model.config.name_or_path = str(out)
        with temp_dir_beside(out) as tmp:
            model.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
            finalize_tree(tmp)
            _swap_in(tmp, out)
    return Path(output)


def _swap_in(new: Path, out: Path) -> None:
    """`new` becomes `out`; an earlier merged model there is moved aside first and deleted last."""
    old = out.with_name(f".{out.name}.replaced")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(new, out)
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)
