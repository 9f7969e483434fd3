"""End to end: PyTorch model -> qcc.compile -> native CPU code, against PyTorch.

Float: within 1e-4 relative error of PyTorch.  Quantized: equal, within 1e-4,
to PyTorch running the weights that the format reference decodes from the
compiled artifact -- that checks qcc's semantics exactly, not "roughly close".
"""

import copy

import numpy as np
import pytest
import torch

import models
from oracles import float64_out, rel_err
import qcc
from qcc.reference import dequantized_weights, load_into_torch


@pytest.mark.parametrize("name", sorted(models.ZOO))
def test_float_matches_pytorch(name):
    model, inputs = models.ZOO[name](seed=1)
    compiled = qcc.compile(model, inputs, target="cpu")
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4


QUANT_MODELS = {
    "mlp": lambda: (lambda m: (m, m.example_inputs(batch=5, seed=3)))(models.MLP(in_features=128, seed=2).eval()),
    "llama_block": lambda: (lambda m: (m, m.example_inputs(batch=2, seq=8, seed=3)))(
        models.LlamaBlock(hidden=256, heads=4, kv_heads=2, ffn=768, seed=2).eval()),
    # x @ W projections ([K, N] weights): stored transposed, quantized like nn.Linear's
    "gpt2_block": lambda: (lambda m: (m, m.example_inputs(batch=2, seq=8, seed=3)))(
        models.GPT2Block(hidden=256, heads=4, seed=2).eval()),
}


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16-g128", "w4a16-g64-sym", "w8a16-g32"])
@pytest.mark.parametrize("name", sorted(QUANT_MODELS))
def test_quantized_matches_dequantized_reference(name, recipe):
    model, inputs = QUANT_MODELS[name]()
    compiled = qcc.compile(model, inputs, target="cpu", quant=recipe)
    layers = compiled.manifest["layers"]
    n_linear = sum(isinstance(m, (torch.nn.Linear, models.Conv1D)) for m in model.modules())
    assert len(layers) == n_linear
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    expect = float64_out(reference, inputs)
    got = compiled(*inputs).numpy()
    assert rel_err(got, expect) <= 1e-4
    # and quantization really happened: the float model differs
    assert rel_err(float64_out(model, inputs), expect) > 1e-4


def test_save_load_roundtrip_and_deterministic(tmp_path):
    model, inputs = QUANT_MODELS["mlp"]()
    a = qcc.compile(model, inputs, quant="w4a16-g128")
    b = qcc.compile(model, inputs, quant="w4a16-g128")
    a.save(tmp_path / "a.qcc")
    b.save(tmp_path / "b.qcc")
    assert (tmp_path / "a.qcc").read_bytes() == (tmp_path / "b.qcc").read_bytes()
    loaded = qcc.load(str(tmp_path / "a.qcc"))
    np.testing.assert_array_equal(loaded(*inputs).numpy(), a(*inputs).numpy())
    x = inputs[0].numpy()
    np.testing.assert_array_equal(loaded.run(x)[0], a.run(x)[0])


def test_weights_shrink():
    model, inputs = QUANT_MODELS["llama_block"]()
    c4 = qcc.compile(model, inputs, quant="w4a16-g128")
    c8 = qcc.compile(model, inputs, quant="w8a16")
    f4 = sum(layer["float_bytes"] for layer in c4.manifest["layers"])
    q4 = sum(layer["bytes"] for layer in c4.manifest["layers"])
    q8 = sum(layer["bytes"] for layer in c8.manifest["layers"])
    assert f4 / q4 > 7.0 and 3.9 < f4 / q8 <= 4.0


def test_exported_program_input():
    model, inputs = QUANT_MODELS["mlp"]()
    ep = torch.export.export(model, inputs)
    compiled = qcc.compile(ep, quant="w8a16")
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    assert rel_err(compiled(*inputs).numpy(), float64_out(reference, inputs)) <= 1e-4


def test_runtime_input_errors():
    model, inputs = QUANT_MODELS["mlp"]()
    compiled = qcc.compile(model, inputs)
    with pytest.raises(qcc.QccError, match=r"input 0 'x'.*expected shape \[5, 128\], got \[5, 64\]"):
        compiled(torch.randn(5, 64))
    with pytest.raises(qcc.QccError, match="expected dtype float32, got float64"):
        compiled(torch.randn(5, 128, dtype=torch.float64))
    with pytest.raises(qcc.QccError, match="takes 1 input"):
        compiled(*inputs, *inputs)


def test_api_errors():
    model, inputs = QUANT_MODELS["mlp"]()
    with pytest.raises(qcc.QccError, match="unknown quantization recipe 'w5a16'"):
        qcc.compile(model, inputs, quant="w5a16")
    with pytest.raises(qcc.QccError, match="unknown target 'tpu'"):
        qcc.compile(model, inputs, target="tpu")
    with pytest.raises(qcc.QccError, match="needs example_inputs"):
        qcc.compile(model)
    with pytest.raises(qcc.QccError, match="has dtype bfloat16, which a qcc artifact cannot take"):
        qcc.compile(torch.nn.Linear(8, 8), (torch.randn(1, 8).bfloat16(),))


@pytest.mark.parametrize("recipe,kv_heads,cache_dtype", [("float", None, torch.float32),
                                                         ("w4a16-g128", 2, torch.float16)])
