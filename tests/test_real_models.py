"""Issue 25, one test per problem found on real architectures (the matrix is test_architectures.py)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from kronsparse import KronLinear, Sparsifier, kernels
from kronsparse.layers import KronConv2d


def train(model, sp, opt, steps, batch=lambda s: torch.randn(8, 32, generator=torch.Generator().manual_seed(s))):
    for step in range(steps):
        opt.zero_grad()
        model(batch(step)).square().mean().backward()
        opt.step()
        sp.step(opt)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))


# 1 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["group-lasso", "elastic-group-lasso"])
def test_group_lasso_resumes_from_a_state_after_its_sparsifying_phase(method):
    model = mlp()
    sp = Sparsifier(model, method, block_shape=(4, 4), target_sparsity=0.5, total_steps=10)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-2)
    train(model, sp, opt, 9)  # the phase is 7 steps: the masks are frozen
    state = sp.state_dict()
    fresh = mlp()
    sp2 = Sparsifier(fresh, method, block_shape=(4, 4), target_sparsity=0.5, total_steps=10)
    sp2.load_state_dict(state)  # raised "a leaf Variable that requires grad is being used in an in-place operation"
    fresh.load_state_dict(model.state_dict())
    assert sp2.layer_sparsity() == sp.layer_sparsity() == {"0": 0.5, "2": 0.5}


# 2 -----------------------------------------------------------------------------------------------
def test_kron_layers_answer_weight_with_dtype_device_shape_and_the_dense_weight_when_used():
    layer = KronLinear(32, 16, (4, 4), rank=2)
    w = layer.weight
    assert (w.shape, w.dtype, w.device, w.dim()) == (torch.Size([16, 32]), torch.float32, torch.device("cpu"), 2)
    x = torch.randn(5, 32)
    torch.testing.assert_close(nn.functional.linear(x, layer.weight, layer.bias), layer(x))
    torch.testing.assert_close(w.t(), layer.dense_weight().t())
    conv = KronConv2d(8, 8, 3, (4, 4))
    assert conv.weight.shape == (8, 8, 3, 3)


def test_the_transformer_encoder_fast_path_and_t5_run_with_kron_layers():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    Sparsifier(enc, "kron", block_shape=(4, 4), rank=2, target_sparsity=0.5, total_steps=10)
    dense = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)
    state = {k: v for k, v in enc.state_dict().items() if not k.endswith((".S", ".A", ".B"))}
    for name, m in enc.named_modules():
        if isinstance(m, KronLinear):
            state[f"{name}.weight"] = m.dense_weight().detach()
    dense.load_state_dict(state)
    x = torch.randn(2, 5, 32)
    enc.eval(), dense.eval()
    with torch.no_grad():  # the eval fast path reads linear1.weight (AttributeError before)
        torch.testing.assert_close(enc(x), dense(x), rtol=1e-4, atol=1e-5)

    pytest.importorskip("transformers")
    from architectures import t5

    arch = t5()
    model = arch.model()
    Sparsifier(model, "kron", block_shape=(4, 4), rank=2, target_sparsity=0.5, total_steps=10)
    loss = arch.loss(model, arch.batch(0))  # T5 reads self.wo.weight.dtype
    loss.backward()
    assert torch.isfinite(loss) and model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo").S.grad is not None


# 3 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["input_first", "factors_first", "materialize"])
@pytest.mark.parametrize("rows", [None, 3])  # None: one chunk; 3: many
def test_an_inplace_op_after_a_kron_layer_works_on_every_path(path, rows, monkeypatch):
    if rows is not None:
        monkeypatch.setattr(kernels, "chunk_rows", lambda *args: rows)
    torch.manual_seed(0)
    layer = KronLinear(16, 16, (4, 4), rank=2, path=path)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = nn.ReLU(inplace=True)(layer(x))
    y.square().sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref = torch.relu(nn.functional.linear(xr, layer.dense_weight(), layer.bias))
    torch.testing.assert_close(y, ref)
    gS = layer.S.grad.clone()
    layer.zero_grad()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(gS, layer.S.grad)


# 4 -----------------------------------------------------------------------------------------------
def test_gpt2_conv1d_layers_are_sparsified_by_every_kind_of_method_and_the_summary_says_so():
    pytest.importorskip("transformers")
    from architectures import gpt2

    arch = gpt2()
    for method in ("kron", "group-lasso"):
        model = arch.model()
        sp = Sparsifier(model, method, block_shape=(4, 4), target_sparsity=0.5, total_steps=10)
        assert len(sp.layers) == 8 and all(".attn." in n or ".mlp." in n for n in sp.layers)
        summary = sp.summary()
        assert summary.coverage > 0.9 and summary.total_weights == sum(
            p.numel() for p in arch.model().parameters() if p.dim() >= 2)
        dense = {r.name: r.reason for r in summary.dense()}
        assert "tied to transformer.wte.weight" in dense["lm_head"] and "embedding" in dense["transformer.wte"]
        text = str(summary)
        assert "transformer.h.0.attn.c_attn" in text and "8 layers sparsified" in text


def test_a_model_mostly_left_dense_warns_and_its_coverage_is_beside_the_block_sparsity():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(1000, 32), "attn": nn.MultiheadAttention(32, 2), "head": nn.Linear(32, 8),
                           "dw": nn.Conv2d(8, 8, 3, groups=8)})
    with pytest.warns(UserWarning, match=r"hold 1% of the model's weights"):
        sp = Sparsifier(model, "group-lasso", block_shape=(4, 4), target_sparsity=0.5, total_steps=10)
    reasons = {r.name: r.reason for r in sp.summary().dense()}
    assert "MultiheadAttention" in reasons["attn"] and "depthwise" in reasons["dw"] and "embedding" in reasons["emb"]
    assert sp.coverage() == 256 / (32000 + 4 * 32 * 32 + 256 + 72)


@pytest.mark.parametrize("method", ["kron", "select"])
def test_coverage_counts_a_kronecker_layer_once_whatever_its_candidates(method, recwarn):
    """select's layer sums its candidates' Kronecker terms into one W: counted once, not once per
    candidate (three candidates showed 33% coverage, with a warning naming no dense layer)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    sp = Sparsifier(model, method, block_shape=(4, 4), target_sparsity=0.5, total_steps=10,
                    **({"candidates": [(4, 4), (8, 8), (16, 16)]} if method == "select" else {}))
    assert sp.coverage() == 2 * 4096 / (2 * 4096 + 640)
    assert sp.summary().total_weights == 2 * 4096 + 640
    assert not [w for w in recwarn if "of the model's weights" in str(w.message)]


