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


# torch.compile's backend: inductor generates C++ (CPU) or Triton (CUDA) kernels.
BACKEND = "inductor"

# What a failing backend raises: dynamo wraps the compiler's own error (a missing C++ compiler is a
# BackendCompilerFailed around an InductorError or an OSError), and a backend that cannot start raises OSError.
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, OSError, RuntimeError)
# What a backend that fails inside a real step raises: only that, so that a training error is never taken for one.
STEP_COMPILE_ERRORS = (torch._dynamo.exc.BackendCompilerFailed,)


def compile_problem(device):
    """Why torch.compile cannot run on this device here, or None: a tiny function compiled and run once (a few
    seconds), so that a missing backend is found before training starts rather than inside its first step."""
    try:
        torch.compile(_probe, fullgraph=True, backend=BACKEND)(torch.ones(8, device=device))
    except COMPILE_ERRORS as e:
        return first_line(e)
    return None


def first_line(error):
    """A compile error's cause: the first line of what the backend raised (dynamo wraps it in a BackendCompilerFailed
    whose own first line names only the backend, and follows it with advice on verbose logs)."""
    inner = getattr(error, "inner_exception", None)
    text = str(error) if inner is None else f"{type(inner).__name__}: {inner}"
    lines = [line for line in text.splitlines() if line.strip()] or [type(error).__name__]
    return lines[0].strip()[:300]


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
            part.compile(backend=BACKEND)
    return None


def uncompile_model(model):
    """Undo compile_model in place: the model runs eager again (its backend failed inside a step)."""
    for module in model.modules():
        if isinstance(module, ARCEncoder):
            module.__dict__.pop("features", None)  # back to the class's own method
    for part, _ in model.shard_parts():
        part._compiled_call_impl = None  # what nn.Module.compile set; None is how nn.Module runs eager


def _compiled_features(features):
    """An ARCEncoder's features() compiled per crop side, the batch dimension dynamic from the first call: the
    buckets of every batch hold other numbers of grids."""
    compiled = torch.compile(features, backend=BACKEND)

    def compiled_features(grids, side=GRID_SIZE, keep_map=False):
        grids = grids[:, :side, :side]
        torch._dynamo.maybe_mark_dynamic(grids, 0)
        return compiled(grids, side, keep_map)

    return compiled_features
