"""language.py: topographic similarity, entropies and mutual information, the messages panel; and the analysis as a
short real run reports it (validation metrics, run history, the language event, the checkpoint, the CLI's line)."""
import json
import math
import os

import pytest
import torch

import catalogue
import checkpoint as ckpt
import language
import load_checkpoint
import train
from conftest import build_app, wait_for, write_task_folder
from data import PAD, Batches, load_data, make_splits


def grid(rows):
    """Rows of colour ids -> one (30, 30) grid holding them top-left, PAD elsewhere."""
    out = torch.full((30, 30), PAD, dtype=torch.long)
    values = torch.tensor(rows)
    out[:values.shape[0], :values.shape[1]] = values
    return out


def examples(*grids):
    """One-grid examples -> (N, 1, 30, 30)."""
    return torch.stack(grids)[:, None]


def compositional(n, seed=0):
    """n 12x12 grids of six bands of 2 rows, each band colour 0 or 1 (six binary attributes), each grid with 2
    cells repainted at random; and the language whose position i says band i's colour: (grids, messages).

    Six attributes of two values, rather than fewer of more values: a message distance then takes 7 values, and
    its ties alone keep even a perfect language's topographic similarity below 1 (about 0.97 here; three
    attributes of five values would give about 0.90)."""
    gen = torch.Generator().manual_seed(seed)
    attributes = torch.randint(0, 2, (n, 6), generator=gen)
    grids = torch.full((n, 1, 30, 30), PAD, dtype=torch.long)
    grids[:, 0, :12, :12] = attributes.repeat_interleave(2, dim=1)[:, :, None].expand(n, 12, 12)
    rows, cols = torch.randint(0, 12, (2, n, 2), generator=gen)
    grids[torch.arange(n)[:, None], 0, rows, cols] = torch.randint(0, 10, (n, 2), generator=gen)
    return grids, attributes


# ---------------------------------------------------------------------------------------------- distances

def test_grid_distances_are_hamming_over_the_padded_grids_and_a_size_mismatch_counts_every_cell():
    a, b, c = grid([[1, 2], [3, 4]]), grid([[1, 2], [3, 5]]), grid([[1, 2, 3], [3, 4, 5]])
    assert language.grid_distances(examples(a, b, c), PAD).tolist() == [[0, 1, 900], [1, 0, 900], [900, 900, 0]]
    pairs = torch.stack([torch.stack([a, c]), torch.stack([b, c]), torch.stack([c, a])])  # an example's grids add up
    assert language.grid_distances(pairs, PAD).tolist() == [[0, 1, 1800], [1, 0, 1800], [1800, 1800, 0]]
    # against a brute-force reading, grids of three sizes (so both the shared-size and the lone-size paths run)
    gen = torch.Generator().manual_seed(1)
    shapes = [(2, 2), (2, 3), (3, 3), (2, 2), (2, 3), (5, 1), (2, 2)] * 4 + [(1, 4)]
    many = examples(*[grid(torch.randint(0, 3, shape, generator=gen).tolist()) for shape in shapes])
    fast = language.grid_distances(many, PAD)
    for i in range(len(many)):
        for j in range(len(many)):
            same = shapes[i] == shapes[j]
            assert fast[i, j] == (int((many[i] != many[j]).sum()) if same else 900), (i, j)


def test_message_distances_are_hamming_for_one_length_and_edit_distance_otherwise():
    messages = torch.tensor([[1, 2, 3], [1, 3, 9], [3, 2, 1], [9, 9, 9], [4, 9, 9]])  # 9: past a message's end
    distances, kind = language.message_distances(messages, 10)
    assert kind == "hamming" and distances[0].tolist() == [0, 2, 2, 3, 3]
    distances, kind = language.message_distances(messages, 10, lengths=torch.tensor([3, 2, 3, 0, 1]))
    assert kind == "edit"
    # [1,2,3] -> [1,3]: drop the 2; -> [3,2,1]: two substitutions; -> []: 3; -> [4]: 3 (one substitution, 2 drops)
    assert distances[0].tolist() == [0, 1, 2, 3, 3]
    assert distances[3].tolist() == [3, 2, 3, 0, 1] and distances[4].tolist() == [3, 2, 3, 1, 0]
    assert torch.equal(distances, distances.T)
    same_length = torch.tensor([3, 3, 3, 3, 3])
    assert language.message_distances(messages, 10, same_length)[1] == "hamming"


# ---------------------------------------------------------------------------------------------- topographic similarity

