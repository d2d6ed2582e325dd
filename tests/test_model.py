"""model.py: every task x bottleneck x io-pairs model runs both ways; messages are one-hot; gradients reach
every part through the discrete message; padding never counts; the generator makes Gumbel noise reproducible."""
import pytest
import torch
import torch.nn.functional as F

from conftest import crop, padded, symmetries
from model import (BOTTLENECK_TYPES, CELL_SIDE, PATTERN_KINDS, TASK_TYPES, ARCAutoencoder, ARCEncoder, EncoderPretrainer,
                   Sender, grid_tokens, pattern_codes)

PAD = 10
VOCAB, LENGTH, K, CLASSES = 7, 4, 3, 11


def random_grids(n, seed=0, max_side=12):
    """(n, 30, 30) colour ids, each grid a random size in the top-left corner, PAD elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    grids = torch.full((n, 30, 30), PAD, dtype=torch.long)
    for i in range(n):
        h, w = torch.randint(1, max_side + 1, (2,), generator=gen).tolist()
        grids[i, :h, :w] = torch.randint(0, 10, (h, w), generator=gen)
    return grids


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return ARCEncoder(num_colors=10, embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2)


def tiny_model(task="reconstruction", bottleneck="communication", pairs=False, seed=0, cells=0):
    encoder = tiny_encoder(seed)
    return ARCAutoencoder(encoder, vocab_size=VOCAB, max_length=LENGTH, bottleneck_type=bottleneck, task_type=task,
                          num_distractors=K, use_input_output_pairs=pairs, temperature=1.0, hidden_dim=16,
                          num_classes=CLASSES if task == "puzzle_classification" else 0, cell_channels=cells)


def inputs_for(task, pairs, b=4, seed=0):
    g = 2 if pairs else 1
    if task == "selection":
        candidates = random_grids(b * (K + 1) * g, seed).view(b, K + 1, g, 30, 30)
        return {"candidates": candidates, "target_index": torch.arange(b) % (K + 1)}
    return {"examples": random_grids(b * g, seed).view(b, g, 30, 30)}


def task_loss(task, out, inputs, b=4):
    """The receiver's loss for the task (what training minimises)."""
    if task == "reconstruction":
        target = inputs["examples"]
        mask = target != PAD
        return F.cross_entropy(out["colors"].movedim(2, -1)[mask], target[mask]) + out["sizes"].logsumexp(-1).mean()
    if task == "selection":
        return F.cross_entropy(out["scores"], inputs["target_index"])
    return F.cross_entropy(out["logits"], torch.arange(b) % CLASSES)


def is_one_hot(symbols):
    return torch.equal(symbols, F.one_hot(symbols.argmax(-1), symbols.shape[-1]).to(symbols.dtype))