def test_decode_step_any_cache_length(recipe, kv_heads, cache_dtype):
    """A decode step compiled for any KV cache length (torch.export dynamic_shapes; the new
    token's position is the cache's length): run at three lengths against PyTorch in float64
    on the artifact's weights (GQA and an f16 cache in the second case: the attention kernels
    read the cache parts in place at run-time lengths; test/passes/cpu-vectorize-contractions.mlir)."""
    from bench_models import DecodeStep, bench_llama

    model = bench_llama(layers=1, hidden=256, ffn=768, heads=4, max_seq=64)
    if kv_heads:
        model = models.LlamaModel(vocab=512, hidden=256, layers=1, heads=4, kv_heads=kv_heads, ffn=768,
                                  max_seq=64, seed=1).eval()
    step = DecodeStep(model, 24, cache_dtype=cache_dtype).eval()
    compiled = qcc.compile(step, step.example_inputs(seed=5), target="cpu", quant=recipe,
                           dynamic_shapes=step.dynamic_shapes())
    reference = copy.deepcopy(step)
    load_into_torch(reference, dequantized_weights(compiled))
    reference = reference.double()
    for length in (3, 24, 63):
        inputs = DecodeStep(model, length, cache_dtype=cache_dtype).example_inputs(seed=length)
        with torch.no_grad():
            expect = reference(*(x.double() if x.is_floating_point() else x for x in inputs))
        got = compiled(*inputs)
        for g, e in zip(got, expect):
            assert g.shape == e.shape
            assert rel_err(g.numpy(), e.numpy()) <= 1e-4, length


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_float64(approximate):
    """GELU in both forms against PyTorch in float64 to f32 rounding (torch-mlir's lowering of
    the tanh form uses 0.797724 for sqrt(2 / pi), 5e-5 off: the fix-gelu-tanh pass)."""
    class Gelu(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x, approximate=approximate)

    x = torch.linspace(-6.0, 6.0, 4096).reshape(64, 64)
    got = qcc.compile(Gelu(), (x,))(x).numpy()
    assert rel_err(got, Gelu()(x.double()).numpy()) <= 2e-7


def test_sizes_outside_the_exported_range_are_refused(tmp_path):
    """A run-time size beyond torch.export's range for it (a KV cache longer than the RoPE
    table the model slices) is a clear error naming the input, the size and the range: the
    compiled code would read past the table. In range it runs; the range survives save/load."""
    from torch.export import Dim

    class Window(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(16, 4))

        def forward(self, x):
            return x * self.table[: x.shape[0]]

    n = Dim("n", min=2, max=16)
    model = Window()
    compiled = qcc.compile(model, (torch.randn(5, 4),), dynamic_shapes=({0: n},))
    for rows in (2, 16):
        x = torch.randn(rows, 4)
        assert rel_err(compiled(x).numpy(), model.double()(x.double()).numpy()) <= 1e-6
        model.float()
    compiled.save(str(tmp_path / "w.qcc"))
    for m in (compiled, qcc.load(str(tmp_path / "w.qcc"))):
        with pytest.raises(qcc.QccError, match=r"input 0 'x'.*dimension '\w+' is 17, outside .* \(2\.\.16\)"):
            m(torch.randn(17, 4))
        with pytest.raises(qcc.QccError, match=r"is 1, outside"):
            m(torch.randn(1, 4))


def test_expands_keeping_a_run_time_size():
    """frontend._simplify_expands: an expand to its input's own (symbolic) shape is dropped, a
    run-time size an expand keeps becomes -1, a real broadcast stays (torch-mlir then lowers
    no gather that picks index 0 for a size of 1); the compiled function is unchanged."""
    from torch.export import Dim

    from qcc.frontend import _simplify_expands

    class Expands(torch.nn.Module):
        def forward(self, x, y):
            same = x.expand(x.shape[0], x.shape[1])          # identity
            rep = y[:, None].expand(y.shape[0], 3, y.shape[1])  # broadcast over a new dim, rows kept
            return same * 2.0, rep.reshape(-1, y.shape[1]) + 1.0

    x, y = torch.randn(5, 4), torch.randn(6, 4)
    shapes = ({0: Dim.DYNAMIC}, {0: Dim.DYNAMIC})
    ep = torch.export.export(Expands(), (x, y), dynamic_shapes=shapes)
    graph = ep.graph

    def expands():
        return [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.expand.default]

    assert len(expands()) == 2
    _simplify_expands(graph)
    (kept,) = expands()
    assert kept.args[1][0] == -1 and kept.args[1][1] == 3
    compiled = qcc.compile(Expands(), (x, y), dynamic_shapes=shapes)
    for rows in (2, 7):
        a, b = torch.randn(rows, 4), torch.randn(rows + 1, 4)
        for got, ref in zip(compiled(a, b), Expands()(a.double(), b.double())):
            assert rel_err(got.numpy(), ref.numpy()) <= 1e-6