def test_a_compositional_language_is_topographic_and_a_shuffled_one_is_not():
    grids, messages = compositional(300)
    ref = language.reference(grids, PAD)
    topsim, kind = language.topographic_similarity(messages, ref, 2)
    assert kind == "hamming" and topsim > 0.9, topsim
    shuffled = messages[torch.randperm(len(messages), generator=torch.Generator().manual_seed(2))]
    loose, _ = language.topographic_similarity(shuffled, ref, 2)
    assert abs(loose) < 0.1, loose
    # Spearman's correlation with ties averaged, as scipy computes it on the same pairs
    stats = pytest.importorskip("scipy.stats")
    upper = torch.triu_indices(len(grids), len(grids), 1)
    grid_d = language.grid_distances(grids, PAD)[upper[0], upper[1]]
    for m, ours in ((messages, topsim), (shuffled, loose)):
        message_d = language.hamming_distances(m, 2)[upper[0], upper[1]]
        assert ours == pytest.approx(stats.spearmanr(grid_d.numpy(), message_d.numpy()).statistic, abs=1e-9)


def test_the_topsim_sample_is_fixed_and_spread_over_the_split():
    sample = language.sample_indices(2_000)
    assert len(sample) == language.TOPSIM_SAMPLE and sample[0] == 0 and sample[-1] == 1_999
    assert torch.equal(sample, language.sample_indices(2_000)) and bool((sample.diff() > 0).all())
    assert torch.equal(language.sample_indices(7), torch.arange(7))
    grids, messages = compositional(1_200)
    ref = language.reference(grids, PAD)
    assert len(ref.sample) == 500 and ref.pairs.shape == (2, 500 * 499 // 2)
    # the pairs read are the sample's: the same as the analysis of those 500 examples alone
    alone = language.reference(grids[ref.sample], PAD)
    assert language.topographic_similarity(messages, ref, 2)[0] == \
        pytest.approx(language.topographic_similarity(messages[ref.sample], alone, 2)[0], abs=1e-12)


def test_topsim_of_constant_messages_is_none_and_strict_json():
    grids, _ = compositional(20)
    scalars, details = language.analyse(torch.zeros(20, 3, dtype=torch.long), language.reference(grids, PAD), 5)
    assert scalars["topsim"] is None and details["topsim"] is None
    assert scalars["h_message"] == 0.0 and scalars["mi_colours"] == 0.0 and scalars["position_entropy_min"] == 0.0
    assert json.loads(ckpt.dumps_strict(details))["topsim"] is None


# ---------------------------------------------------------------------------------------------- entropies

def hand_case():
    """8 examples: the first four of one colour, the last four of two; sizes alternate 3x3 (crop 5) and 6x6 (crop
    9). Messages a a b b c c c d, a = [0, 1], b = [0, 2], c = [1, 1], d = [1, 3]."""
    grids = [grid([[1 if i < 4 else (r + k) % 2 + 5 for r in range(side)] for k in range(side)])
             for i, side in enumerate([3, 6] * 4)]
    messages = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2], [1, 1], [1, 1], [1, 1], [1, 3]])
    return examples(*grids), messages


def bits(*probabilities):
    return -sum(p * math.log2(p) for p in probabilities)


def test_conditional_entropies_and_mutual_information_match_a_hand_computation():
    grids, messages = hand_case()
    ref = language.reference(grids, PAD)
    assert ref.colours.tolist() == [1, 1, 1, 1, 2, 2, 2, 2] and ref.sizes.tolist() == [5, 9] * 4
    scalars, details = language.analyse(messages, ref, 4)
    h = bits(2 / 8, 2 / 8, 3 / 8, 1 / 8)  # a, b, c, d
    # given colours: a a b b | c c c d; the message tells the colour count, so MI = H(colours) = 1 bit
    assert scalars["h_message"] == pytest.approx(h)
    assert scalars["h_message_given_colours"] == pytest.approx(0.5 * bits(1 / 2, 1 / 2) + 0.5 * bits(3 / 4, 1 / 4))
    assert scalars["mi_colours"] == pytest.approx(1.0)
    # given size: crop 5 holds a b c c, crop 9 holds a b c d
    given_size = 0.5 * bits(1 / 4, 1 / 4, 1 / 2) + 0.5 * bits(1 / 4, 1 / 4, 1 / 4, 1 / 4)
    assert scalars["h_message_given_size"] == pytest.approx(given_size)
    assert scalars["mi_size"] == pytest.approx(h - given_size)
    # per position: symbols 0 0 0 0 1 1 1 1, then 1 1 2 2 1 1 1 3
    assert details["usage"] == [[0.5, 0.5, 0.0, 0.0], [0.0, 0.625, 0.25, 0.125]]
    assert details["position_entropy"] == pytest.approx([1.0, bits(5 / 8, 2 / 8, 1 / 8)])
    assert scalars["position_entropy_min"] == pytest.approx(1.0)
    assert scalars["position_entropy_mean"] == pytest.approx((1.0 + bits(5 / 8, 2 / 8, 1 / 8)) / 2)


