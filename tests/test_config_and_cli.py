"""LoraConfig validation, target matching errors, and `peftlab inspect`."""

import copy

import pytest
from conftest import fresh_base

import peftlab
from peftlab.cli import main
from peftlab.methods import parse_targets


@pytest.mark.parametrize("fields,message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -3}, "r must be a positive integer"),
    ({"alpha": 0}, "alpha must be positive"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"bias": "some"}, "bias must be"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ({"targets": None}, "needs targets"),
])
def test_bad_lora_config_is_refused(fields, message):
    with pytest.raises(peftlab.PeftlabError, match=message):
        peftlab.LoraConfig(**{"targets": ["q"], **fields})


def test_target_matching_nothing_names_close_modules():
    model, _ = fresh_base("llama-tiny")
    with pytest.raises(peftlab.PeftlabError, match=r"closest that exist: \['q_proj'") as err:
        peftlab.apply(copy.deepcopy(model), peftlab.LoraConfig(targets=["q_prj"]))
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, peftlab.methods.LoraLayer) for m in model.modules())


@pytest.mark.parametrize("preset, wanted, same_role", [
    ("llama-tiny", ["query", "value"], ["q_proj", "v_proj"]), ("bert-tiny", ["q", "v"], ["query", "value"]),
    ("t5-tiny", ["q_proj", "o_proj"], ["q", "o"]), ("gpt2-tiny", ["q", "v"], ["c_attn"])])
def test_targets_from_another_architecture_suggest_this_ones_names(preset, wanted, same_role):
    model, _ = fresh_base(preset)
    with pytest.raises(peftlab.PeftlabError) as err:
        peftlab.apply(model, peftlab.LoraConfig(targets=wanted))
    suggested = str(err.value).split("closest that exist: ")[1]
    assert suggested.startswith(str(same_role)[:-1])


def test_parse_targets():
    assert parse_targets("q, v") == ["q", "v"]
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets(r".*\.(q|v)") == r".*\.(q|v)"


def test_inspect_prints_the_seed_line(capsys):
    assert main(["inspect", "--model", "random:flan-t5-small", "--method", "lora", "--r", "4", "--alpha", "8",
                 "--targets", "q,v"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "trainable params: 172,032 || all params: 77,133,184 || trainable%: 0.2230"
    assert "parameters: 76,961,152" in out
    assert "q x24" in out and "wi_0 x16" in out  # 8 encoder + 16 decoder attention blocks; 16 FFNs
    assert "float32: 76,961,152 elements, 307.8 MB" in out


def test_inspect_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["inspect", "--model", "random:t5-tiny", "--method", "lora", "--targets", "qq"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab: error: targets ['qq'] match no module") and err.count("\n") == 1
    assert main(["inspect", "--model", "random:nope"]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_help_needs_no_torch_and_its_defaults_are_the_configs():
    import subprocess
    import sys

    from peftlab.cli import TRAIN_FLAGS
    from peftlab.help_defaults import METHOD_NAMES, TRAIN_DEFAULTS
    from peftlab.train.config import METHOD_NAMES as methods
    from peftlab.train.config import key_defaults

    assert METHOD_NAMES == methods
    defaults = key_defaults()
    assert TRAIN_DEFAULTS == {key: defaults[key] for key, _ in TRAIN_FLAGS.values()}
    check = ("import sys; from peftlab.cli import build_parser; p = build_parser(); "
             "[p.format_help(), p._subparsers._group_actions[0].choices['train'].format_help()]; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "[]"


def test_train_help_shows_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    lora = peftlab.LoraConfig(targets=["q"])  # one set of defaults: the method's own, in Python and on the CLI
    assert f"--alpha ALPHA sets method.alpha (default {lora.alpha})" in text
    assert f"--dropout DROPOUT sets method.dropout (default {lora.dropout})" in text
    assert f"--r R sets method.r (default {lora.r})" in text
    assert "--data DATA sets data.train --validation-data" in text  # no default: none shown


def test_template_flag_reads_backslash_n_and_t_as_a_shell_user_means_them(tmp_path):
    import yaml

    from peftlab.data.synth import write_jsonl
    data = write_jsonl([{"question": f"q{i}", "answer": "a"} for i in range(8)], tmp_path / "d.jsonl")
    assert main(["train", "--model", "random:llama-tiny", "--data", str(data), "--target-column", "answer",
                 "--template", r"Q:\t{question}\nA: \\n", "--max-steps", "1", "--output", str(tmp_path / "o")]) == 0
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["data"]["template"] == "Q:\t{question}\nA: \\n"  # an escaped backslash stays one


@pytest.mark.parametrize("method", sorted(peftlab.methods.METHODS))
def test_a_yaml_method_section_sets_every_field_of_that_methods_class(tmp_path, method):
    import dataclasses

    import yaml

    from peftlab.methods import METHODS, build_config
    from peftlab.train.config import RECORDED, load_config

    cls = METHODS[method]
    own = {f.name: f for f in dataclasses.fields(cls) if f.name in cls.field_names() - RECORDED}
    values = {name: getattr(cls, name) for name, f in own.items()
              if f.default is not dataclasses.MISSING and f.default is not None}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": method, **values}, "data": {"train": "x.jsonl"}}))
    config = load_config(path).validate()
    built = build_config(method, "t5", **config.method_fields())
    assert isinstance(built, cls) and all(getattr(built, k) == v for k, v in values.items())
    other, value = next((f.name, f.default) for c in METHODS.values() for f in dataclasses.fields(c)
                        if f.name not in cls.field_names() and f.default not in (None, dataclasses.MISSING))
    path.write_text(yaml.safe_dump({"method": {"name": method, other: value}, "data": {"train": "x.jsonl"}}))
    with pytest.raises(peftlab.PeftlabError, match=f"method.{other} is a setting of .*, not of {method}"):
        load_config(path).validate()


def test_python_and_yaml_share_the_methods_defaults():
    from peftlab.methods import METHODS, build_config
    from peftlab.train.config import TrainConfig

    config = TrainConfig()
    for method in METHODS:
        config.method.name = method
        built = build_config(method, "t5", **config.method_fields())
        assert built == build_config(method, "t5"), method  # nothing the YAML adds of its own