@pytest.mark.parametrize("recipe", ["float", "w4a16-g128", "w8a8"])
def test_batched_decode_step(recipe):
    """A decode step of 3 sequences (ids [3, 1], KV caches with a batch of 3): every linear
    sees M = 3 rows (the weight-only GEMV's row tiles, the integer GEMV) and attention one
    query per sequence; logits and the new keys / values against PyTorch in float64 on the
    weights the artifact decodes to (w8a8 with each linear's input fake-quantized as its format)."""
    from bench_models import DecodeStep, bench_llama

    step = DecodeStep(bench_llama(layers=1, hidden=256, ffn=768, heads=4, max_seq=48), 24, batch=3).eval()
    inputs = step.example_inputs(seed=5)
    compiled = qcc.compile(step, inputs, target="cpu", quant=recipe)
    reference = copy.deepcopy(step)
    load_into_torch(reference, dequantized_weights(compiled))
    if recipe == "w8a8":  # the fake-quant oracle: each linear's input through the int8 per-token format
        from qcc.dialects.formats import activation

        afmt = activation.parse_act_format("int8_sym_token")
        for lin in (m for m in reference.modules() if isinstance(m, torch.nn.Linear)):
            lin.register_forward_pre_hook(lambda mod, args: torch.from_numpy(activation.fake_quant_act(
                args[0].float().reshape(-1, args[0].shape[-1]).numpy(), afmt).astype(np.float64)).reshape(args[0].shape))
    with torch.no_grad():
        expect = reference.double()(*(x.double() if x.is_floating_point() else x for x in inputs))
    for got, ref in zip(compiled(*inputs), expect):
        assert got.shape == ref.shape
        assert rel_err(got.numpy(), ref.numpy()) <= 1e-4


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16-sym", "w8a16-gptq", "w8a8"])
def test_convolution_weights_are_quantized(recipe):
    """A 2-D convolution is a linear layer over its input patches (frontend): its weight
    [O, C, kh, kw] is stored [O, kh * kw * C] and quantized as any linear's (GPTQ with the
    patches' Hessian; w8a8 quantizes the patches too); the output equals float64 on the
    decoded weights (which come back in the model's shape), or w8a8's fake-quant oracle."""
    model, inputs = models.ZOO["cnn"](seed=1)
    kw = {"calibration": [inputs]} if recipe.endswith("gptq") else {}
    compiled = qcc.compile(model, inputs, target="cpu", quant=recipe, **kw)
    layers = {layer["weight"]: layer for layer in compiled.manifest["layers"]}
    assert sorted(layers) == ["conv1.weight", "conv2.weight", "fc.weight"] and compiled.remarks == []
    assert layers["conv2.weight"]["shape"] == [32, 144] and layers["conv2.weight"]["conv_shape"] == [32, 16, 3, 3]
    assert layers["conv2.weight"]["conv_layout"] == "ohwi"
    assert "conv2.weight" not in compiled.weights  # only the codes are stored
    if recipe == "w8a8":
        from test_recipes import RECIPE_FORMATS, fake_quant_model

        patches = _as_linear_patches(model)
        linears = [f"{n}.weight" for n, m in patches.named_modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            expect = fake_quant_model(patches, {w: RECIPE_FORMATS["w8a8"] for w in linears})(*inputs).numpy()
    else:
        reference = copy.deepcopy(model)
        load_into_torch(reference, dequantized_weights(compiled))
        expect = float64_out(reference, inputs)
    assert rel_err(compiled(*inputs).numpy(), expect) <= 1e-4
    assert rel_err(float64_out(model, inputs), expect) > 1e-4


def _as_linear_patches(model):
    """`model` with each Conv2d computed as nn.Linear over its unfolded patches in qcc's
    (kh, kw, C) order, so the fake-quant oracle quantizes the same rows."""
    model = copy.deepcopy(model)

    class Patches(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv
            o, c, kh, kw = conv.weight.shape
            self.lin = torch.nn.Linear(kh * kw * c, o, bias=conv.bias is not None)
            with torch.no_grad():
                self.lin.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(o, -1))
                if conv.bias is not None:
                    self.lin.bias.copy_(conv.bias)

        def forward(self, x):
            conv, (n, c, h, _) = self.conv, x.shape
            kh, kw = conv.kernel_size
            cols = torch.nn.functional.unfold(x, (kh, kw), conv.dilation, conv.padding, conv.stride)
            positions = cols.shape[-1]
            cols = cols.view(n, c, kh * kw, positions).permute(0, 3, 2, 1).reshape(n * positions, kh * kw * c)
            ho = (h + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
            return self.lin(cols).view(n, ho, positions // ho, -1).permute(0, 3, 1, 2)

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Conv2d):
                setattr(module, child_name, Patches(child))
    return model


def test_weights_left_float_are_remarked(tmp_path):
    """Convolutions whose rows the format's groups do not tile stay float, and the artifact
    says so (kept through save / load) instead of leaving it silent."""

    class Convs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c27 = torch.nn.Conv2d(3, 8, 3)   # rows of 27: no group of 32 tiles them
            self.c32 = torch.nn.Conv2d(8, 8, 2)   # rows of 32: one group

        def forward(self, x):
            return self.c32(self.c27(x))

    model = Convs().eval()
    inputs = (torch.randn(1, 3, 10, 10),)
    compiled = qcc.compile(model, inputs, target="cpu", quant="w4a16-g32")
    assert [layer["weight"] for layer in compiled.manifest["layers"]] == ["c32.weight"]
    assert compiled.remarks == ["quantize-weights: convolution weights left float (groups of 32 do not tile their "
                                "rows of 3x3x3 columns): c27.weight"]
    compiled.save(str(tmp_path / "convs.qcc"))
    assert qcc.load(str(tmp_path / "convs.qcc")).remarks == compiled.remarks
    assert qcc.compile(model, inputs, target="cpu", quant="float").remarks == []


@pytest.mark.parametrize("dynamic", [False, True])
def test_multihead_attention_in_projection_is_a_linear_layer(dynamic):
    """nn.MultiheadAttention (batch_first) multiplies its packed in-projection as a bmm against
    the weight broadcast over the sequence (torch's matmul decomposition of a transposed x):
    the frontend makes it an mm, so it is quantized like the other linears, also when the
    sequence length is a run-time size."""
    torch.manual_seed(3)
    model = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, batch_first=True,
                                             dropout=0.0).eval()
    shapes = ({1: torch.export.Dim("seq", min=2, max=64)},) if dynamic else None
    compiled = qcc.compile(model, (torch.randn(2, 10, 128),), target="cpu", quant="w8a16", dynamic_shapes=shapes)
    assert sorted(layer["weight"] for layer in compiled.manifest["layers"]) == [
        "linear1.weight", "linear2.weight", "self_attn.in_proj_weight", "self_attn.out_proj.weight"]
    assert compiled.remarks == []
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    for seq in ((5, 10, 33) if dynamic else (10,)):
        x = torch.randn(2, seq, 128)
        assert rel_err(compiled(x).numpy(), float64_out(reference, (x,))) <= 1e-4


def test_weights_read_through_views_are_remarked():
    """A weight sliced before its product is no linear layer qcc can quantize: the remark names it."""

    class Sliced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(96, 64))
            self.fc = torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.fc(torch.nn.functional.linear(x, self.w[:64]))

    model = Sliced().eval()
    compiled = qcc.compile(model, (torch.randn(3, 64),), target="cpu", quant="w8a16")
    assert [layer["weight"] for layer in compiled.manifest["layers"]] == ["fc.weight"]
    assert compiled.remarks == ["w8a16: weights left float (qcc quantizes linear layers, convolutions whose rows "
                                "the format's groups tile, and gathered experts): w [96x64] (matmul)"]


