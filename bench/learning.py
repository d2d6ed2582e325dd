"""Learning bench: does each task x bottleneck learn on ARC-AGI-1 within a fixed CPU wall-clock budget?

Every run goes through the real train.Trainer: a TrainConfig, trainer.setup(), trainer.train() stopped by a
{"type": "stop"} command once the budget is spent, then trainer.test() on the TEST split (the dataset's
evaluation puzzles; for puzzle_classification, the puzzles' own test examples). Weights for the test: whichever of
best_model.pth (best epoch-end validation loss) and the final weights has the lower validation loss; the test split
is never used to choose anything.

Each row trains one of train.py's presets (train.PRESETS), by time here: `python train.py --preset selection` trains
the selection_3 row's config for the epochs that take about the same 200 s.

    python bench/learning.py                  # full run, about 90 minutes on 2 cores (bf16 rows included)
    python bench/learning.py --quick          # under a minute, tiny budgets, same table shape
    python bench/learning.py --rows selection_3 --seeds 1 --budget-seconds 60 --set learning_rate=0.003
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import catalogue  # noqa: E402
import checkpoint as ckpt  # noqa: E402
from data import Batches, baselines, load_data  # noqa: E402
from model import CELL_SIDE  # noqa: E402
from pattern_baselines import LINEAR_STEPS, QUICK_LINEAR_STEPS, pattern_baselines  # noqa: E402
from train import LOSSES, PRESETS, TrainConfig, Trainer  # noqa: E402

# Settings every row shares, over its preset's: CPU, no periodic checkpoints, and epochs that never end a run
# before its budget (a preset's own epochs are what the CLI trains for about the same time).
COMMON = dict(device="cpu", checkpoint_every_epochs=0, epochs=100_000)


@dataclass(frozen=True)
class Row:
    """One task x bottleneck: the preset (train.PRESETS) it measures and the targets it is held to."""
    preset: str
    targets: dict  # metric -> minimum on the test split
    seeds: int = 3  # seeds in the full run
    extras: tuple = field(default=())  # further measurements: "shuffle", "capacity"
    changes: tuple = field(default=())  # (field, value) pairs over the preset: a variant of its row

    @property
    def title(self):
        return PRESETS[self.preset].title

    @property
    def config(self):
        return {**PRESETS[self.preset].values, **dict(self.changes)}


ROWS = {
    "selection_3": Row("selection", {"acc": 0.95}, extras=("shuffle",)),
    "selection_15": Row("selection-15", {"acc": 0.85}),
    "reconstruction_autoencoder": Row("reconstruction", {"acc": 0.90, "size_acc": 0.95}, extras=("capacity",)),
    "reconstruction_communication": Row("reconstruction-message", {"acc": 0.75}, extras=("capacity",)),
    "puzzle_classification": Row("puzzles", {"acc": 0.50}, seeds=1),
    "puzzle_classification_pairs": Row("puzzle-pairs", {"acc": 0.50}, seeds=1),
}
# The same rows in bf16 mixed precision, held to the same targets: a faster step buys more steps in the budget.
BF16 = (("precision", "bf16-mixed"),)
ROWS.update({f"{name}_bf16": Row(ROWS[name].preset, ROWS[name].targets, changes=BF16)
             for name in ("selection_3", "selection_15", "reconstruction_autoencoder", "reconstruction_communication")})

QUICK_BUDGET_SECONDS = 3.0
QUICK_EVAL_UNITS = 48  # quick mode validates and tests on this many evenly spread units of each split
SHUFFLE_SLACK = 0.05  # "about chance": shuffled-message accuracy at most chance + this


# ---------------------------------------------------------------------------------------------- one run

def _subset(batches, limit):
    """The same split's Batches restricted to `limit` evenly spread units (quick mode only)."""
    if limit is None or len(batches.units) <= limit:
        return batches
    keep = batches.units[torch.linspace(0, len(batches.units) - 1, limit).long()]
    return Batches(batches.data, keep, batches.kind, batches.batch_size, batches.seed,
                   use_pairs=batches.examples.shape[1] == 2, num_distractors=batches.num_distractors,
                   shuffle=False, salt=batches.salt)


