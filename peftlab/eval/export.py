"""`peftlab merge`: fold an adapter into its base and write a plain Hugging Face model directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.eval.runs import LoadedRun
from peftlab.methods.inject import merge_and_unload


def export_merged(run: LoadedRun, output: str | Path, overwrite: bool = False) -> Path:
    """Write safetensors, config and tokenizer that `AutoModel*.from_pretrained(output)` loads."""
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PeftlabError(f"{out} is not empty: pass --overwrite to replace it, or choose another -o")
    model = merge_and_unload(run.model) if getattr(run.model, "peftlab_adapters", None) else run.model
    model.config.name_or_path = str(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