class _Stateful(torch.nn.Module):
    """Buffers forward() updates in place: a running sum, a step counter, a cache row per call."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.register_buffer("total", torch.zeros(2, 16))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(1, 8, 16))

    def forward(self, x, pos):
        y = self.fc(x)
        self.total.add_(y)
        self.steps.add_(1)
        self.cache.index_copy_(1, pos, y[:1].unsqueeze(1))
        return y + self.total, self.cache.sum(1)


def test_buffers_updated_in_forward_are_kept_between_calls(tmp_path):
    """A model that updates its buffers (HF's static KV cache does) compiles: the artifact keeps
    them as state, each call reads them and stores their new values, as the module does."""
    torch.manual_seed(4)
    model = _Stateful().eval()
    compiled = qcc.compile(model, (torch.randn(2, 16), torch.tensor([0])), target="cpu", quant="w8a16")
    assert [s["name"] for s in compiled.manifest["states"]] == ["total", "steps", "cache"]
    assert len(compiled.outputs) == 2
    # the cache row is written into the state's own array (no copy of the cache per call)
    assert [o["name"] for o in compiled.manifest["outputs"] if o.get("in_place")] == ["cache"]
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    compiled.save(str(tmp_path / "s.qcc"))
    for t in range(3):
        x, pos = torch.randn(2, 16), torch.tensor([t])
        with torch.no_grad():
            expect = reference(x, pos)
        got = compiled(x, pos)
        for g, e in zip(got, expect):
            assert rel_err(g.numpy(), e.numpy()) <= 1e-5
        assert int(compiled.state["steps"]) == t + 1
    np.testing.assert_allclose(compiled.state["cache"], reference.cache.numpy(), rtol=1e-5, atol=1e-6)
    loaded = qcc.load(str(tmp_path / "s.qcc"))  # the initial values, not this run's
    assert int(loaded.state["steps"]) == 0 and not loaded.state["total"].any()
    compiled.reset_state()
    assert int(compiled.state["steps"]) == 0 and not compiled.state["cache"].any()


def test_a_value_returned_twice():
    """`return y, y` (and an input returned as is) used to crash the compiler in
    buffer-results-to-out-params; each result now gets its own buffer."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return y, y, x

    model = Twice().eval()
    x = torch.randn(3, 8)
    a, b, c = qcc.compile(model, (x,), target="cpu")(x)
    with torch.no_grad():
        expect = copy.deepcopy(model).double()(x.double())[0].numpy()
    assert rel_err(a.numpy(), expect) <= 1e-5 and rel_err(b.numpy(), expect) <= 1e-5
    assert np.array_equal(c.numpy(), x.numpy())


def test_a_state_read_before_and_after_its_update_is_not_updated_in_place():
    """In place only where nothing reads the old value after the new one is written: here the
    old cache is read after the update, so the call writes a new array."""

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.arange(24, dtype=torch.float32).reshape(1, 4, 6))

        def forward(self, x, pos):
            old = self.cache.clone()
            self.cache.index_copy_(1, pos, x)
            return self.cache.sum(1) - 2 * old.sum(1)

    model = Both()
    compiled = qcc.compile(copy.deepcopy(model), (torch.randn(1, 1, 6), torch.tensor([0])), target="cpu")
    for t in range(3):
        x, pos = torch.randn(1, 1, 6), torch.tensor([t])
        expect = model(x, pos)
        assert rel_err(compiled(x, pos).numpy(), expect.numpy()) <= 1e-6
    np.testing.assert_array_equal(compiled.state["cache"], model.cache.numpy())
    assert not any(o.get("in_place") for o in compiled.manifest["outputs"])


@pytest.mark.parametrize("heads", [1, 4])
def test_sdpa_over_a_cache_written_by_index_copy(heads):
    """A static KV cache's decode step: the new key / value written at `pos` (index_copy, a
    scatter), then SDPA over the whole cache, whose k^T scale the kernel applies as it reads the
    cache (one part).  Failed in bufferization before (an allocation of a strided buffer type
    for the scatter's copy)."""

    class Step(torch.nn.Module):
        def forward(self, q, k, v, pos, kc, vc):
            kc, vc = kc.index_copy(2, pos, k), vc.index_copy(2, pos, v)
            return torch.nn.functional.scaled_dot_product_attention(q, kc, vc), kc, vc

    g = torch.Generator().manual_seed(heads)
    args = tuple(torch.randn(*s, generator=g) for s in ((1, heads, 1, 32),) * 3) + (torch.tensor([5]),) + tuple(
        torch.randn(1, heads, 24, 32, generator=g) for _ in range(2))
    compiled = qcc.compile(Step(), args, target="cpu")
    with torch.no_grad():
        expect = [t.double().numpy() for t in Step()(*(a.double() if a.is_floating_point() else a for a in args))]
    for got, e in zip(compiled(*args), expect):
        assert rel_err(got.numpy(), e) <= 1e-5