def test_colours_count_every_grid_of_an_example_and_a_pair_takes_the_larger_crop():
    pair = torch.stack([torch.stack([grid([[1, 1]]), grid([[1, 2], [2, 2]] * 3)]),  # colours {1} + {1, 2}; 2 and 6
                        torch.stack([grid([[0] * 13]), grid([[3] * 30])])])  # sides 13 and 30
    assert language.colour_counts(pair, PAD).tolist() == [2, 2]
    assert language.size_buckets(pair, PAD).tolist() == [9, 30]
    assert language.size_buckets(examples(grid([[0] * 5]), grid([[0] * 6]), grid([[0]] * 17)), PAD).tolist() == \
        [5, 9, 17]


def test_row_codes_tell_rows_apart_in_their_order_whether_or_not_they_fit_one_number():
    gen = torch.Generator().manual_seed(0)
    for rows in (torch.randint(0, 4, (500, 3), generator=gen),  # a mixed-radix number
                 torch.randint(0, 1024, (300, 64), generator=gen)):  # 640 bits: ranks among the distinct rows
        rows[1] = rows[0]
        by_rows = torch.unique(rows, dim=0, return_inverse=True)[1]
        assert torch.equal(torch.unique(language.row_codes(rows), return_inverse=True)[1], by_rows)


# ---------------------------------------------------------------------------------------------- the messages panel

def test_top_messages_are_the_most_frequent_with_their_first_grids():
    grids, messages = hand_case()
    top = language.top_messages(messages, grids, PAD)
    assert [t["message"] for t in top] == [[1, 1], [0, 1], [0, 2], [1, 3]]  # c, then a and b (tie: id order), d
    assert [t["count"] for t in top] == [3, 2, 2, 1] and top[0]["share"] == 3 / 8
    assert top[0]["examples"] == [[language.crop(grids[i, 0], PAD)] for i in (4, 5, 6)]
    assert top[0]["examples"][1][0] == [[(r + k) % 2 + 5 for r in range(6)] for k in range(6)]  # cropped, 6x6
    assert len(language.top_messages(messages, grids, PAD, k=2, examples=1)[1]["examples"]) == 1


def test_the_sender_saw_each_rows_own_unit_and_ranks_gather_in_the_splits_order(tmp_path):
    """What the reference assumes of Batches: evaluation order, and for selection the row's unit as its target."""
    data = load_data(data_dir=str(write_task_folder(tmp_path / "tasks", n_training=6, n_evaluation=2, seed=3)))
    for kind in ("selection", "reconstruction"):
        units = make_splits(data, kind, False, 0)["val"]
        batches = Batches(data, units, kind, batch_size=4, seed=0, shuffle=False, salt=2)
        seen = batches.grids(batches.order(0))
        for i in range(len(batches)):
            batch = batches.batch(0, i)
            shown = batch["candidates"][torch.arange(len(batch["target_index"])), batch["target_index"]] \
                if kind == "selection" else batch["examples"]
            assert torch.equal(shown, seen[4 * i:4 * i + len(shown)]), (kind, i)
    # two ranks, each with its rows of batches 0 and 1: back in the batches' order
    assert train.in_batch_order([["0a", "1a"], ["0b", "1b"]]) == ["0a", "0b", "1a", "1b"]


# ---------------------------------------------------------------------------------------------- a real run