def train_for(config, data, budget_seconds, checkpoint_dir, eval_units=None):
    """Train through Trainer until the budget is spent; return the trainer with the val-chosen weights loaded."""
    started = None
    stop_sent = False

    def publish(event):
        nonlocal stop_sent
        if started is not None and not stop_sent and time.monotonic() - started >= budget_seconds:
            trainer.commands.put({"type": "stop"})
            stop_sent = True

    trainer = Trainer(config, data, config.device, checkpoint_dir, publish)
    trainer.setup()
    trainer.val_batches = _subset(trainer.val_batches, eval_units)
    trainer.test_batches = _subset(trainer.test_batches, eval_units)
    started = time.monotonic()
    trainer.train()
    trainer.train_seconds = time.monotonic() - started
    loss_fn = LOSSES[config.task_type]
    final_val = trainer.evaluate(trainer.model, trainer.val_batches, loss_fn)[0]
    best_path = os.path.join(catalogue.checkpoint_folder(checkpoint_dir, trainer.run_id), "best_model.pth")
    trainer.weights, trainer.chosen_val = "final", final_val
    if os.path.exists(best_path) and trainer.best_val_loss < final_val["loss"]:
        record = ckpt.load_checkpoint(best_path)
        trainer.model.load_state_dict(record["model_state_dict"])
        trainer.weights = f"best@{record['global_step']}"
        trainer.chosen_val = trainer.evaluate(trainer.model, trainer.val_batches, loss_fn)[0]
    return trainer


@torch.no_grad()
def shuffled_message_accuracy(trainer, seed):
    """Test accuracy with every receiver reading another example's message, and with its own (a check).

    Calls the model's parts exactly as ARCAutoencoder.forward does for selection, in eval mode.
    """
    model, batches = trainer.model, trainer.test_batches
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    own = shuffled = total = 0
    for i in range(len(batches)):
        batch = batches.batch(0, i)
        candidates, target = batch["candidates"], batch["target_index"]  # (B, K+1, G, 30, 30), (B,)
        b, k = candidates.shape[:2]
        if b < 2:
            continue  # nobody else's message to read
        latents = model.example_encoder(candidates.flatten(0, 1)).view(b, k, -1)
        symbols, _ = model.sender(latents[torch.arange(b), target], model.temperature)  # (B, L, V)
        keys = model.candidate_projection(latents)  # (B, K+1, hidden)
        # A random derangement: walking a random order, each example reads the next one's message.
        order = torch.randperm(b, generator=gen)
        donor = torch.empty(b, dtype=torch.long)
        donor[order] = order.roll(-1)
        for count, messages in ((0, symbols), (1, symbols[donor])):
            scores = model.scores(model.receiver(messages), keys)
            right = (scores.argmax(1) == target).sum().item()
            if count == 0:
                own += right
            else:
                shuffled += right
        total += b
    model.train()
    return own / total, shuffled / total


def bottleneck_capacity(config):
    """What crosses the bottleneck per example: '<bits>-bit msg' or '<floats>-float latent', cell code included."""
    grids = 2 if config.use_input_output_pairs else 1
    cells = grids * config.cell_channels * CELL_SIDE ** 2 if config.task_type == "reconstruction" else 0
    if config.bottleneck_type == "communication":
        return f"{(config.max_message_length + cells) * math.log2(config.vocab_size):,.1f}-bit msg"
    return f"{config.latent_dim + cells:,}-float latent"


def config_of(row, overrides, seed):
    """The TrainConfig one seed of a row trains with: its preset's values under COMMON, then --set's."""
    return TrainConfig.from_dict({**row.config, **COMMON, **overrides, "seed": seed})


def run_once(row, overrides, seed, data, budget_seconds, eval_units):
    """One seed of one row -> a dict of figures."""
    config = config_of(row, overrides, seed)
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as folder:
        config = config.replace(checkpoint_dir=folder)
        trainer = train_for(config, data, budget_seconds, folder, eval_units)
    test = trainer.test()
    result = {f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))}
    result.update({f"val_{k}": v for k, v in trainer.chosen_val.items() if isinstance(v, (int, float))})
    result.update(steps=trainer.global_step, epochs=trainer.epoch + trainer.batch / len(trainer.train_batches),
                  seconds=trainer.train_seconds, weights=trainer.weights)
    chance = baselines(trainer.train_batches, trainer.test_batches)
    result["baseline"] = chance["acc"][1]
    if "size_acc" in chance:
        result["size_baseline"] = chance["size_acc"][1]
    if config.task_type == "puzzle_classification":
        steps = LINEAR_STEPS if eval_units is None else QUICK_LINEAR_STEPS
        result["patterns"] = pattern_baselines(trainer.train_batches, {"test": trainer.test_batches},
                                               trainer.num_classes, config.pattern_kinds, steps)["test"]
    if "shuffle" in row.extras:
        own, result["test_shuffled_acc"] = shuffled_message_accuracy(trainer, seed)
        assert abs(own - test["acc"]) < 1e-9, \
            f"the shuffle control's forward ({own}) disagrees with trainer.test() ({test['acc']}): re-sync it"
    result["capacity"] = bottleneck_capacity(config)
    result["config"] = config
    return result


# ---------------------------------------------------------------------------------------------- the table