def test_bfloat16_models():
    """Checkpoints ship in bf16.  An nn.Module in bf16 compiles as its float32 copy (exact for
    the weights; the user's module stays bf16) with a remark; an ExportedProgram holding bf16
    parameters is a clear error saying what to do."""
    model = models.MLP(in_features=64, seed=5).eval().to(torch.bfloat16)
    x = torch.randn(3, 64)
    compiled = qcc.compile(model, (x.bfloat16(),), target="cpu", quant="w8a16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert compiled.remarks[0].startswith("the model's bfloat16 parameters and buffers")
    assert compiled.inputs[0]["dtype"] == "float32"
    reference = copy.deepcopy(model).float()
    load_into_torch(reference, dequantized_weights(compiled))
    assert rel_err(compiled(x).numpy(), float64_out(reference, (x,))) <= 1e-4
    with pytest.raises(qcc.QccError, match="is bfloat16.*model.float()"):
        qcc.compile(torch.export.export(model, (x.bfloat16(),)), target="cpu")


class _Experts(torch.nn.Module):
    """A mixture of experts as transformers' batched_mm writes it: a router's top 2 of 4 experts
    per token, each token's expert weights gathered from a 3-D parameter, then bmm."""

    def __init__(self, e=4, n=96, k=128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.experts = torch.nn.Parameter(torch.randn(e, n, k, generator=g) / k ** 0.5)
        self.router = torch.nn.Linear(k, e)

    def forward(self, x):
        top = torch.topk(self.router(x), 2, dim=-1)
        rows = x.unsqueeze(1).expand(-1, 2, -1).reshape(-1, x.shape[-1])
        y = torch.bmm(self.experts[top.indices.reshape(-1)], rows.unsqueeze(-1)).squeeze(-1)
        return (y.reshape(x.shape[0], 2, -1) * top.values.softmax(-1).unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16-g128"])
def test_mixture_of_experts_weights_are_quantized(recipe):
    """The experts' 3-D weight is quantized (E * N rows of the format) and only the tokens'
    experts are decoded; the output equals float64 on the decoded weights."""
    torch.manual_seed(1)
    model = _Experts().eval()
    x = torch.randn(5, 128)
    compiled = qcc.compile(model, (x,), target="cpu", quant=recipe)
    layers = {layer["weight"]: layer for layer in compiled.manifest["layers"]}
    assert layers["experts"]["experts"] == 4 and layers["experts"]["shape"] == [4 * 96, 128]
    assert compiled.remarks == []
    # each token's product runs on its expert's panels (cpu-select-expert-kernels)
    assert compiled.manifest["cpu"]["kernels"]["experts"]["variant"] == "gathered gemv"
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    expect = float64_out(reference, (x,))
    assert rel_err(compiled(x).numpy(), expect) <= 1e-4
    assert rel_err(float64_out(model, (x,)), expect) > 1e-4


def test_mixture_of_experts_gptq_per_expert():
    """gptq rounds each expert on the Hessian of the calibration rows routed to it: lower
    output error on those rows than round-to-nearest, expert by expert; an expert no row
    chose is rounded to nearest, with a remark naming it."""
    torch.manual_seed(3)
    model = _Experts().eval()
    g = torch.Generator().manual_seed(4)
    scales = torch.exp(torch.randn(128, generator=g))  # correlated, unevenly scaled inputs
    calib = [(torch.randn(64, 128, generator=g) @ torch.randn(128, 128, generator=g) * scales / 10,) for _ in range(4)]
    rows = torch.cat([c[0] for c in calib])
    with torch.no_grad():
        chosen = torch.topk(model.router(rows), 2, dim=-1).indices
    w = model.experts.detach().double().numpy()

    def errors(recipe):
        compiled = qcc.compile(model, calib[0], target="cpu", quant=recipe, calibration=calib)
        q = dequantized_weights(compiled)["experts"].astype(np.float64)
        out = []
        for e in range(4):
            xe = rows[(chosen == e).any(-1)].double().numpy()
            out.append(np.linalg.norm(xe @ (w[e] - q[e]).T) / np.linalg.norm(xe @ w[e].T))
        return compiled, np.array(out)

    compiled, gptq = errors("w4a16-g128-gptq")
    _, rtn = errors("w4a16-g128")
    assert not any("experts" in r for r in compiled.remarks)
    assert (gptq < 0.8 * rtn).all(), (gptq, rtn)
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    assert rel_err(compiled(calib[1][0]).numpy(), float64_out(reference, calib[1])) <= 1e-4
    with torch.no_grad():
        model.router.bias.copy_(torch.tensor([20.0, 20.0, -20.0, -20.0]))  # experts 2 and 3 never chosen
    compiled = qcc.compile(model, calib[0], target="cpu", quant="w4a16-g128-gptq", calibration=calib)
    assert "gptq: experts no calibration row chose, rounded to nearest: experts[2], experts[3]" in compiled.remarks


def test_mixture_of_experts_any_token_count():
    """The gathered kernel over a run-time number of tokens (rows = tokens x 2 experts), the
    same expert for several rows and experts no token picks; equal to the reference lowering
    (the dequantized gather, then the batched matmul) to float rounding."""
    torch.manual_seed(2)
    model = _Experts(e=8, n=200, k=384).eval()
    x = torch.randn(7, 384)
    tokens = torch.export.Dim("tokens", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: tokens},))
    compiled = qcc.compile(program, target="cpu", quant="w4a16-g128")
    assert compiled.manifest["cpu"]["kernels"]["experts"]["experts"] == 8
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    for rows in (1, 3, 16):
        xr = torch.randn(rows, 384)
        assert rel_err(compiled(xr).numpy(), float64_out(reference, (xr,))) <= 1e-5


class _ExpertsByIds(torch.nn.Module):
    """The experts' gathered product with the ids an input (as a router's top-k gives them)."""

    def __init__(self, e=4, n=96, k=128):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(e, n, k, generator=torch.Generator().manual_seed(3)) / k ** 0.5)

    def forward(self, x, ids):
        return torch.bmm(self.w[ids], x.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("recipe,variant", [("w8a16", "gathered gemv"), ("float", "gathered f32 gemv")])
def test_mixture_of_experts_negative_ids_count_from_the_end(recipe, variant):
    """ids -1 and -4 of 4 experts pick experts 3 and 0, as torch indexes; the float form runs
    the f32 gathered GEMV on the weights as stored."""
    model = _ExpertsByIds().eval()
    x, ids = torch.randn(5, 128), torch.tensor([-1, 2, -4, 0, 3])
    compiled = qcc.compile(model, (x, ids), target="cpu", quant=recipe)
    assert compiled.manifest["cpu"]["kernels"]["w"]["variant"] == variant
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    assert rel_err(compiled(x, ids).numpy(), float64_out(reference, (x, ids))) <= 1e-5
    assert "w" not in compiled.weights or compiled.weights["w"].shape == (4, 96, 128)  # float: W as it was


def test_mixture_of_experts_float_any_token_count():
    """The float experts over a run-time number of tokens: the f32 gathered GEMV, equal to
    float64 (odd N: 2 output columns a work item)."""
    torch.manual_seed(4)
    model = _Experts(e=8, n=102, k=256).eval()
    tokens = torch.export.Dim("tokens", min=1, max=64)
    program = torch.export.export(model, (torch.randn(7, 256),), dynamic_shapes=({0: tokens},))
    compiled = qcc.compile(program, target="cpu")
    assert compiled.manifest["cpu"]["kernels"]["experts"]["variant"] == "gathered f32 gemv"
    for rows in (1, 5, 16):
        xr = torch.randn(rows, 256)
        assert rel_err(compiled(xr).numpy(), float64_out(model, (xr,))) <= 1e-5


class _Scatters(torch.nn.Module):
    """scatter / scatter_add as routers and samplers write them (torch-mlir's own scatter
    lowering crashed the compiler process)."""

    def __init__(self, kind, dim=-1):
        super().__init__()
        self.kind, self.dim = kind, dim

    def forward(self, x, src, index):
        if self.kind == "topk":  # Phi-MoE's router: mask the top entry, then take the next
            top = torch.topk(x, 2, self.dim).indices
            return x.scatter(self.dim, top, src) + x.scatter(self.dim, top[..., :1], float("-inf")).amax(self.dim, True)
        if self.kind == "add":  # duplicate indices add up
            return x.scatter_add(self.dim, index, src)
        return x.scatter(self.dim, index, src)


@pytest.mark.parametrize("kind,dim", [("topk", -1), ("add", -1), ("add", 0), ("src", 0)])
def test_scatter(kind, dim):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 9, generator=g)
    if dim == 0:
        index = torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(9)], 1)  # [4, 9], distinct per column
        if kind == "add":
            index = torch.randint(0, 6, (10, 9), generator=g)  # duplicates
    else:
        index = torch.randint(0, 9, (6, 12), generator=g)  # duplicates along the row
    src = torch.randn(*(index.shape if kind != "topk" else (6, 2)), generator=g)
    model = _Scatters(kind, dim).eval()
    compiled = qcc.compile(model, (x, src, index), target="cpu")
    np.testing.assert_allclose(compiled(x, src, index).numpy(), model(x, src, index).numpy(), rtol=1e-6, atol=1e-6)


