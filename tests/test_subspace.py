"""Intrinsic-dimension subspace training: the Fastfood projection against explicit dense matrices, the
subspace model against a dense-projection reference, save/load/merge, and the d90 search."""

import copy
import json

import pytest
import torch
from conftest import example_batch, fresh_base
from torch.func import functional_call

import peftlab
from peftlab.data.synth import generate, write_jsonl
from peftlab.errors import PeftlabError
from peftlab.methods import DIDConfig, SubspaceConfig
from peftlab.methods.subspace import Fastfood, hadamard_transform
from peftlab.study.intrinsic import intrinsic_dim, search


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def dense_fastfood(f: Fastfood) -> torch.Tensor:
    """S H G Π H B written out as matrices, cut to D x d."""
    h = sylvester(f.length)
    permutation = torch.eye(f.length)[f.permutation]  # (Π x)_i = x[perm[i]]
    full = h @ torch.diag(f.gaussian) @ permutation @ h @ torch.diag(f.signs.float())
    return full[: f.size, : f.d] * f.scale


@pytest.mark.parametrize("length,block", [(16, 64), (128, 8), (256, 2), (512, 64)])
def test_hadamard_transform_equals_the_sylvester_matrix(length, block):
    x = torch.randn(length)  # block < length: several Kronecker passes, the last one possibly smaller
    torch.testing.assert_close(hadamard_transform(x, block), sylvester(length) @ x, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("d,size", [(5, 12), (3, 64), (20, 8), (1, 1)])
def test_fastfood_equals_the_explicit_dense_projection(d, size):
    f = Fastfood(d, size, seed=3)
    x = torch.randn(d)
    dense = dense_fastfood(f)
    assert dense.shape == (size, d)
    torch.testing.assert_close(f(x), dense @ x, atol=1e-5, rtol=1e-5)
    g = torch.randn(size)
    torch.testing.assert_close(f.transpose(g), dense.T @ g, atol=1e-5, rtol=1e-5)
    assert torch.equal(Fastfood(d, size, seed=3)(x), f(x))  # the seed alone rebuilds it
    if size >= 64:
        assert 0.7 < float(dense.norm(dim=0).mean()) < 1.3  # columns of about unit norm


@pytest.mark.parametrize("said", [True, False])
def test_subspace_model_equals_dense_projection_reference(said):
    base, tokenizer = fresh_base("bert-tiny")
    # small tensors only (biases, LayerNorm scales): the dense reference is L x L per tensor
    config = SubspaceConfig(d=8, said=said, seed=1, modules_to_save=["classifier"],
                            parameters=r".*(bias|LayerNorm\.weight)")
    model = peftlab.apply(copy.deepcopy(base), config).eval()
    subspace = model.peftlab_subspace
    with torch.no_grad():
        subspace.theta["default"].copy_(torch.randn(8) * 0.5)
        if said:
            subspace.lambdas["default"].copy_(torch.rand(subspace.lambdas["default"].numel()) + 0.5)
    batch = example_batch(model, tokenizer)
    theta = subspace.theta["default"].detach().clone().requires_grad_(True)
    lambdas = subspace.lambdas["default"].detach() if said else None
    weights, index = {}, 0
    for name, p in base.named_parameters():
        if name.startswith("classifier.") or not (name.endswith("bias") or name.endswith("LayerNorm.weight")):
            continue
        offset = subspace.offsets[index][2]
        projection = dense_fastfood(Fastfood(8, p.numel(), offset.seed))
        scale = lambdas[index] if said else 1.0
        weights[name] = p.detach() + (scale * projection @ theta).view_as(p)
        index += 1
    assert index == len(subspace.offsets)
    head = {f"classifier.{k}": v for k, v in model.classifier.modules_to_save["default"].named_parameters()}
    reference = functional_call(base, {**weights, **head}, args=(), kwargs=batch)
    ours = model(**batch)
    torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=1e-4)
    ours.loss.backward()
    reference.loss.backward()
    torch.testing.assert_close(subspace.theta["default"].grad, theta.grad, atol=1e-5, rtol=1e-4)
    if said:  # d loss / d λ_i = <d loss / d W_i, P_i θ>
        expected = [n for n in weights if n.endswith("bias") or n.endswith("LayerNorm.weight")]
        grads = torch.autograd.grad(functional_call(base, {**weights, **head}, args=(), kwargs=batch).loss,
                                    [weights[n] for n in expected])
        offsets = [o for _, _, o in subspace.offsets]
        projections = [Fastfood(8, o.size, o.seed)(theta.detach()) for o in offsets]
        reference_lambda = torch.stack([(g.reshape(-1) * pr).sum() for g, pr in zip(grads, projections, strict=True)])
        torch.testing.assert_close(subspace.lambdas["default"].grad, reference_lambda, atol=1e-5, rtol=1e-4)


