"""The compile pipeline, as data: named stages, each a list of pipeline elements.

qcc passes and upstream passes sit side by side; `qcc-opt -p` takes the same
element syntax, so any stage can be replayed on a dumped module.
"""

# torch.export graph -> torch backend dialect (value semantics, decomposed ops).
IMPORT = [
    "func.func(torch-match-quantized-custom-ops)",
    "torchdynamo-export-to-torch-backend-pipeline",
]

# torch dialect -> linalg on tensors.  This is torch-mlir's
# torch-backend-to-linalg-on-tensors-backend-pipeline minus its final contract
# check, which rejects the qcc ops that ride through it untouched; qcc runs its
# own check (check-lowered) that also names the offending torch op.
TORCH_TO_LINALG = [
    "func.func(convert-torch-to-tmtensor)",
    "func.func(convert-torch-to-linalg)",
    "fix-gelu-tanh",  # torch-mlir's tanh GELU uses 0.797724 for sqrt(2/pi)
    "func.func(convert-torch-to-scf)",
    "func.func(convert-torch-to-arith)",
    "func.func(convert-torch-to-tensor)",
    "convert-torch-conversion-to-mlprogram",
    "func.func(memref-expand)",
    "func.func(canonicalize)",
    "func.func(resolve-shaped-type-result-dims)",
    "func.func(cse)",
    "check-lowered",
    "torch-func-backend-type-conversion",
    "func.func(canonicalize)",
    "func.func(torch-finalizing-backend-type-conversion)",
]

# qcc ops -> linalg (the reference lowering, dequantization fused into the matmul).
# No CSE after inlining the CPU kernels' wrappers: each begins with
# `bufferization.to_buffer %x read_only`, which one-shot bufferization takes as the
# moment x is read; CSE would merge two kernels' to_buffer of one x into the first,
# hiding the second kernel's later reads, and an op between them could then be
# bufferized in place over x (it did: split-outliers' dynamic parts, q_proj's sum
# written over the k_proj kernel's input).
LOWER_QCC = [
    "lower-qcc-to-linalg",
    "inline",
    "canonicalize",
]


def recipe_stage(recipe) -> list[str]:
    """The quantization passes a recipe asks for, run on the torch dialect."""
    return list(recipe.passes)