def test_a_short_selection_run_reports_the_analysis_in_history_checkpoint_and_cli(tmp_path, arc_data, capsys):
    app = build_app(tmp_path / "checkpoints", arc_data)
    client = app.test_client()
    try:
        answer = client.post("/start_training", json={"task_type": "selection", "max_steps": 3, "epochs": 1})
        assert answer.status_code == 202
        wait_for(lambda: client.get("/status").get_json()["phase"] == "finished", timeout=60, what="run to finish")
        run_id = client.get("/status").get_json()["run_id"]
        [val] = client.get(f"/runs/{run_id}/metrics").get_json()["val"]  # the run's history (metrics.jsonl)
        latest = json.loads(client.get("/samples").get_data(as_text=True),
                            parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    finally:
        app.extensions["trainer"].shutdown()
    details = latest["language"]
    n, top = details["num_messages"], details["top_messages"]
    assert details["type"] == "language" and details["split"] == "val" and details["global_step"] == 3
    assert n > 100 and details["positions"] == 5 and details["vocab_size"] == 10 and details["cell_symbols"] == 0
    # the figures, within their ranges
    assert isinstance(val["val_topsim"], float) and -1.0 <= val["val_topsim"] <= 1.0
    for key in ("h_message", "h_message_given_colours", "h_message_given_size"):
        assert 0.0 <= val[f"val_{key}"] <= math.log2(n) + 1e-9, key
    assert val["val_h_message_given_colours"] <= val["val_h_message"] + 1e-9
    assert 0.0 <= val["val_mi_colours"] <= val["val_h_message"] + 1e-9 and 0.0 <= val["val_mi_size"]
    assert 0.0 <= val["val_position_entropy_min"] <= val["val_position_entropy_mean"] <= math.log2(10)
    # selection sends no cell code: the analysed message is the whole message message_stats reads
    assert val["val_h_message"] == pytest.approx(val["val_message_entropy"])
    assert details["topsim"] == val["val_topsim"] and details["mi_size"] == val["val_mi_size"]
    # the heatmap and the messages panel
    assert len(details["usage"]) == 5 and all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in details["usage"])
    assert 1 <= len(top) <= 10 and [t["count"] for t in top] == sorted((t["count"] for t in top), reverse=True)
    assert all(1 <= len(t["examples"]) <= min(3, t["count"]) for t in top) and sum(t["count"] for t in top) <= n
    assert all(len(g) == 1 and 1 <= len(g[0]) <= 30 for t in top for g in t["examples"])  # one grid each, cropped
    # the checkpoint best_model, saved at that validation, loads with plain torch.load and holds both
    path = os.path.join(catalogue.checkpoint_folder(str(tmp_path / "checkpoints"), run_id), "best_model.pth")
    record = torch.load(path, weights_only=True)
    assert record["metrics"]["val"]["topsim"] == val["val_topsim"]
    assert record[ckpt.LANGUAGE_KEY]["top_messages"] == top and record[ckpt.LANGUAGE_KEY]["usage"] == details["usage"]
    with open(ckpt.sidecar_path(path), encoding="utf-8") as f:
        assert ckpt.LANGUAGE_KEY not in json.load(f)  # the listing's sidecars stay small
    # the CLI's validation line prints them
    train.ConsoleProgress(enabled=False)({"type": "validation", **val})
    line = capsys.readouterr().out
    assert f"topsim={train.figure(val['val_topsim'])}" in line and "mi_colours=" in line and "mi_size=" in line
    # load_checkpoint.py --info shows the figures and the top messages' symbols (the grids stay in the record)
    assert load_checkpoint.main([path, "--info-only", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["language"]
    assert shown["topsim"] == val["val_topsim"] and shown["num_messages"] == n and shown["global_step"] == 3
    assert shown["top_messages"] == [{"message": t["message"], "count": t["count"]} for t in top]
    assert load_checkpoint.main([path, "--info-only"]) == 0
    text = capsys.readouterr().out
    assert "\nlanguage (the validation split" in text and f"message {' '.join(map(str, top[0]['message']))}: " in text


@pytest.mark.parametrize("lie", [[1, 2], "topsim", {"topsim": "high"}, {"num_messages": -3},
                                 {"top_messages": [{"message": "abc", "count": 1}]}, {"top_messages": {"a": 1}},
                                 {"h_message": True}])
def test_language_details_that_lie_are_shown_as_unreadable_and_never_carried_into_a_resumed_run(tmp_path, lie, capsys):
    record = {"name": "forged", "kind": "manual", "config": {}, "epoch": 0, "batch": 0, "global_step": 0,
              "model_state_dict": {}, ckpt.LANGUAGE_KEY: lie}
    path = str(tmp_path / "forged.pth")
    torch.save(record, path)
    assert load_checkpoint.main([path, "--info-only", "--skip-verify", "--json"]) == 0
    reason = json.loads(capsys.readouterr().out)["language"]["unreadable"]
    assert reason.startswith("language") and "not" in reason
    assert load_checkpoint.main([path, "--info-only", "--skip-verify"]) == 0
    assert f"language: unreadable: {reason}" in capsys.readouterr().out
    assert train.Trainer._language_to_carry(lie) is None
    good = {"topsim": None, "num_messages": 4, "top_messages": [{"message": [1, 2], "count": 4, "examples": []}]}
    assert train.Trainer._language_to_carry(good) is good