# 5 -----------------------------------------------------------------------------------------------
def test_tied_weights_stay_tied_dense_by_default_and_kron_refuses_to_untie_them():
    pytest.importorskip("transformers")
    from architectures import bert, gpt2

    for arch in (gpt2(), bert()):
        for method in ("kron", "block-magnitude"):
            model = arch.model()
            sp = Sparsifier(model, method, block_shape=(4, 4), target_sparsity=0.5, total_steps=4)
            out = model.get_output_embeddings()
            assert not any(model.get_submodule(n) is out for n in sp.layers)
            opt = sp.optimizer(torch.optim.AdamW, lr=1e-2)
            for step in range(4):
                arch.loss(model, arch.batch(step)).backward()
                opt.step()
                sp.step(opt)
            sp.finalize()
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
            assert (model.get_input_embeddings().weight != 0).all()
    model = gpt2().model()
    with pytest.raises(ValueError, match="would untie them"):
        Sparsifier(model, "kron", block_shape=(4, 4), target_sparsity=0.5, total_steps=4, layers=["lm_head"])
    sp = Sparsifier(model, "rigl", block_shape=(4, 4), target_sparsity=0.5, total_steps=4, layers=["lm_head"])
    sp.finalize()  # named: sparsified with the tie kept
    assert model.lm_head.weight is model.transformer.wte.weight and sp.block_sparsity() == 0.5


# 6 -----------------------------------------------------------------------------------------------
def test_squash_gives_a_plain_model_that_saves_and_loads_with_from_pretrained(tmp_path):
    pytest.importorskip("transformers")
    from architectures import gpt2, llama

    for arch in (llama(), gpt2()):
        model = arch.model()
        sp = Sparsifier(model, "kron", block_shape=(4, 4), rank=2, target_sparsity=0.5, total_steps=4)
        opt = sp.optimizer(torch.optim.AdamW, lr=1e-2)
        for step in range(4):
            arch.loss(model, arch.batch(step)).backward()
            opt.step()
            sp.step(opt)
        with pytest.warns(UserWarning, match="still holds Kronecker layers"):
            model.save_pretrained(tmp_path / "unsquashed")
        model.eval()
        before = arch.output(model, arch.batch(99)).detach()
        sp.squash()
        assert {type(m).__name__ for m in model.modules()} == {type(m).__name__ for m in arch.model().modules()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a plain model saves without a warning
            model.save_pretrained(tmp_path / arch.name)
        loaded = type(model).from_pretrained(tmp_path / arch.name).eval()
        after = arch.output(loaded, arch.batch(99)).detach()
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        assert torch.equal(after, arch.output(model, arch.batch(99)).detach())
        assert sp.block_sparsity() == 0.5
        with pytest.raises(ValueError, match="squashed"):
            sp.step(opt)


def test_a_dense_export_whose_tied_tensors_differ_is_refused(tmp_path):
    from kronsparse.export import ExportError, export_model
    from kronsparse.inference import replace_layers_

    torch.manual_seed(0)
    untied = nn.ModuleDict({"emb": nn.Embedding(8, 4), "out": nn.Linear(4, 8, bias=False)})
    path = export_model(untied, tmp_path / "e.safetensors")
    tied = nn.ModuleDict({"emb": nn.Embedding(8, 4), "out": nn.Linear(4, 8, bias=False)})
    tied.out.weight = tied.emb.weight
    with pytest.raises(ExportError, match="one tied parameter"):
        replace_layers_(tied, path)


# 7 -----------------------------------------------------------------------------------------------
def test_the_one_layer_rule_counts_the_models_layers():
    pytest.importorskip("transformers")
    from architectures import gpt2

    sp = Sparsifier(gpt2().model(), "kron", block_shape=(4, 4), target_sparsity=0.5, total_steps=4)
    sp.optimizer(torch.optim.AdamW, lr=1e-3)
    assert sp.summary()["scale_pin"] == "norm" and sp.summary()["factor_lr"] == 8.0
    one = nn.Sequential(nn.Flatten(), nn.Linear(32, 16))
    sp = Sparsifier(one, "kron", block_shape=(4, 4), target_sparsity=0.5, total_steps=4)
    sp.optimizer(torch.optim.AdamW, lr=1e-3)
    assert sp.summary()["scale_pin"] == "decay" and sp.summary()["factor_lr"] == 1.0
    # an embedding and one sparsified Linear are two layers: the deep-model defaults
    two = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 16))
    assert Sparsifier(two, "kron", block_shape=(4, 4), target_sparsity=0.5, total_steps=4).method.pin == "norm"