def spread(values):
    """'mean ± sd' over seeds, or the single value."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def row_lines(name, row, results):
    """Table lines of one row: (row, metric, result, baseline, target, verdict)."""
    def mean(key):
        return statistics.mean(r[key] for r in results)

    def check(metric, target):
        return f">= {target:.2f}", "MET" if mean(f"test_{metric}") >= target else "NOT MET"

    task = results[0]["config"].task_type
    lines = []
    if task == "selection":
        lines.append((name, "test acc", spread(r["test_acc"] for r in results),
                      f"chance {mean('baseline'):.4f}", *check("acc", row.targets["acc"])))
        if "shuffle" in row.extras:
            ceiling = mean("baseline") + SHUFFLE_SLACK
            ok = mean("test_shuffled_acc") <= ceiling
            lines.append((name, "test acc, msgs shuffled", spread(r["test_shuffled_acc"] for r in results),
                          f"chance {mean('baseline'):.4f}", f"<= {ceiling:.2f}", "MET" if ok else "NOT MET"))
    elif task == "reconstruction":
        capacity = f" ({results[0]['capacity']})" if "capacity" in row.extras else ""
        lines.append((name, "test pixel acc" + capacity, spread(r["test_acc"] for r in results),
                      f"majority {mean('baseline'):.3f}", *check("acc", row.targets["acc"])))
        size_target = row.targets.get("size_acc")
        lines.append((name, "test size acc", spread(r["test_size_acc"] for r in results),
                      f"common {mean('size_baseline'):.3f}",
                      *(check("size_acc", size_target) if size_target else ("-", "-"))))
        lines.append((name, "test exact grids", spread(r["test_exact_acc"] for r in results), "-", "-", "-"))
    else:
        lines.append((name, "test top-1 (puzzles' test ex.)", spread(r["test_acc"] for r in results),
                      f"chance {mean('baseline'):.4f}", *check("acc", row.targets["acc"])))
        lines.append((name, "val top-1", spread(r["val_acc"] for r in results),
                      f"chance {mean('baseline'):.4f}", "-", "-"))
        for reader in ("nearest", "linear"):
            lines.append((name, f"test top-1, {reader} on pattern bags", spread(r["patterns"][reader] for r in results),
                          "no network", "-", "-"))
    changes = "".join(f" with {k}={v}" for k, v in row.changes)
    runs = (f"preset {row.preset}{changes}, {len(results)} seed(s), {round(statistics.mean(r['steps'] for r in results))} steps, "
            f"{mean('epochs'):.1f} ep, {mean('seconds'):.0f}s, weights {'/'.join(r['weights'] for r in results)}")
    lines.append((name, "runs", runs, "", "", ""))
    return lines


def print_table(lines):
    header = ("row", "metric", "result (mean ± sd)", "baseline", "target", "verdict")
    widths = [max(len(str(line[i])) for line in [header] + lines if line[1] != "runs" or i < 2)
              for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        if line[1] == "runs":
            print(" " * (widths[0] + 2) + "runs: " + line[2])
        else:
            print(fmt.format(*line))


def parse_overrides(pairs):
    """KEY=VALUE strings -> typed TrainConfig values (ValueError names the field)."""
    types = {f: t.type for f, t in TrainConfig.__dataclass_fields__.items()}
    out = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in types:
            raise ValueError(f"--set: unknown config field {key!r}")
        kind = types[key]
        out[key] = text.lower() in ("1", "true", "yes") if kind is bool else kind(text)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets and evaluation subsets (< 1 minute)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per row (default: each row's own, 3 for selection/reconstruction; 1 in --quick)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="training wall-clock per run (default 200, --quick 3)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig changes for every row")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    budget = args.budget_seconds or (QUICK_BUDGET_SECONDS if args.quick else 200.0)
    eval_units = QUICK_EVAL_UNITS if args.quick else None
    overrides = parse_overrides(args.set)
    began = time.monotonic()
    data = load_data("arcagi")
    lines = []
    for name in args.rows:
        row = ROWS[name]
        seeds = args.seeds or (1 if args.quick else row.seeds)
        results = []
        for seed in range(seeds):
            results.append(run_once(row, overrides, seed, data, budget, eval_units))
            r = results[-1]
            shown = {k: v for k, v in r.items() if isinstance(v, float) and k.startswith(("test_", "val_"))}
            print(f"# {name} seed {seed}: {r['steps']} steps {r['seconds']:.0f}s weights {r['weights']} " +
                  " ".join(f"{k}={v:.4f}" for k, v in shown.items()), file=sys.stderr, flush=True)
        lines += row_lines(name, row, results)
    print(f"ARC-AGI-1, {budget:.0f}s training per run, test = evaluation puzzles"
          f"{' (quick: val/test on %d units)' % eval_units if eval_units else ''}; "
          f"overrides {overrides or 'none'}")
    print_table(lines)
    print(f"total {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
