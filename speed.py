"""How fast a training step runs: bf16 mixed precision (torch.autocast) and a compiled model (torch.compile).

Neither changes what is trained: the parameters and Adam's moments stay float32, a compiled model's state dict is
the eager model's (no `_orig_mod.` prefixes), and a checkpoint of either loads into the other.
"""
import contextlib

import torch

from model import GRID_SIZE, ARCEncoder, full_precision

PRECISIONS = ("32", "bf16-mixed")


def autocast(device, precision):
    """The context a forward pass runs in: bf16 autocast on the run's device for bf16-mixed, else nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def float32_outputs(out):
    """A forward pass's outputs with bf16 tensors back in float32: the losses' log-softmax and means over
    thousands of pixels lose digits in bf16's 8-bit mantissa, so they always run in float32."""
    return {k: full_precision(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _probe(x):
    return torch.nn.functional.gelu(x) * 2 + 1


# What a failing backend raises: dynamo wraps the compiler's own error (a missing C++ compiler is a
# BackendCompilerFailed around an InductorError or an OSError), and a backend that cannot start raises OSError.
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, OSError, RuntimeError)


def compile_problem(device):
    """Why torch.compile cannot run on this device here, or None: a tiny function compiled and run once (a few
    seconds), so that a missing backend is found before training starts rather than inside its first step."""
    try:
        torch.compile(_probe, fullgraph=True)(torch.ones(8, device=device))
    except COMPILE_ERRORS as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        return lines[0].strip()[:300]  # the cause; dynamo's advice on verbose logs follows it
    return None


# Entries dynamo keeps per compiled function before it gives up and runs it eager: the encoder's conv stack runs once
# per crop side (model.CROP_SIDES, 7) in training and again without grad in validation.
RECOMPILE_LIMIT = 32


def compile_model(model, device):
    """Compile the model in place; None, or why torch.compile cannot run here (the model then stays eager).

    What has fixed shapes is compiled whole: each of the model's parts besides the encoder (model.shard_parts()),
    through nn.Module.compile, so that its state dict keeps its keys (no `_orig_mod.` prefixes). The encoder
    splits every batch by the sizes of its grids (crop_buckets), a split dynamo would trace again for every new
    mix of sizes; so only its conv stack is compiled, once per crop side, with the batch dimension dynamic."""
    problem = compile_problem(device)
    if problem is not None:
        return problem
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for module in model.modules():
        if isinstance(module, ARCEncoder):
            module.features = _compiled_features(module.features)
    for part, _ in model.shard_parts():
        if not any(isinstance(m, ARCEncoder) for m in part.modules()):
            part.compile()
    return None


def _compiled_features(features):
    """An ARCEncoder's features() compiled per crop side, the batch dimension dynamic from the first call: the
    buckets of every batch hold other numbers of grids."""
    compiled = torch.compile(features)

    def compiled_features(grids, side=GRID_SIZE, keep_map=False):
        grids = grids[:, :side, :side]
        torch._dynamo.maybe_mark_dynamic(grids, 0)
        return compiled(grids, side, keep_map)

    return compiled_features
