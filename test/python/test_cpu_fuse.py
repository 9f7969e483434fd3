"""The CPU's fuse stage (lowering.fuse_stage: elementwise fusion, then
cpu-reassociate-reductions) keeps the float function: an RMSNorm -> linear ->
softmax block, compiled with and without it, against PyTorch in float64."""

import glob
import os

import numpy as np
import torch

import qcc


class NormSoftmax(torch.nn.Module):
    def __init__(self, d: int = 384, n: int = 200):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.scale = torch.nn.Parameter(1.0 + 0.1 * torch.randn(d, generator=g))
        self.proj = torch.nn.Linear(d, n, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(n, d, generator=g) / d ** 0.5)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.scale
        return torch.softmax(self.proj(h) * 3.0, dim=-1), h.sum(-1)


def _compile(model, x, tmp_path, name, monkeypatch, on: bool):
    for var in ("QCC_CPU_FUSE_ELEMENTWISE", "QCC_CPU_REASSOCIATE"):
        monkeypatch.setenv(var, "1" if on else "0")
    dump = str(tmp_path / name)
    return qcc.compile(model, (x,), quant="float", dump_dir=dump), dump


def test_fuse_stage_keeps_the_float_function(tmp_path, monkeypatch):
    model = NormSoftmax().eval()
    x = torch.randn(3, 37, 384, generator=torch.Generator().manual_seed(1)) * 2.0
    with torch.no_grad():
        want = [t.numpy() for t in model.double()(x.double())]
    model.float()
    fused, dump = _compile(model, x, tmp_path, "on", monkeypatch, on=True)
    plain, plain_dump = _compile(model, x, tmp_path, "off", monkeypatch, on=False)
    for compiled in (fused, plain):
        for got, ref in zip(compiled.run(x.numpy()), want):
            assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5

    def stage(d, name):
        (path,) = glob.glob(os.path.join(d, f"*-{name}.mlir"))
        return open(path).read()

    # the rewrite happened: fewer generics, the argmax indices of softmax's max gone, the
    # sums (mean of squares, softmax's sum, h.sum) marked for reassociation
    before, after = stage(dump, "lower-qcc"), stage(dump, "fuse")
    assert after.count("linalg.generic") < before.count("linalg.generic")
    assert "linalg.index" in before and "linalg.index" not in after
    assert after.count("fastmath<reassoc>") >= 3
    assert "fastmath" not in stage(plain_dump, "fuse")