@pytest.mark.parametrize("cells", [0, 2], ids=["latent", "cells"])
@pytest.mark.parametrize("pairs", [False, True], ids=["grids", "pairs"])
@pytest.mark.parametrize("bottleneck", BOTTLENECK_TYPES)
@pytest.mark.parametrize("task", TASK_TYPES)
def test_every_combination_builds_runs_forward_and_backward(task, bottleneck, pairs, cells):
    model = tiny_model(task, bottleneck, pairs, cells=cells).train()
    b, g = 4, 2 if pairs else 1
    inputs = inputs_for(task, pairs, b)
    out = model(**inputs, generator=torch.Generator().manual_seed(0))
    if task == "reconstruction":
        assert out["colors"].shape == (b, g, 10, 30, 30)
        assert out["sizes"].shape == (b, g, 2, 30)
    elif task == "selection":
        assert out["scores"].shape == (b, K + 1)
    else:
        assert out["logits"].shape == (b, CLASSES)
    if bottleneck == "communication":
        assert out["symbols"].shape == (b, LENGTH, VOCAB) and is_one_hot(out["symbols"])
    else:
        assert out["symbols"] is None
    if task == "reconstruction":
        assert (model.cell_code is None) == (cells == 0)  # the other tasks have no cell code
        if cells and bottleneck == "communication":
            assert out["cell_symbols"].shape == (b, g * cells * CELL_SIDE ** 2, VOCAB)
            assert is_one_hot(out["cell_symbols"])
        else:
            assert out["cell_symbols"] is None
    loss = task_loss(task, out, inputs, b)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing}"
    model.eval()
    with torch.no_grad():
        again = model(**inputs)
    assert again.keys() == out.keys()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_messages_are_exactly_one_hot(mode):
    torch.manual_seed(0)
    sender = Sender(latent_dim=16, vocab_size=VOCAB, max_length=LENGTH, hidden_dim=32)
    sender.train(mode == "train")
    gen = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 30.0):
        for temperature in (0.1, 1.0, 5.0):
            latent = torch.randn(256, 16, generator=gen) * scale
            symbols, logits = sender(latent, temperature, gen)
            assert symbols.shape == logits.shape == (256, LENGTH, VOCAB)
            assert is_one_hot(symbols), "a message row is not exactly one-hot"
            assert set(symbols.unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(symbols.sum(-1), torch.ones(256, LENGTH))


def test_eval_messages_are_the_argmax_of_the_logits_and_ignore_noise():
    torch.manual_seed(0)
    sender = Sender(16, VOCAB, LENGTH, 32).eval()
    latent = torch.randn(64, 16)
    a, logits = sender(latent, 1.0, torch.Generator().manual_seed(0))
    b, _ = sender(latent, 0.01, torch.Generator().manual_seed(99))
    assert torch.equal(a.argmax(-1), logits.argmax(-1))
    assert torch.equal(a, b)


def test_train_messages_are_noisy_but_follow_the_logits_at_low_temperature():
    torch.manual_seed(0)
    sender = Sender(16, VOCAB, LENGTH, 32).train()
    latent = torch.randn(512, 16) * 10  # confident logits
    symbols, logits = sender(latent, 0.5, torch.Generator().manual_seed(0))
    agree = (symbols.argmax(-1) == logits.argmax(-1)).float().mean()
    assert 0.5 < agree < 1.0, "training messages should be sampled (Gumbel), mostly the argmax"


def symbols_in_use(symbols):
    """(B, L, V) one-hot -> how many distinct symbols each position uses over the batch."""
    return [len(symbols[:, i].argmax(-1).unique()) for i in range(symbols.shape[1])]


def test_batch_normalised_logits_put_every_symbol_in_use_where_raw_logits_use_one():
    latent = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    for norm in ("batch", "none"):
        torch.manual_seed(0)
        sender = Sender(16, VOCAB, LENGTH, 32, logit_norm=norm)
        with torch.no_grad():
            sender.net[-1].bias.view(LENGTH, VOCAB)[:, 0] += 50.0  # a sender stuck on symbol 0 everywhere
            sender.train()
            for step in range(60):  # training batches also move the running figures evaluation reads
                trained, _ = sender(latent, 1.0, torch.Generator().manual_seed(step))
            evaluated, _ = sender.eval()(latent, 1.0)
        expected = VOCAB if norm == "batch" else 1
        assert symbols_in_use(trained) == symbols_in_use(evaluated) == [expected] * LENGTH, norm


def test_a_normalised_message_at_evaluation_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    sender = Sender(16, VOCAB, LENGTH, 32, logit_norm="batch")
    latent = torch.randn(64, 16)
    with torch.no_grad():
        sender.train()(latent, 1.0, torch.Generator().manual_seed(0))
        one, _ = sender.train()(latent[:1], 1.0, torch.Generator().manual_seed(0))  # a batch of one trains too
        assert is_one_hot(one)
        sender.eval()
        together, _ = sender(latent, 1.0)
        alone = torch.cat([sender(latent[i:i + 1], 1.0)[0] for i in range(len(latent))])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("scoring", ["cosine", "dot"])
def test_cosine_scoring_reads_only_the_angle_between_state_and_key(scoring):
    """Longer keys (puzzle vectors, candidate projections) change dot-product scores but not cosine ones."""
    torch.manual_seed(0)
    puzzles = ARCAutoencoder(tiny_encoder(), bottleneck_type="autoencoder", task_type="puzzle_classification",
                             num_classes=6, scoring=scoring).eval()
    selection = ARCAutoencoder(tiny_encoder(), bottleneck_type="communication", task_type="selection",
                               num_distractors=K, scoring=scoring, batch_negatives=True).train()
    puzzle_inputs, selection_inputs = inputs_for("puzzle_classification", False), inputs_for("selection", False)

    def outputs():
        out = selection(**selection_inputs, generator=torch.Generator().manual_seed(0))
        return {"logits": puzzles(**puzzle_inputs)["logits"], **out}

    with torch.no_grad():
        before = outputs()
        puzzles.classifier.weight.mul_(torch.arange(1.0, 7.0)[:, None])
        selection.candidate_projection.weight.mul_(3.0)
        selection.candidate_projection.bias.mul_(3.0)
        after = outputs()
    assert torch.equal(before["symbols"], after["symbols"])  # the message never reads the keys
    for name in ("logits", "scores", "batch_scores"):
        if scoring == "cosine":
            assert torch.allclose(before[name], after[name], atol=1e-5) and after[name].abs().max() <= 10.0 + 1e-5
        else:
            assert not torch.allclose(before[name], after[name], atol=1e-3), name


def test_straight_through_passes_gradient_from_receiver_state_to_latent():
    model = tiny_model("reconstruction", "communication").train()
    latent = torch.randn(8, 16, requires_grad=True)
    state, symbols = model.transmit(latent, torch.Generator().manual_seed(0))
    assert is_one_hot(symbols)
    state.pow(2).sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0, "no gradient crosses the discrete message"


@pytest.mark.parametrize("pairs", [False, True], ids=["grids", "pairs"])
@pytest.mark.parametrize("task", TASK_TYPES)
def test_receiver_loss_reaches_every_encoder_sender_and_receiver_parameter(task, pairs):
    model = tiny_model(task, "communication", pairs).train()
    inputs = inputs_for(task, pairs, b=6, seed=3)
    out = model(**inputs, generator=torch.Generator().manual_seed(0))
    task_loss(task, out, inputs, b=6).backward()
    parts = dict(model.example_encoder.named_parameters(prefix="example_encoder"))
    parts.update(model.sender.named_parameters(prefix="sender"))
    parts.update(model.receiver.named_parameters(prefix="receiver"))
    assert "receiver.symbol_embedding" in parts and "receiver.position_embedding" in parts
    assert "example_encoder.encoder.color_embedding.weight" in parts
    dead = [name for name, p in parts.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"zero gradient for {dead}"


def test_encoder_gets_gradient_only_through_the_message_in_reconstruction():
    """Reconstruction has no path around the bottleneck: detach the message and the encoder learns nothing."""
    model = tiny_model("reconstruction", "communication").train()
    inputs = inputs_for("reconstruction", False, b=4)
    original = model.sender.forward
    model.sender.forward = lambda *a, **k: tuple(t.detach() for t in original(*a, **k))
    task_loss("reconstruction", model(**inputs, generator=torch.Generator().manual_seed(0)), inputs).backward()
    assert all(p.grad is None for p in model.example_encoder.parameters())
    assert model.receiver.symbol_embedding.grad.abs().sum() > 0


def test_a_grid_encodes_the_same_whatever_else_is_in_the_batch():
    encoder = tiny_encoder().eval()
    grids = random_grids(6, seed=4)
    alone = encoder(grids[:1])
    with_others = encoder(grids)
    changed = grids.clone()
    changed[1:] = random_grids(5, seed=5)
    with_changed = encoder(changed)
    assert torch.allclose(alone[0], with_others[0], atol=1e-6)
    assert torch.allclose(with_others[0], with_changed[0], atol=1e-6)
    assert not torch.allclose(with_others[1], with_changed[1])


EDGE_SIDES = [(1, 1), (5, 5), (5, 6), (6, 9), (9, 10), (13, 14), (17, 18), (21, 22), (25, 26), (29, 3), (30, 30)]


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_encoding_grids_in_cropped_buckets_matches_encoding_them_at_full_size(layers):
    """Forward crops each grid to the smallest of CROP_SIDES that holds it; every crop side must give exactly the
    values and gradients of running the convs on the full 30x30 (an even side would not: its stride-2 output
    drops a row). Grids at every bucket's edges, in double precision so any difference shows."""
    torch.manual_seed(layers)
    encoder = ARCEncoder(num_colors=10, embedding_dim=4, hidden_dim=16, latent_dim=8, num_conv_layers=layers).double()
    grids = torch.cat([random_grids(9, seed=layers, max_side=30), torch.full((len(EDGE_SIDES), 30, 30), PAD)])
    for i, (h, w) in enumerate(EDGE_SIDES, start=9):
        grids[i, :h, :w] = torch.randint(0, 10, (h, w))
    weights = torch.randn(len(grids), 8, dtype=torch.double)
    keep_map = layers >= 2
    cropped, cropped_map = encoder.encode(grids, keep_map)
    map_weights = torch.randn_like(cropped_map) if keep_map else None
    ((cropped * weights).sum() + ((cropped_map * map_weights).sum() if keep_map else 0)).backward()
    cropped_grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    features, full_map = encoder.features(grids, side=30, keep_map=keep_map)
    full = encoder.to_latent(features)
    ((full * weights).sum() + ((full_map * map_weights).sum() if keep_map else 0)).backward()
    assert torch.allclose(cropped, full, rtol=0, atol=1e-12)
    if keep_map:
        assert cropped_map.shape == (len(grids), encoder.map_channels, CELL_SIDE, CELL_SIDE)
        assert torch.allclose(cropped_map, full_map, rtol=0, atol=1e-12)
    for p, cropped_grad in zip(encoder.parameters(), cropped_grads):
        assert torch.allclose(p.grad, cropped_grad, rtol=0, atol=1e-12)
    assert encoder(grids[:0]).shape == (0, 8)  # an empty batch still has a shape


def test_the_pad_area_never_counts():
    """A 3x3 grid's latent ignores everything the encoder holds for the pad-only area: the pad colour's
    embedding and the row/column embeddings of rows and columns 3-29 (wherever the pad-only area is)."""
    encoder = tiny_encoder().eval()
    grid = torch.full((1, 30, 30), PAD, dtype=torch.long)
    grid[0, :3, :3] = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 0]])
    before = encoder(grid)
    with torch.no_grad():
        encoder.color_embedding.weight[PAD] = torch.randn(encoder.color_embedding.weight.shape[1]) * 100
        encoder.row_embedding.weight[3:] = torch.randn_like(encoder.row_embedding.weight[3:]) * 100
        encoder.col_embedding.weight[3:] = torch.randn_like(encoder.col_embedding.weight[3:]) * 100
    after = encoder(grid)
    assert torch.allclose(before, after, atol=1e-6), "the pad area changed the latent"
    # ...while the real area does count.
    with torch.no_grad():
        encoder.row_embedding.weight[1] += 1.0
    assert not torch.allclose(before, encoder(grid), atol=1e-3)