def test_scatter_with_a_partial_index_is_a_clear_error():
    class Partial(torch.nn.Module):
        def forward(self, x, index):
            return x.scatter(1, index, 1.0)

    with pytest.raises(qcc.QccError, match="index is smaller in dim 0"):
        qcc.compile(Partial(), (torch.randn(6, 9), torch.zeros(3, 2, dtype=torch.long)), target="cpu")


def test_unsorted_topk():
    """topk(sorted=False) (GLM-4 MoE's group choice) runs as the sorted topk: a valid order of
    the same k entries."""

    class Unsorted(torch.nn.Module):
        def forward(self, x):
            values, indices = torch.topk(x, 3, dim=-1, sorted=False)
            return values.sum(-1), torch.zeros_like(x).scatter(-1, indices, 1.0)

    x = torch.randn(5, 8)
    compiled = qcc.compile(Unsorted(), (x,), target="cpu")
    got, want = compiled(x), Unsorted()(x)
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())  # the same k positions


class _Histc(torch.nn.Module):
    def __init__(self, bins, lo, hi):
        super().__init__()
        self.bins, self.lo, self.hi = bins, lo, hi

    def forward(self, x):
        return torch.histc(x, self.bins, self.lo, self.hi)


@pytest.mark.parametrize("bins,lo,hi,kind", [(7, -1.0, 1.5, "randn"), (5, 0, 0, "randn"), (4, 0, 3, "ids"),
                                             (3, 0, 0, "constant")])