# 8 -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_of_kron_layers_gives_no_dynamo_warning():
    model = nn.Sequential(KronLinear(32, 32, (4, 4), rank=2), nn.ReLU(), KronLinear(32, 16, (4, 4)))
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(8, 32, requires_grad=True)).sum().backward()
    assert not [str(w.message)[:80] for w in caught if "lru_cache" in str(w.message)]


# 10 ----------------------------------------------------------------------------------------------
def test_a_rank_above_the_full_kronecker_rank_is_capped_with_a_message():
    model = nn.Sequential(nn.Linear(64, 32))  # 8x16 blocks of 4x4: full rank min(16, 128) = 16
    with pytest.warns(UserWarning, match=r"rank 1000000 is above the full Kronecker rank .* 0 \(16\)"):
        sp = Sparsifier(model, "kron", block_shape=(4, 4), rank=10**6, target_sparsity=0.5, total_steps=4)
    assert sp.sparsified_layers()["0"].A.shape == (16, 8, 16)


def test_a_state_dict_of_another_method_model_or_nothing_is_refused_in_one_line():
    sp = Sparsifier(mlp(), "kron", block_shape=(4, 4), target_sparsity=0.5, total_steps=4)
    other = Sparsifier(mlp(), "group-lasso", block_shape=(4, 4), target_sparsity=0.5, total_steps=4)
    with pytest.raises(ValueError, match="method 'group-lasso' cannot resume a Sparsifier of method 'kron'"):
        sp.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="not a Sparsifier state_dict"):
        sp.load_state_dict(mlp().state_dict())
    with pytest.raises(ValueError, match="not a Sparsifier state_dict"):
        sp.load_state_dict([1, 2])
    smaller = Sparsifier(nn.Sequential(nn.Linear(32, 32)), "kron", block_shape=(4, 4), target_sparsity=0.5,
                         total_steps=4)
    with pytest.raises(ValueError, match="another model"):
        sp.load_state_dict(smaller.state_dict())
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    sp.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))  # its own loads


def test_a_model_that_owns_tensors_itself_is_still_as_deep_as_its_layers():
    from kronsparse.model_tree import depth

    class Vit(nn.Module):  # a position embedding on the model itself, as the app's ViT has
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 4, 32))
            self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 8)

    assert depth(Vit()) == 3
    assert depth(nn.Sequential(nn.Flatten(), nn.Linear(32, 8))) == 1


def test_the_summary_sees_through_block_magnitudes_parametrized_layers_gpt2_included():
    pytest.importorskip("transformers")
    from architectures import gpt2

    model = gpt2().model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning: ParametrizedConv1D is still a Conv1D
        sp = Sparsifier(model, "block-magnitude", block_shape=(4, 4), target_sparsity=0.5, total_steps=10)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-2)
    for step in range(9):  # the last mask update (step 6) is at the target, before finalize
        loss = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
        loss.backward()
        opt.step()
        sp.step(opt)
    summary = sp.summary()
    assert summary.coverage > 0.9 and {r.kind for r in summary.layers if r.sparsified} == {"Conv1D"}
    assert set(sp.layer_sparsity().values()) == {0.5}  # counted on the (out, in) grid of the parametrized Conv1D


def test_a_methods_per_layer_numbers_reach_the_summary_rows(monkeypatch):
    sp = Sparsifier(mlp(), "kron", block_shape=(4, 4), target_sparsity=0.5, total_steps=4)
    monkeypatch.setattr(sp.method, "layer_stats", lambda: {"2": {"topped_up_blocks": 3}})
    rows = {r.name: r.stats for r in sp.summary().layers if r.sparsified}
    assert rows == {"0": {"zero_blocks": 0}, "2": {"zero_blocks": 0, "topped_up_blocks": 3}}