def test_pad_is_not_colour_zero():
    encoder = tiny_encoder().eval()
    small = torch.full((1, 30, 30), PAD, dtype=torch.long)
    small[0, :3, :3] = 0
    larger = small.clone()
    larger[0, :3, 3] = 0  # a column of colour 0 where the pad was
    assert not torch.allclose(encoder(small), encoder(larger), atol=1e-4)


def test_generator_makes_training_messages_reproducible():
    model = tiny_model("selection", "communication").train()
    inputs = inputs_for("selection", False, b=16)
    state = torch.get_rng_state()
    a = model(**inputs, generator=torch.Generator().manual_seed(7))["symbols"]
    b = model(**inputs, generator=torch.Generator().manual_seed(7))["symbols"]
    c = model(**inputs, generator=torch.Generator().manual_seed(8))["symbols"]
    assert torch.equal(torch.get_rng_state(), state), "the model drew from the global RNG"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    gen = torch.Generator().manual_seed(7)
    first = model(**inputs, generator=gen)["symbols"]
    second = model(**inputs, generator=gen)["symbols"]  # the generator moves on
    assert torch.equal(first, a) and not torch.equal(first, second)


@pytest.mark.parametrize("mode", ["binary", "selection"])
def test_encoder_pretrainer_runs_forward_and_backward(mode):
    model = EncoderPretrainer(tiny_encoder(), mode, hidden_dim=16).train()
    if mode == "binary":
        out = model(first=random_grids(5, 1), second=random_grids(5, 2))
        assert out["logits"].shape == (5,)
        loss = F.binary_cross_entropy_with_logits(out["logits"], torch.ones(5))
    else:
        out = model(candidates=random_grids(5 * (K + 1), 1).view(5, K + 1, 30, 30), target_index=torch.zeros(5).long())
        assert out["scores"].shape == (5, K + 1)
        loss = F.cross_entropy(out["scores"], torch.zeros(5).long())
    loss.backward()
    dead = [n for n, p in model.encoder.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_encoder_depths_give_the_latent_size(layers):
    encoder = ARCEncoder(10, 4, 32, 24, layers)
    assert encoder(random_grids(3)).shape == (3, 24)


def test_batch_negatives_score_every_candidate_in_the_batch_in_training_only():
    model = tiny_model("selection")
    model.batch_negatives = True
    inputs = inputs_for("selection", False, b=4)
    torch.manual_seed(0)
    out = model(**inputs, generator=torch.Generator().manual_seed(1))
    assert out["batch_scores"].shape == (4, 4 * (K + 1))
    for b in range(4):  # each example's own block of columns is its ordinary score row
        assert torch.allclose(out["batch_scores"][b, b * (K + 1):(b + 1) * (K + 1)], out["scores"][b], atol=1e-6)
    model.eval()
    assert "batch_scores" not in model(**inputs)  # evaluation picks among the example's own candidates only


# ---------------------------------------------------------------------------------------------- the cell code

def test_the_cell_code_is_zero_outside_a_grid_and_each_cell_reads_its_own_neighbourhood():
    """Autoencoder cells: a grid's code covers its own cells only, and a pixel changes only the cells near it."""
    model = tiny_model("reconstruction", "autoencoder", cells=3).eval()
    grids = random_grids(1, seed=7)
    grids[0] = PAD
    grids[0, :11, :15] = torch.randint(0, 10, (11, 15))  # cells: rows 0-5, columns 0-7
    with torch.no_grad():
        _, cell_map = model.example_encoder.encode(grids[:, None], keep_map=True)
        code, symbols = model.cell_code(cell_map, 1.0)
    assert symbols is None and code.shape == (1, 3, CELL_SIDE, CELL_SIDE)
    used = code[0].abs().sum(0) > 0  # (15, 15)
    assert used[:6, :8].all() and not used[6:].any() and not used[:, 8:].any()
    changed = grids.clone()
    changed[0, 10, 0] = (changed[0, 10, 0] + 1) % 10  # pixel (10, 0) lies in cell (5, 0)
    with torch.no_grad():
        moved = model.cell_code(model.example_encoder.encode(changed[:, None], keep_map=True)[1], 1.0)[0]
    differs = (moved - code)[0].abs().sum(0) > 1e-6
    rows, cols = differs.nonzero().T
    assert differs[5, 0] and rows.min() >= 3 and cols.max() <= 2  # the first two layers see 3 cells around


@pytest.mark.parametrize("bottleneck", BOTTLENECK_TYPES)
def test_the_decoder_reads_the_cell_code(bottleneck):
    model = tiny_model("reconstruction", bottleneck, cells=2).eval()
    state = torch.randn(2, 16)
    code = torch.zeros(2, model.cell_code.out_channels, CELL_SIDE, CELL_SIDE)
    other = code.clone()
    other[:, :, 3, 4] = 1.0  # one cell's code: colours change in its 2x2 block and near it, not far away
    with torch.no_grad():
        before, after = model.decoder(state, code)[0], model.decoder(state, other)[0]
    differs = (before - after).abs().amax(dim=(0, 1, 2)) > 1e-6  # (30, 30)
    assert differs[6:8, 8:10].all() and not differs[20:].any()


def test_with_a_cell_code_the_encoder_still_learns_only_through_discrete_symbols():
    """Communication: no continuous path around the messages; detach both and the encoder gets nothing."""
    model = tiny_model("reconstruction", "communication", cells=2).train()
    inputs = inputs_for("reconstruction", False, b=4)
    gen = torch.Generator().manual_seed(0)
    out = model(**inputs, generator=gen)
    code, _ = model.cell_code(model.example_encoder.encode(inputs["examples"], keep_map=True)[1], 1.0, gen)
    assert set(code.unique().tolist()) <= {0.0, 1.0}  # what the decoder reads: one-hot symbols
    assert torch.equal(code.unflatten(1, (2, VOCAB)).sum(2), torch.ones(4, 2, CELL_SIDE, CELL_SIDE))
    task_loss("reconstruction", out, inputs).backward()
    assert model.cell_code.project.weight.grad.abs().sum() > 0  # straight-through reaches the cell code
    model.zero_grad()
    for part in (model.sender, model.cell_code):
        forward = part.forward
        part.forward = lambda *a, forward=forward, **k: tuple(t if t is None else t.detach() for t in forward(*a, **k))
    task_loss("reconstruction", model(**inputs, generator=gen), inputs).backward()
    assert all(p.grad is None for p in model.example_encoder.parameters())


def test_a_cell_message_at_evaluation_does_not_depend_on_the_rest_of_the_batch():
    model = tiny_model("reconstruction", "communication", cells=2).train()
    for seed in range(3):  # running figures of a few batches
        model(**inputs_for("reconstruction", False, b=8, seed=seed), generator=torch.Generator().manual_seed(seed))
    model.eval()
    grids = random_grids(6, seed=9)[:, None]
    with torch.no_grad():
        alone = model(grids[:1])["cell_symbols"]
        together = model(grids)["cell_symbols"]
    assert torch.equal(alone[0], together[0])


# ---------------------------------------------------------------------------------------------- the pattern bag

WINDOW_FAMILIES = sorted({family for windows, _ in PATTERN_KINDS.values() for family in windows})


@pytest.mark.parametrize("k, shapes", WINDOW_FAMILIES)
def test_pattern_codes_count_each_window_of_the_framed_grid_once_whichever_way_it_is_turned(k, shapes):
    gen = torch.Generator().manual_seed(k)
    for h, w in [(1, 1), (2, 5), (7, 3), (30, 30), (13, 29)]:
        grid = torch.full((30, 30), PAD, dtype=torch.long)
        grid[:h, :w] = torch.randint(0, 10, (h, w), generator=gen)
        codes = pattern_codes(grid[None], PAD, k, shapes)[0]
        codes = codes[codes >= 0].sort().values
        # k = 1: the cells; k > 1: every window of the (h + 2) x (w + 2) framed grid, none of padding only.
        assert len(codes) == (h * w if k == 1 else (h + 3 - k) * (w + 3 - k))
        for symmetry, view in enumerate(symmetries(crop(grid))):
            other = pattern_codes(padded(view)[None], PAD, k, shapes)[0]
            assert torch.equal(codes, other[other >= 0].sort().values), (h, w, symmetry)


def test_shape_codes_ignore_which_colours_a_window_has_but_not_which_cells_share_one():
    grids = torch.full((4, 30, 30), PAD, dtype=torch.long)
    grids[0, :2, :2] = torch.tensor([[1, 1], [2, 3]])
    grids[1, :2, :2] = torch.tensor([[5, 5], [0, 7]])  # renamed colours: the same shapes
    grids[2, :2, :2] = torch.tensor([[3, 3], [2, 1]])  # renamed and mirrored
    grids[3, :2, :2] = torch.tensor([[1, 2], [2, 3]])  # another partition of the cells
    for k in (1, 2, 3):
        shapes = [sorted(pattern_codes(grids[i:i + 1], PAD, k, shapes=True)[0].tolist()) for i in range(4)]
        exact = [sorted(pattern_codes(grids[i:i + 1], PAD, k)[0].tolist()) for i in range(4)]
        assert shapes[0] == shapes[1] == shapes[2] and exact[0] != exact[1], k
        assert (shapes[0] != shapes[3]) == (k > 1), k  # one cell alone has one shape
    # the whole framed 2x2 grid as one 4x4 window: the colours renamed in order of first appearance, padding kept
    window = pattern_codes(grids[:1], PAD, 4, shapes=True)[0]
    framed = [[PAD] * 4, [PAD, 0, 0, PAD], [PAD, 1, 2, PAD], [PAD] * 4]
    first_read = sum(c * (PAD + 1) ** (15 - i) for i, c in enumerate(sum(framed, [])))
    assert window[window >= 0].tolist() == [first_read]  # already the least reading of the 8 symmetries


def test_grid_tokens_are_the_sides_and_the_colour_set_whichever_way_the_grid_is_turned():
    grid = torch.full((30, 30), PAD, dtype=torch.long)
    grid[:2, :5] = torch.tensor([[0, 4, 4, 0, 0], [0, 0, 9, 0, 0]])
    colour_set = 2 ** 0 + 2 ** 4 + 2 ** 9
    tokens = grid_tokens(grid[None], PAD)[0].tolist()
    assert tokens[:3] == [2, 5 + 31, colour_set + 62]
    assert tokens[3] == 62 + 2 ** 10 + (colour_set * 31 + 2) * 31 + 5
    other = grid_tokens(padded(crop(grid).T)[None], PAD)[0].tolist()
    assert other == tokens
    grid[0, 0] = 1
    assert grid_tokens(grid[None], PAD)[0, :2].tolist() == tokens[:2]
    assert grid_tokens(grid[None], PAD)[0, 2:].tolist() != tokens[2:]


def test_pattern_codes_tell_windows_apart_and_read_a_window_like_its_mirror_image():
    grid = torch.full((3, 30, 30), PAD, dtype=torch.long)
    grid[0, :2, :2] = torch.tensor([[1, 2], [3, 4]])
    grid[1, :2, :2] = torch.tensor([[2, 1], [4, 3]])  # the mirror image: the same patterns
    grid[2, :2, :2] = torch.tensor([[1, 2], [4, 3]])  # another arrangement of the same colours
    codes = [set(pattern_codes(grid[i:i + 1], PAD, 2)[0].tolist()) - {-1} for i in range(3)]
    assert codes[0] == codes[1] and codes[0] != codes[2]
    assert pattern_codes(grid[:1], PAD, 1)[0, 33:35].tolist() == [1, 2]  # 32 x 32 framed: a 1x1 code is the colour


def pattern_encoder(buckets=64, seed=0, kinds="shapes"):
    torch.manual_seed(seed)
    return ARCEncoder(num_colors=10, embedding_dim=4, hidden_dim=16, latent_dim=8, num_conv_layers=2,
                      pattern_buckets=buckets, pattern_kinds=kinds)


@pytest.mark.parametrize("kinds", PATTERN_KINDS)
def test_the_pattern_bag_reads_a_grid_the_same_turned_or_flipped_and_alone_or_in_any_batch(kinds):
    encoder = pattern_encoder(kinds=kinds).double()
    grids = random_grids(5, seed=2, max_side=30)
    bag = encoder.patterns(grids)
    assert torch.allclose(encoder.patterns(grids[2:3])[0], bag[2], rtol=0, atol=1e-12)
    for view in symmetries(crop(grids[0])):
        assert torch.allclose(encoder.patterns(padded(view)[None])[0], bag[0], atol=1e-12)
    other = grids[:1].clone()
    other[0, 0, 0] = (other[0, 0, 0] + 1) % 10
    assert not torch.allclose(encoder.patterns(other)[0], bag[0])
    # the latent is the conv stack's plus the bag's, bucketed crops or not
    features, _ = encoder.features(grids, side=30)
    assert torch.allclose(encoder(grids), encoder.to_latent(features) + bag, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kinds", PATTERN_KINDS)
def test_the_pattern_bag_learns_the_rows_of_the_patterns_a_grid_has_and_only_those(kinds):
    encoder = pattern_encoder(buckets=4096, kinds=kinds)
    grid = torch.full((1, 30, 30), PAD, dtype=torch.long)
    grid[0, :2, :3] = torch.tensor([[1, 1, 2], [1, 1, 2]])
    encoder(grid).pow(2).sum().backward()
    touched = encoder.patterns.embedding.weight.grad.abs().sum(1).nonzero().squeeze(1)
    families, with_grid_tokens = PATTERN_KINDS[kinds]
    windows = sum(len(set(pattern_codes(grid, PAD, k, shapes)[0].tolist()) - {-1}) for k, shapes in families)
    windows += 4 if with_grid_tokens else 0
    assert 0 < len(touched) <= windows  # one row per distinct pattern (fewer if two share a bucket)
    assert len(touched) >= windows - 2