def test_histc(bins, lo, hi, kind):
    """histc (grouped_mm experts count their tokens with it; torch-mlir has no lowering): the
    same counts as torch, elements outside the range dropped, lo == hi the data's range."""
    g = torch.Generator().manual_seed(11)
    x = {"randn": torch.randn(6, 50, generator=g), "ids": torch.randint(0, 4, (37,), generator=g).float(),
         "constant": torch.full((9,), 2.5)}[kind]
    model = _Histc(bins, lo, hi).eval()
    compiled = qcc.compile(model, (x,), target="cpu")
    np.testing.assert_array_equal(compiled(x).numpy(), model(x).numpy())


@pytest.mark.parametrize("offsets", [[3, 3, 9, 12], [0, 5, 7, 9]])
def test_grouped_mm_as_gathers(offsets):
    """The frontend's grouped product: rows [offs[g-1], offs[g]) times w[g]; an empty group and
    rows past the last offset (left 0, as transformers' fallback leaves them)."""
    from qcc.frontend import _grouped_mm_as_gathers

    g = torch.Generator().manual_seed(12)
    x, w = torch.randn(12, 16, generator=g), torch.randn(4, 16, 8, generator=g)
    offs = torch.tensor(offsets, dtype=torch.int32)
    want, start = torch.zeros(12, 8, dtype=torch.float64), 0
    for e, end in enumerate(offsets):
        want[start:end] = x[start:end].double() @ w[e].double()
        start = end
    got = _grouped_mm_as_gathers(x, w, offs)
    assert rel_err(got.double().numpy(), want.numpy()) <= 1e-6 and not got[offsets[-1]:].any()
    with pytest.raises(qcc.QccError, match="without offsets"):
        _grouped_mm_as_gathers(x, w)


def test_bool_buffer_survives_save_and_load(tmp_path):
    """A bool buffer (GPT-BigCode's causal mask) is a parameter like any other: stored as
    bytes in the artifact, read back by the loaded model."""

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("causal", torch.tril(torch.ones(8, 8, dtype=torch.bool)))
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            s = self.fc(x)
            return s.masked_fill(~self.causal[: x.shape[-2], : x.shape[-2]], float("-inf")).softmax(-1)

    torch.manual_seed(0)
    model, x = Masked().eval(), torch.randn(2, 8, 8)
    compiled = qcc.compile(model, (x,), target="cpu")
    assert compiled.weights["causal"].dtype == np.bool_
    compiled.save(tmp_path / "m.qcc")
    assert rel_err(qcc.load(tmp_path / "m.qcc")(x).numpy(), float64_out(model, (x,))) <= 1e-5


class _ComplexRope(torch.nn.Module):
    """Meta's Llama rotary embedding: x's pairs as complex numbers times polar(1, angles)."""

    def __init__(self, other=False):
        super().__init__()
        self.other = other

    def forward(self, x, angles):
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # heads broadcast
        if self.other:
            return torch.view_as_real(torch.exp(z * rot)).flatten(-2)
        return torch.view_as_real(z * rot * 0.5 + z).flatten(-2)


def test_complex_rotary_embedding():
    """Complex tensors become real ones with a trailing (re, im) pair: polar, view_as_complex,
    products with complex and real operands, a sum, slices and views; an op without a pair
    form (exp of a complex) is a clear error at its source line."""
    g = torch.Generator().manual_seed(13)
    inputs = (torch.randn(5, 3, 8, generator=g), torch.randn(5, 4, generator=g) * 3)
    compiled = qcc.compile(_ComplexRope().eval(), inputs, target="cpu")
    want = _ComplexRope()(*(a.double() for a in inputs)).numpy()
    assert rel_err(compiled(*inputs).numpy(), want) <= 1e-6
    with pytest.raises(qcc.QccError, match=r"test_e2e.py:\d+: error: complex tensors are not supported"):
        qcc.compile(_ComplexRope(other=True), inputs, target="cpu")


class _WeightBatches(torch.nn.Module):
    """Every token through every expert as one batched product per weight (Llama 4's experts):
    `up` stored [E, K, N] and multiplied as is, `down` stored [E, N, K] and transposed."""

    def __init__(self, e=3, k=128, n=256):
        super().__init__()
        g = torch.Generator().manual_seed(14)
        self.up = torch.nn.Parameter(torch.randn(e, k, n, generator=g) / k ** 0.5)
        self.down = torch.nn.Parameter(torch.randn(e, k, n, generator=g) / n ** 0.5)

    def forward(self, x):  # x [E, T, K]: each expert's tokens
        return torch.bmm(torch.nn.functional.silu(torch.bmm(x, self.up)), self.down.transpose(1, 2))


def test_weight_batches_quantized_as_gathered_experts():
    """A batched product with a 3-D weight quantizes along K (the [E, K, N] one stored [E, N, K],
    reported `transposed`) and runs on the gathered GEMV, for any token count."""
    model = _WeightBatches().eval()
    x = torch.randn(3, 4, 128)
    compiled = qcc.compile(model, (x,), target="cpu", quant="w4a16-g128",
                           dynamic_shapes=({1: torch.export.Dim("tokens", min=1, max=64)},))
    layers = {layer["weight"]: layer for layer in compiled.manifest["layers"]}
    assert layers["up"]["shape"] == [3 * 256, 128] and layers["up"].get("transposed")
    assert layers["down"]["shape"] == [3 * 128, 256] and not layers["down"].get("transposed")
    assert all(compiled.manifest["cpu"]["kernels"][w]["variant"] == "gathered gemv" for w in layers)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, value in dequantized_weights(compiled).items():
            getattr(reference, name).copy_(torch.from_numpy(value))
    for t in (1, 4, 9):
        xt = torch.randn(3, t, 128)
        with torch.no_grad():
            want = reference(xt.double()).numpy()
        assert rel_err(compiled(xt).numpy(), want) <= 1e-5, t


