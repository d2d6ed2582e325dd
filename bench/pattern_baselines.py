"""Puzzle classification without a network: how far local patterns and the grid's size go.

Each example becomes a bag of the patterns the encoder's pattern bag reads (model.PATTERN_KINDS): every k x k window
of its grid(s), the grid framed by a ring of padding so the edges count, a window read the same turned or flipped
(model.pattern_codes) and, for kind "shapes", whatever its colours, plus model.grid_tokens. Each family (a window
side, the grid tokens) is weighted sqrt count times idf (from the training split), unit length. Two readers of
those bags, both fitted on the training split only and scored on the test split:
- nearest neighbour: the puzzle of the most cosine-similar training example;
- linear: softmax regression on the bags plus one-hot height and width (full-batch Adam, fixed settings).

The learning bench prints them beside the model so its puzzle-classification figure has a non-trivial reference.

    python bench/pattern_baselines.py           # ARC-AGI-1, single grids and pairs, both kinds (about 6 minutes)
    python bench/pattern_baselines.py --quick   # 30 regression steps (under a minute)
"""
import argparse
import itertools
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import PAD, Batches, load_data, make_splits  # noqa: E402
from model import GRID_SIZE, PATTERN_KINDS, grid_tokens, pattern_codes  # noqa: E402

LINEAR_STEPS, LINEAR_LR = 300, 0.01
QUICK_LINEAR_STEPS = 30
CODES_AT_ONCE = 512  # grids whose windows are coded together: all of them at once would take gigabytes


def pattern_bags(examples, train_rows, kinds):
    """(U, G, 30, 30) examples -> sparse (U, F) bags of the pattern bag's kinds (model.PATTERN_KINDS), one family
    per window side and one of grid tokens; vocabulary and idf from the train_rows examples only.

    Each grid of an example has its own columns (an output's patterns are not an input's)."""
    u, g = examples.shape[:2]
    is_train = torch.zeros(u, dtype=torch.bool)
    is_train[train_rows] = True
    grids = examples.flatten(0, 1)
    windows, with_grid_tokens = PATTERN_KINDS[kinds]
    families = [torch.cat([pattern_codes(part, PAD, k, shapes) for part in grids.split(CODES_AT_ONCE)])
                for k, shapes in windows]
    families += [grid_tokens(grids, PAD)] if with_grid_tokens else []
    rows, columns, values, offset = [], [], [], 0
    for codes in families:
        codes = codes.view(u, -1)  # (U, G * W): grid g's codes in turn
        grid_of = torch.arange(g).repeat_interleave(codes.shape[1] // g).expand(u, -1)
        keys = torch.where(codes >= 0, codes * g + grid_of, -1)
        vocabulary = torch.unique(keys[is_train])
        vocabulary = vocabulary[vocabulary >= 0]
        column = torch.searchsorted(vocabulary, keys.clamp_min(0)).clamp_max(len(vocabulary) - 1)
        known = (keys >= 0) & (vocabulary[column] == keys)  # patterns never seen in training carry nothing
        row = torch.arange(u)[:, None].expand_as(column)[known]
        counts = torch.sparse_coo_tensor(torch.stack([row, column[known]]), torch.ones(len(row)),
                                         (u, len(vocabulary)), check_invariants=False).coalesce()
        (row, column), count = counts.indices(), counts.values()
        documents = torch.bincount(column[is_train[row]], minlength=len(vocabulary))
        value = count.sqrt() * torch.log((int(is_train.sum()) + 1) / (documents[column] + 1))
        norm = torch.zeros(u).index_add_(0, row, value ** 2).sqrt().clamp_min(1e-9)
        rows.append(row)
        columns.append(column + offset)
        values.append(value / norm[row])
        offset += len(vocabulary)
    return torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(columns)]), torch.cat(values),
                                   (u, offset), check_invariants=False).coalesce()


def size_one_hots(sizes):
    """(U, G, 2) heights and widths -> (U, G * 2 * 30) one-hot rows."""
    return F.one_hot(sizes - 1, GRID_SIZE).flatten(1).float()


def nearest_neighbour_accuracy(bags, labels, train_rows, eval_rows):
    train, scored = bags.index_select(0, train_rows), bags.index_select(0, eval_rows)
    with warnings.catch_warnings():  # torch routes sparse x sparse through CSR and calls it beta; the result is exact
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        similarity = torch.sparse.mm(scored, train.t()).to_dense()
    return (labels[train_rows][similarity.argmax(1)] == labels[eval_rows]).float().mean().item()


def fit_linear(features, labels, num_classes, steps, seed=0):
    """Softmax regression on sparse features: fixed steps and learning rate, nothing chosen on held-out rows."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(features.shape[1], num_classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=LINEAR_LR)
    for _ in range(steps):
        loss = F.cross_entropy(torch.sparse.mm(features, weight) + bias, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lambda rows: torch.sparse.mm(rows, weight.detach()) + bias.detach()


def pattern_baselines(train_batches, scored_batches, num_classes, kinds, steps=LINEAR_STEPS):
    """Puzzle classification fitted on train_batches' examples, on bags of `kinds` patterns -> {split: {'nearest':
    acc, 'linear': acc}} for each split: Batches of scored_batches."""
    data = train_batches.data
    parts = [train_batches] + list(scored_batches.values())
    examples = torch.cat([b.examples for b in parts])  # (U, G) grid indices
    labels = torch.cat([b.labels for b in parts])
    ends = torch.tensor([len(b.units) for b in parts]).cumsum(0).tolist()
    rows = [torch.arange(start, end) for start, end in zip([0] + ends[:-1], ends)]
    bags = pattern_bags(data.grids[examples].long(), rows[0], kinds)
    features = torch.cat([bags, size_one_hots(data.sizes[examples]).to_sparse()], dim=1).coalesce()
    linear = fit_linear(features.index_select(0, rows[0]), labels[rows[0]], num_classes, steps)
    out = {}
    for split, split_rows in zip(scored_batches, rows[1:]):
        predicted = linear(features.index_select(0, split_rows)).argmax(1)
        out[split] = {"nearest": nearest_neighbour_accuracy(bags, labels, rows[0], split_rows),
                      "linear": (predicted == labels[split_rows]).float().mean().item()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LINEAR_STEPS} regression steps")
    args = parser.parse_args()
    data = load_data("arcagi")
    steps = QUICK_LINEAR_STEPS if args.quick else LINEAR_STEPS
    num_classes = len(data.puzzle_ids)
    for pairs, kinds in itertools.product((False, True), PATTERN_KINDS):
        started = time.monotonic()
        splits = make_splits(data, "puzzle_classification", pairs, seed=0)
        batches = {name: Batches(data, splits[name], "puzzle_classification", 64, 0, use_pairs=pairs)
                   for name in ("train", "val", "test")}
        scored = pattern_baselines(batches["train"], {"val": batches["val"], "test": batches["test"]}, num_classes,
                                   kinds, steps)
        val, test = scored["val"], scored["test"]
        print(f"{'input-output pairs' if pairs else 'single grids'}, {kinds}: "
              f"nearest neighbour test {test['nearest']:.3f} (val {val['nearest']:.3f}); "
              f"linear, {steps} steps, test {test['linear']:.3f} "
              f"(val {val['linear']:.3f}); {time.monotonic() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
