"""The package's layering: methods are plain math that training and acceleration build on, not the reverse."""

import subprocess
import sys
from pathlib import Path

import pytest

METHODS = sorted(p.stem for p in (Path(__file__).parents[1] / "peftlab" / "methods").glob("*.py")
                 if p.stem != "__init__")


def test_importing_peftlab_and_its_methods_loads_no_training_or_acceleration_module():
    imports = "; ".join(f"import peftlab.methods.{m}" for m in METHODS)
    code = (f"import sys, peftlab, peftlab.methods, peftlab.models; {imports}; "
            "from peftlab import LoraConfig, apply, load_adapter, save_adapter, merge_and_unload; "
            "print(sorted(m for m in sys.modules if m.startswith(('peftlab.train', 'peftlab.accel'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert len(METHODS) >= 10 and loaded == "[]"


SPEC_FILE = '''
"""SmolLM3: Llama's layout (a family added by this one file)."""
from peftlab.archs import Arch
from peftlab.archs.llama import LLAMA_TOKENS, TINY_SHAPE


def smollm3_tiny():
    from transformers import SmolLM3Config

    return SmolLM3Config(**TINY_SHAPE)


SPEC = Arch(model_types=("smollm3",), task="causal", targets={"lora": ["q_proj", "v_proj"]}, plain_lm_head=True,
            rms_norms={"SmolLM3RMSNorm": "llama"}, presets={"smollm3-tiny": smollm3_tiny}, tokens=LLAMA_TOKENS)
'''


@pytest.fixture
def new_family(tmp_path, monkeypatch):
    """A spec file in a directory on peftlab.archs' search path, as a file in peftlab/archs/ would be."""
    import peftlab.archs as archs

    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "smollm3.py").write_text(SPEC_FILE)
    monkeypatch.setattr(archs, "__path__", [*archs.__path__, str(tmp_path / "specs")])
    archs.families.cache_clear()
    yield archs
    sys.modules.pop("peftlab.archs.smollm3", None)
    archs.families.cache_clear()


def test_a_family_added_by_one_spec_file_trains_evaluates_and_generates(new_family, tmp_path, capsys):
    """Its random preset, task, LoRA default targets, lean RMSNorm and chunked loss all come from the file."""
    import json

    import peftlab
    from peftlab.accel.loss import supports_chunked_loss
    from peftlab.cli import main

    model, tokenizer = peftlab.load_model("random:smollm3-tiny")
    assert type(model).__name__ == "SmolLM3ForCausalLM" and supports_chunked_loss(model)
    rows = [{"q": f"say {w}", "a": w} for w in ("yes", "no", "maybe", "later")] * 8
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--model", "random:smollm3-tiny", "--data", str(data), "--template", "{q} ->",
                 "--target-column", "a", "--max-steps", "8", "--lr", "0.05", "--batch-size", "8", "--output", str(out),
                 "run.eval_before=false", "run.eval_metrics=false", "run.logging_steps=1"]) == 0
    header = capsys.readouterr().out
    assert "RMSNorm x" in header and "LoRA x4" in header  # the lean kernels found its norm; LoRA on q and v
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    assert len(peftlab.generate(out, ["say yes ->"], max_new_tokens=3)) == 1


def test_full_fine_tuning_is_a_method_that_injects_nothing_and_trains_every_weight():
    import peftlab
    from peftlab.methods import METHODS, FullConfig, build_config
    from peftlab.train.config import METHOD_NAMES

    assert METHODS["full"] is FullConfig and "full" in METHOD_NAMES
    model, _ = peftlab.load_model("random:t5-tiny")
    for p in model.parameters():
        p.requires_grad_(False)
    config = build_config("full", "t5", targets=["q"])  # shared fields mean nothing to it: left out
    assert config.targets is None and not config.mergeable
    assert peftlab.apply(model, config) is model and not getattr(model, "peftlab_adapters", None)
    assert all(p.requires_grad for p in model.parameters())
    assert peftlab.count_parameters(model)[0] == peftlab.count_parameters(model)[1]