class _Scans(torch.nn.Module):
    """cumsum as transformers' masks take it (bool -> int64 over positions) and as samplers do
    (float probabilities), along the last dim and dim 0; topk both ways."""

    def forward(self, mask, p):
        top = torch.topk(p, 3, dim=-1)
        low = torch.topk(p, 2, dim=0, largest=False)
        return (mask.cumsum(-1), p.cumsum(0), torch.cumsum(p, -1, dtype=torch.float64), top.values, top.indices,
                low.values, low.indices)


def test_cumsum_and_topk_decompositions():
    """cumsum by log-step shifted adds, topk by rounds of selection (every target lowers
    them): torch's results; among ties any distinct indices (torch leaves their order open),
    NaN and -inf as torch ranks them."""
    g = torch.Generator().manual_seed(16)
    mask = torch.rand(3, 13, generator=g) > 0.4
    p = torch.rand(5, 9, generator=g)
    p[1, 2] = p[1, 5] = p[1, 7] = 0.99  # ties
    p[2, :] = float("-inf")
    p[3, 4] = float("nan")
    model = _Scans().eval()
    compiled = qcc.compile(model, (mask, p), target="cpu")
    got, want = compiled(mask, p), model(mask, p)
    for i in (0, 1, 2, 3, 5):  # the scans and the top-k values
        assert got[i].dtype == want[i].dtype
        np.testing.assert_allclose(got[i].numpy(), want[i].numpy(), rtol=1e-6)
    for values, indices, dim in ((got[3], got[4], -1), (got[5], got[6], 0)):
        np.testing.assert_array_equal(p.gather(dim, indices).numpy(), values.numpy())
        assert all(len(set(row.tolist())) == len(row) for row in indices.movedim(dim, -1))


def test_cumsum_over_a_run_time_length():
    class Positions(torch.nn.Module):
        def forward(self, mask):
            return mask.cumsum(-1) - 1

    seq = torch.export.Dim("seq", min=2, max=40)
    program = torch.export.export(Positions(), (torch.ones(1, 8, dtype=torch.long),), dynamic_shapes=({1: seq},))
    compiled = qcc.compile(program, target="cpu")
    for n in (3, 33):
        mask = (torch.rand(1, n, generator=torch.Generator().manual_seed(n)) > 0.3).long()
        np.testing.assert_array_equal(compiled(mask).numpy(), Positions()(mask).numpy())


class _ResBlock(torch.nn.Module):
    """A ResNet-style block: a strided 3x3, a dilated 3x3, BatchNorm, a strided 1x1 shortcut,
    then a depthwise 3x3 (groups = channels: left a convolution, its weight decoded)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(64)
        self.c2 = torch.nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False)
        self.b2 = torch.nn.BatchNorm2d(64)
        self.down = torch.nn.Conv2d(32, 64, 1, stride=2, bias=False)
        self.dw = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
        with torch.no_grad():
            for b in (self.b1, self.b2):
                b.running_mean.normal_()
                b.running_var.uniform_(0.5, 1.5)
                b.weight.normal_(1, 0.1)
                b.bias.normal_()

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y)) + self.down(x)
        return self.dw(torch.relu(y)).mean((2, 3))


@pytest.mark.parametrize("recipe,dw_quantized", [("w8a16", True), ("w8a16-g32", False)])
def test_resnet_style_block(recipe, dw_quantized):
    """Strides, dilation and a 1x1 shortcut as linear layers over patches; the depthwise
    convolution quantized per output channel, or left float (rows of 9 under groups of 32,
    remarked); equal to float64 on the decoded weights."""
    torch.manual_seed(0)
    model = _ResBlock().eval()
    x = torch.randn(2, 32, 20, 20)
    compiled = qcc.compile(model, (x,), target="cpu", quant=recipe)
    layers = {layer["weight"]: layer.get("conv_layout") for layer in compiled.manifest["layers"]}
    assert {w: layers[w] for w in ("c1.weight", "c2.weight", "down.weight")} == dict.fromkeys(
        ("c1.weight", "c2.weight", "down.weight"), "ohwi")
    assert ("dw.weight" in layers) == dw_quantized and (compiled.remarks == []) == dw_quantized
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    expect = float64_out(reference, (x,))
    assert rel_err(compiled(x).numpy(), expect) <= 1e-5
    assert rel_err(float64_out(model, (x,)), expect) > 1e-5


def test_patch_embedding_with_one_padding_value():
    """padding="valid" (SigLIP's patch embedding) reaches the graph as one value for both
    spatial dims: still a linear layer over patches (it raised an IndexError)."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 32, 4, stride=4, padding="valid").eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = qcc.compile(model, (x,), target="cpu", quant="w8a16")
    assert compiled.manifest["layers"][0]["conv_layout"] == "ohwi"
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    assert rel_err(compiled(x).numpy(), float64_out(reference, (x,))) <= 1e-5


def test_convolutions_with_a_run_time_batch():
    """The batch a run-time size: the convolutions are still linear layers over their patches
    (the rows read from x), their weights decoded once a call for the f32 GEMM."""
    torch.manual_seed(0)
    model = _ResBlock().eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (torch.randn(2, 32, 20, 20),), dynamic_shapes=({0: batch},))
    compiled = qcc.compile(program, target="cpu", quant="w8a16")
    kernels = compiled.manifest["cpu"]["kernels"]
    assert all(kernels[w]["variant"] == "dequantized gemm" for w in ("c1.weight", "c2.weight", "down.weight"))
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    for n in (1, 3):
        x = torch.randn(n, 32, 20, 20)
        assert rel_err(compiled(x).numpy(), float64_out(reference, (x,))) <= 1e-5