def test_identity_at_init_counts_and_no_second_copy():
    base, tokenizer = fresh_base("bert-tiny")
    said = peftlab.apply(copy.deepcopy(base), SubspaceConfig(d=32, modules_to_save=["classifier"]))
    did = peftlab.apply(copy.deepcopy(base), DIDConfig(d=32, modules_to_save=["classifier"]))
    moved = len(said.peftlab_subspace.offsets)
    head = sum(p.numel() for p in base.classifier.parameters())
    assert peftlab.count_parameters(said)[0] == 32 + moved + head
    assert peftlab.count_parameters(did)[0] == 32 + head
    # the only full copy of each weight is the frozen original (no stored projection, no second copy)
    base_values = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in did.parameters()) == base_values + 32 + head
    batch = example_batch(said, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(said.eval()(**batch).logits, base(**batch).logits, atol=0, rtol=0)


def test_save_load_and_merge(tmp_path):
    base, tokenizer = fresh_base("t5-tiny")
    model = peftlab.apply(copy.deepcopy(base), SubspaceConfig(d=16, seed=5)).eval()
    with torch.no_grad():
        model.peftlab_subspace.theta["default"].normal_()
    batch = example_batch(model, tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
        assert not torch.allclose(expected, base(**batch).logits)
        peftlab.save_adapter(model, tmp_path)
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["peft_type"] == "INTRINSIC_DIM" and config["seed"] == 5 and config["d"] == 16
        loaded = peftlab.load_adapter(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
        peftlab.merge(loaded)
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        peftlab.unmerge(loaded)
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        plain = peftlab.merge_and_unload(loaded)
        assert not any(hasattr(m, "parametrizations") for m in plain.modules())
        assert set(plain.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_search_doubles_then_bisects():
    calls = []

    def evaluate(d):
        calls.append(d)
        return 0.5 + 0.4 * (d >= 300)

    d, curve = search(evaluate, 0.85, d_start=16, d_max=4096, precision=0.05)
    assert calls[:6] == [16, 32, 64, 128, 256, 512]
    assert 300 <= d <= 300 / 0.95 + 1 and curve[d] >= 0.85
    assert max(m for x, m in curve.items() if x < 300) < 0.85
    assert search(lambda d: 0.1, 0.5, d_start=4, d_max=16) == (None, {4: 0.1, 8: 0.1, 16: 0.1})
    calls.clear()  # starting above d90: halve until a miss, then bisect
    d, _ = search(evaluate, 0.85, d_start=4096, d_max=4096, precision=0.05)
    assert calls[:5] == [4096, 2048, 1024, 512, 256]
    assert 300 <= d <= 300 / 0.95 + 1
    calls.clear()  # every d down to d_min reaches the target: stop there (an upper bound)
    assert search(evaluate, 0.45, d_start=64, d_max=64, d_min=16) == (16, {64: 0.5, 32: 0.5, 16: 0.5})


@pytest.mark.parametrize("make,message", [
    (lambda: SubspaceConfig(d=0), "d must be a positive integer"),
    (lambda: SubspaceConfig(d=-5), "d must be a positive integer"),
    (lambda: peftlab.apply(fresh_base("t5-tiny")[0], SubspaceConfig(parameters=["nothing"])), "match no parameter"),
    (lambda: search(lambda d: 0, 1, d_start=0, d_max=8), "0 < --d-min <= --d-start"),
    (lambda: search(lambda d: 0, 1, d_start=4, d_max=8, d_min=8), "0 < --d-min <= --d-start"),
])
def test_bad_subspace_input_is_one_line(make, message):
    with pytest.raises(PeftlabError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_intrinsic_dim_command_end_to_end(tmp_path):
    data = write_jsonl(generate("sentiment", 48, seed=0), tmp_path / "d.jsonl")
    settings = [f"data.train={data}", "model.name=random:bert-tiny", "run.max_steps=8", "run.batch_size=8",
                "optim.lr=0.05", "run.logging_steps=4"]
    result = intrinsic_dim(None, tmp_path / "search", settings, full_metric=0.01, d_start=1, d_max=8)
    assert result["d"] == 1 and set(result["curve"]) == {"1"}  # any accuracy beats 0.9 x 0.01
    assert result["at_most"]  # nothing below d = 1 to miss
    assert (tmp_path / "search" / "curve.png").stat().st_size > 0
    assert (tmp_path / "search" / "curve.csv").read_text().splitlines()[1].startswith("1,")
    run_results = json.loads((tmp_path / "search" / "method=said,d=1" / "results.json").read_text())
    assert result["curve"]["1"] == pytest.approx(run_results["eval_after"]["eval_accuracy"], abs=1e-4)
