"""Models for ARC grids: a grid encoder, the communication/autoencoder bottleneck and the task heads.

Grids arrive as (B, 30, 30) colour ids with the pad value `num_colors` outside the real area.
An "example" is one grid or, with use_input_output_pairs, an (input, output) pair: (B, G, 30, 30), G in {1, 2}.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

GRID_SIZE = 30
TASK_TYPES = ("reconstruction", "selection", "puzzle_classification")
BOTTLENECK_TYPES = ("communication", "autoencoder")
PRETRAIN_MODES = ("binary", "selection")
MESSAGE_NORMS = ("batch", "none")
# Normalised logits have unit spread; at 6x the Gumbel noise (sd 1.28) flips only close calls. Selection, 60 s probes
# with 15 distractors: scale 3 / 6 / 12 gave 0.539 / 0.633 / 0.601 test accuracy.
NORMED_LOGIT_SCALE = 6.0
SCORINGS = ("cosine", "dot")
# Cosine scores lie in [-1, 1]; x10 lets softmax be confident. 60 s probes, test accuracy at scale 5 / 10 / 20:
# puzzle classification 0.328 / 0.344 / 0.322 (linear layer 0.274); selection with 15 distractors - / 0.895 / 0.881
# (scaled dot product 0.633).
COSINE_SCALE = 10.0
# The encoder's second layer maps a grid to 15x15 cells, each a 2x2 block of pixels: the cell code reads that map.
CELL_MAP_LAYER = 1
CELL_SIDE = (GRID_SIZE - 1) // 2 + 1
# Crop sides for encoding: 4k+1 keeps every stride-2 layer's output aligned with the full grid's (see ARCEncoder).
CROP_SIDES = (5, 9, 13, 17, 21, 25, GRID_SIZE)
# The pattern bag's kinds (ARCEncoder's pattern_kinds): which k x k windows it reads, (side, shapes), and whether
# it adds tokens of the whole grid (grid_tokens). Puzzle classification, linear softmax on the windows' tf-idf bags
# plus one-hot sizes (bench/pattern_baselines.py), test top-1: exact windows of sides 1-3 as they are 0.453, read
# the same under the 8 symmetries 0.478 (sides 1-4: 0.463). Colour-blind shapes read far better: exact 1x1 windows,
# 3x3 and 4x4 shapes and the colour set 0.649 (exact 2x2 and 3x3 windows added to those: 0.595; 2x2 shapes or 5x5
# shapes added: 0.648 / 0.631), with the colour set and size as one token 0.655.
PATTERN_KINDS = {"exact": (((1, False), (2, False), (3, False)), False),
                 "shapes": (((1, False), (3, True), (4, True)), True)}


def _conv_plan(num_conv_layers, hidden_dim):
    """Channels and strides: full resolution first, then stride 2 down to 8x8, widening towards hidden_dim."""
    channels = [max(16, hidden_dim // 2 ** (num_conv_layers - 1 - i)) for i in range(num_conv_layers)]
    strides = [1] + [2 if i <= 2 else 1 for i in range(1, num_conv_layers)]
    return channels, strides


def grid_extents(grids, pad):
    """(N, 30, 30) colour ids -> (N,) the side of the smallest top-left square holding each grid's real area."""
    real = grids != pad
    positions = torch.arange(1, grids.shape[-1] + 1, device=grids.device)
    return torch.maximum((real.any(2) * positions).amax(1), (real.any(1) * positions).amax(1))


def crop_buckets(extents):
    """(N,) sides -> [(crop side, indices)]: each item goes to the smallest of CROP_SIDES that holds it."""
    buckets = torch.bucketize(extents, torch.tensor(CROP_SIDES, device=extents.device))
    return [(CROP_SIDES[k], (buckets == k).nonzero().squeeze(1)) for k in buckets.unique().tolist()]


def window_symmetries(k):
    """The 8 orders of a k x k window's cells (row-major) that rotate or reflect it: (8, k * k)."""
    cells = torch.arange(k * k).view(k, k)
    turns = [torch.rot90(cells, r) for r in range(4)]
    return torch.stack([order.flatten() for turn in turns for order in (turn, turn.T)])


def _by_first_appearance(cells, pad):
    """(N, n) windows' colour ids -> the colours renamed 0, 1, ... in order of first appearance; padding stays pad."""
    n = cells.shape[1]
    positions = torch.arange(n, device=cells.device).expand_as(cells)
    first = torch.full((len(cells), pad + 1), n, device=cells.device)
    first_of_cell = first.scatter_reduce_(1, cells, positions, "amin").gather(1, cells)  # (N, n)
    opens = (first_of_cell == positions) & (cells != pad)  # the cells where a colour is first seen
    return torch.where(cells == pad, pad, (opens.cumsum(1) - 1).gather(1, first_of_cell))


def pattern_codes(grids, pad, k, shapes=False):
    """(B, S, S) colour ids -> (B, W) one code per k x k window of each grid framed by one ring of padding, the
    same for a window and its rotations and reflections; windows of padding only and windows reaching past the
    frame come out as -1. With shapes, the code ignores which colours a window has and keeps only which of its
    cells share a colour: colours are renamed in order of first appearance before each symmetry is read."""
    framed = F.pad(grids, (1, 1, 1, 1), value=pad)
    side = framed.shape[-1] - k + 1
    cells = framed.unfold(1, k, 1).unfold(2, k, 1).reshape(len(grids), side * side, k * k)
    # Only windows inside the framed grid: past its frame they would see more padding below than above.
    real = grids != pad
    starts = torch.arange(side, device=grids.device)
    inside_rows = starts <= real.any(2).sum(1, keepdim=True) + 2 - k  # (B, side)
    inside_cols = starts <= real.any(1).sum(1, keepdim=True) + 2 - k
    kept = (inside_rows[:, :, None] & inside_cols[:, None, :]).flatten(1) & (cells != pad).any(2)
    cells = cells[kept]  # (N, k * k)
    digits = (pad + 1) ** torch.arange(k * k - 1, -1, -1, device=grids.device)
    orders = [cells[:, order] for order in window_symmetries(k).to(grids.device)]
    if shapes:
        orders = [_by_first_appearance(order, pad) for order in orders]
    codes = torch.stack([order @ digits for order in orders]).amin(0)  # exact: codes stay below 11 ** 16 < 2 ** 63
    return torch.full(kept.shape, -1, dtype=torch.long, device=grids.device).masked_scatter(kept, codes)


def grid_tokens(grids, pad):
    """(B, S, S) colour ids -> (B, 4) codes of the grid's short side, long side, set of colours, and set of colours
    with both sides; sides unordered, so a grid reads the same turned."""
    real = grids != pad
    sides = torch.stack([real.any(2).sum(1), real.any(1).sum(1)], 1).sort(1).values  # (B, 2): short, long
    present = torch.zeros(len(grids), pad + 1, dtype=torch.long, device=grids.device)
    present = present.scatter_(1, grids.flatten(1), 1)[:, :pad]
    colour_set = present @ 2 ** torch.arange(pad, device=grids.device)
    shaped_set = (colour_set * (GRID_SIZE + 1) + sides[:, 0]) * (GRID_SIZE + 1) + sides[:, 1]
    # each token in its own range of codes
    return torch.stack([sides[:, 0], sides[:, 1] + GRID_SIZE + 1, colour_set + 2 * (GRID_SIZE + 1),
                        shaped_set + 2 * (GRID_SIZE + 1) + 2 ** pad], 1)


def _bag_counts(codes):
    """(B, W) codes, -1 for none -> (rows, codes, counts) of each grid's distinct codes."""
    codes = codes.sort(1).values
    opens = torch.ones_like(codes, dtype=torch.bool)
    opens[:, 1:] = codes[:, 1:] != codes[:, :-1]
    opens &= codes >= 0
    run = opens.flatten().cumsum(0) - 1  # each code's run of equal codes in its row
    counts = torch.bincount(run[(codes >= 0).flatten()], minlength=int(opens.sum()))
    rows = torch.arange(len(codes), device=codes.device)[:, None].expand_as(codes)[opens]
    return rows, codes[opens], counts


class PatternBag(nn.Module):
    """A grid -> the bag of its local patterns, embedded (as fastText embeds a text's bag of n-grams).

    Each k x k window of the kind's sides (PATTERN_KINDS), of the grid framed by a ring of padding so its edges
    count, read the same whichever way it is turned or flipped (and, for shapes, whatever its colours), is hashed to
    one of `buckets` rows of an embedding. A grid's vector is, per window side, the sum of its distinct windows'
    rows weighted by sqrt(count / windows), plus, for "shapes", the rows of its grid_tokens: such patterns say
    which puzzle a grid is from where a conv stack, in a 5-minute budget, learns mostly colour and layout.
    """

    # Codes of each family are moved to their own range and taken modulo HASH_PRIME before they are multiplied.
    HASH_MULTIPLIER, HASH_PRIME = 2654435761, 4294967291

    def __init__(self, buckets, dim, pad, kinds):
        super().__init__()
        self.buckets, self.pad = buckets, pad
        self.windows, self.with_grid_tokens = PATTERN_KINDS[kinds]
        self.embedding = nn.Embedding(buckets, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, grids):
        """(B, S, S) colour ids -> (B, dim)."""
        out = self.embedding.weight.new_zeros(len(grids), self.embedding.embedding_dim)
        first_code = 0
        for k, shapes in self.windows:
            rows, codes, counts = _bag_counts(pattern_codes(grids, self.pad, k, shapes))
            windows = torch.zeros_like(out[:, 0]).index_add_(0, rows, counts.to(out.dtype))
            out = out.index_add(0, rows, self._rows(codes + first_code) * (counts / windows[rows]).sqrt()[:, None])
            first_code += (self.pad + 1) ** (k * k)
        if self.with_grid_tokens:
            out = out + self._rows(grid_tokens(grids, self.pad) + first_code).sum(1)
        return out

    def _rows(self, codes):
        return self.embedding(codes % self.HASH_PRIME * self.HASH_MULTIPLIER % self.HASH_PRIME % self.buckets)


class ARCEncoder(nn.Module):
    """Colour embedding + conv stack; padding is zeroed after every layer and never enters the pooling.
    With pattern_buckets, a PatternBag of the grid's local patterns (pattern_kinds) is added to the latent."""

    def __init__(self, num_colors=10, embedding_dim=16, hidden_dim=128, latent_dim=256, num_conv_layers=3,
                 pattern_buckets=0, pattern_kinds="shapes"):
        super().__init__()
        if num_conv_layers < 1:
            raise ValueError(f"num_conv_layers must be at least 1, got {num_conv_layers!r}")
        self.num_colors = num_colors
        self.latent_dim = latent_dim
        self.color_embedding = nn.Embedding(num_colors + 1, embedding_dim, padding_idx=num_colors)
        # Row and column embeddings let the flattened map and the pooled features say where a colour is.
        self.row_embedding = nn.Embedding(GRID_SIZE, embedding_dim)
        self.col_embedding = nn.Embedding(GRID_SIZE, embedding_dim)
        channels, self.strides = _conv_plan(num_conv_layers, hidden_dim)
        in_channels = [embedding_dim] + channels[:-1]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=s, padding=1) for c_in, c_out, s in zip(in_channels, channels, self.strides)
        )
        side = GRID_SIZE
        for s in self.strides:
            side = (side - 1) // s + 1
        self.out_channels, self.out_side = channels[-1], side
        self.map_channels = channels[CELL_MAP_LAYER] if num_conv_layers > CELL_MAP_LAYER else 0
        flat = self.out_channels * side * side
        # Masked mean and max over the real area, plus the masked map itself (keeps layout for reconstruction).
        self.to_latent = nn.Linear(2 * self.out_channels + flat, latent_dim)
        # pattern_buckets > 0: the bag of the grid's local patterns joins the latent.
        self.patterns = PatternBag(pattern_buckets, latent_dim, num_colors, pattern_kinds) if pattern_buckets else None

    def forward(self, grids):
        """(B, 30, 30) colour ids -> (B, latent_dim)."""
        return self.encode(grids)[0]

    def encode(self, grids, keep_map=False):
        """(B, 30, 30) colour ids -> latents (B, latent_dim) and, with keep_map, the 15x15 map (B, C, 15, 15).

        Most ARC grids are small (ARC-AGI-1 training: 73% fit in 13x13), so grids are encoded in buckets cropped to
        CROP_SIDES: the padding is zero after every layer, so a crop changes no value and saves most of the convs.
        """
        assert not keep_map or self.map_channels, "the cell map needs at least two conv layers"
        if len(grids) == 0:
            features, cell_map = self.features(grids, keep_map=keep_map)
            return self.to_latent(features), cell_map
        buckets = crop_buckets(grid_extents(grids, self.num_colors))
        parts = [self.features(grids[index], side, keep_map) for side, index in buckets]
        batch_order = torch.argsort(torch.cat([index for _, index in buckets]))
        # One matmul over the buckets' rows; only the small latents (and maps if kept) go back to the batch's order.
        latents = self.to_latent(torch.cat([features for features, _ in parts]))[batch_order]
        if self.patterns is not None:
            side = max(side for side, _ in buckets)
            latents = latents + self.patterns(grids[:, :side, :side])
        cell_map = torch.cat([m for _, m in parts])[batch_order] if keep_map else None
        return latents, cell_map

    def features(self, grids, side=GRID_SIZE, keep_map=False):
        """(B, 30, 30) colour ids whose grids fit in side x side -> pooled and flattened features (B, F), and
        with keep_map the second layer's map placed in the full 15x15 map (zero outside the grid)."""
        grids = grids[:, :side, :side]
        mask = (grids != self.num_colors).unsqueeze(1).float()  # (B, 1, side, side)
        rows = torch.arange(side, device=grids.device)
        x = self.color_embedding(grids) + self.row_embedding(rows)[None, :, None] + self.col_embedding(rows)[None, None]
        x = x.permute(0, 3, 1, 2) * mask  # (B, E, side, side)
        cell_map = None
        for layer, (conv, stride) in enumerate(zip(self.convs, self.strides)):
            if stride > 1:
                mask = F.max_pool2d(mask, kernel_size=3, stride=stride, padding=1)
            x = F.gelu(conv(x)) * mask
            if keep_map and layer == CELL_MAP_LAYER:
                cell_map = F.pad(x, (0, CELL_SIDE - x.shape[-1], 0, CELL_SIDE - x.shape[-2]))
        area = mask.sum(dim=(2, 3)).clamp_min(1.0)  # (B, 1)
        mean = x.sum(dim=(2, 3)) / area
        peak = x.masked_fill(mask == 0, -1e4).amax(dim=(2, 3))
        missing = self.out_side - x.shape[-1]
        x = F.pad(x, (0, missing, 0, missing))  # a crop's map, zero outside, placed in the full map
        return torch.cat([mean, peak, x.flatten(1)], dim=1), cell_map


class ExampleEncoder(nn.Module):
    """Encodes one grid or an (input, output) pair into one latent vector."""

    def __init__(self, encoder, grids_per_example):
        super().__init__()
        self.encoder = encoder
        self.grids_per_example = grids_per_example
        self.merge = nn.Linear(encoder.latent_dim * grids_per_example, encoder.latent_dim) if grids_per_example > 1 else None

    def forward(self, examples):
        """(N, G, 30, 30) -> (N, latent_dim)."""
        return self.encode(examples)[0]

    def encode(self, examples, keep_map=False):
        """(N, G, 30, 30) -> (N, latent_dim) and, with keep_map, each grid's 15x15 map (N, G, C, 15, 15)."""
        n, g = examples.shape[:2]
        latents, cell_map = self.encoder.encode(examples.flatten(0, 1), keep_map)
        latents = latents.view(n, g * self.encoder.latent_dim)
        if self.merge is not None:
            latents = self.merge(F.gelu(latents))
        return latents, None if cell_map is None else cell_map.unflatten(0, (n, g))


def full_precision(x):
    """x in float32 if autocast made it bf16 (or fp16); float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def draw_symbols(logits, temperature, training, generator=None, batch_group=None):
    """Logits (..., V) -> one-hot symbols (..., V): Gumbel-softmax in training, the argmax in evaluation.

    Straight-through: hard one-hot forward, soft Gumbel-softmax gradient backward. The noise comes from the
    caller's generator so a run's randomness is its own and can be saved and restored. With a batch split across
    processes (batch_group), each draws the noise of the whole batch and keeps its own rows: an example gets the
    same noise whatever the number of processes.
    """
    vocab_size = logits.shape[-1]
    # float32 even under bf16 autocast: bf16 has 8 bits of mantissa, so -log(-log(u)) of u near 1 and a softmax
    # over close logits would round ties and tiny probabilities away.
    logits = full_precision(logits)
    if not training:
        return F.one_hot(logits.argmax(-1), vocab_size).to(logits.dtype)
    if batch_group is None:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    else:
        offset, total = batch_group.rows(len(logits))
        uniform = torch.rand((total, *logits.shape[1:]), generator=generator, device=logits.device,
                             dtype=logits.dtype)[offset:offset + len(logits)]
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    soft = F.softmax((logits + gumbel) / temperature, dim=-1)
    hard = F.one_hot(soft.argmax(-1), vocab_size).to(soft.dtype)
    return hard - soft.detach() + soft


def split_batch_norm(x, norm, batch_group, dims):
    """What norm(x) (a BatchNorm without affine) computes in training, over a batch split across processes: the
    whole batch's mean and variance (summed over batch_group, with their gradient) and its running figures updated
    as one process would update them."""
    shape = [1] * x.dim()
    shape[1] = -1
    count = batch_group.total(x.numel() // x.shape[1])
    mean = batch_group.sum_rows(x.sum(dims)) / count
    centred = x - mean.view(shape)
    var = batch_group.sum_rows((centred ** 2).sum(dims)) / count
    with torch.no_grad():
        norm.num_batches_tracked += 1
        norm.running_mean.mul_(1 - norm.momentum).add_(norm.momentum * mean)
        norm.running_var.mul_(1 - norm.momentum).add_(norm.momentum * var * count / max(count - 1, 1))
    return centred / torch.sqrt(var.view(shape) + norm.eps)


class Sender(nn.Module):
    """Latent -> message of max_length symbols over vocab_size, as one-hot rows (B, L, V).

    logit_norm="batch" normalises each (position, symbol) logit over the batch, with running figures at evaluation
    as batch norm keeps them: every symbol is then in use at every position. Left alone, the sender settles on a
    few symbols early (selection: about 4 bits of messages out of 16.6) and distractors share the target's message.
    """

    def __init__(self, latent_dim, vocab_size, max_length, hidden_dim, logit_norm="batch"):
        super().__init__()
        if logit_norm not in MESSAGE_NORMS:
            raise ValueError(f"logit_norm must be one of {MESSAGE_NORMS}, got {logit_norm!r}")
        self.vocab_size, self.max_length = vocab_size, max_length
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, max_length * vocab_size))
        self.norm = nn.BatchNorm1d(max_length * vocab_size, affine=False) if logit_norm == "batch" else None
        self.batch_group = None  # set by ARCAutoencoder.split_batch

    def forward(self, latent, temperature, generator=None):
        logits = full_precision(self.net(latent))  # the batch's mean and spread of each logit: float32 under autocast
        if self.norm is not None:
            logits = NORMED_LOGIT_SCALE * self._normalise(logits)
        logits = logits.view(-1, self.max_length, self.vocab_size)
        return draw_symbols(logits, temperature, self.training, generator, self.batch_group), logits

    def _normalise(self, logits):
        whole = len(logits) if self.batch_group is None or not self.training else \
            self.batch_group.rows(len(logits))[1]
        if self.training and whole == 1:  # one example has no spread over the batch: use the running figures
            return F.batch_norm(logits, self.norm.running_mean, self.norm.running_var, eps=self.norm.eps)
        if self.batch_group is not None and self.training:
            return split_batch_norm(logits, self.norm, self.batch_group, dims=0)
        return self.norm(logits)


class Receiver(nn.Module):
    """Reads one-hot symbols through one embedding matrix (one-hot @ weight), the same way in training and evaluation."""

    def __init__(self, vocab_size, max_length, hidden_dim):
        super().__init__()
        self.symbol_embedding = nn.Parameter(torch.randn(vocab_size, hidden_dim) / math.sqrt(hidden_dim))
        self.position_embedding = nn.Parameter(torch.zeros(max_length, hidden_dim))
        self.net = nn.Sequential(nn.Linear(max_length * hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, symbols):
        x = symbols @ self.symbol_embedding + self.position_embedding  # (B, L, hidden)
        return self.net(x.flatten(1))


class CellCode(nn.Module):
    """The encoder's 15x15 maps -> the code each cell (a 2x2 block of pixels) sends to the decoder beside the latent.

    Autoencoder: `channels` floats per cell. Communication: `channels` symbols per cell from the message's
    vocabulary, drawn as the sender draws its message: a grid of symbols, as the discrete VAE of DALL-E codes an
    image. A single vector, or a short message, has to describe a whole grid at once, and in a 5-minute budget it
    generalised little beyond painting each grid's majority colour (pixel accuracy 0.674 vs 0.653, 3 seeds).
    """

    def __init__(self, map_channels, channels, vocab_size=None, logit_norm="batch"):
        super().__init__()
        self.channels, self.vocab_size = channels, vocab_size
        self.out_channels = channels * (vocab_size or 1)  # per grid: floats, or one-hot symbols
        # No bias: the map is zero outside a grid and so is its code, whatever the grid's size.
        self.project = nn.Conv2d(map_channels, self.out_channels, 1, bias=False)
        # As in Sender: each (channel, symbol) logit normalised over the batch and the cells.
        self.norm = nn.BatchNorm2d(self.out_channels, affine=False) if vocab_size and logit_norm == "batch" else None
        self.batch_group = None  # set by ARCAutoencoder.split_batch

    def forward(self, cell_maps, temperature, generator=None):
        """(N, G, C_map, 15, 15) -> codes (N, G * C_out, 15, 15), C_out = channels (x vocab_size, one-hot), and
        the symbols (N, G * channels * 15 * 15, V) for communication, else None."""
        n, g = cell_maps.shape[:2]
        codes = self.project(cell_maps.flatten(0, 1))  # (N * G, C_out, 15, 15)
        symbols = None
        if self.vocab_size is not None:
            codes = full_precision(codes)  # normalised over the batch and drawn from: float32 under autocast, as in Sender
            if self.norm is not None:
                codes = NORMED_LOGIT_SCALE * (split_batch_norm(codes, self.norm, self.batch_group, dims=(0, 2, 3))
                                              if self.batch_group is not None and self.training else self.norm(codes))
            logits = codes.unflatten(1, (self.channels, self.vocab_size)).movedim(2, -1)  # (N * G, ch, 15, 15, V)
            symbols = draw_symbols(logits, temperature, self.training, generator, self.batch_group)
            codes = symbols.movedim(-1, 2).flatten(1, 2)  # the one-hot symbols, back in channel order
            symbols = symbols.reshape(n, -1, self.vocab_size)  # per example: grid, channel, row, column
        return codes.unflatten(0, (n, g)).flatten(1, 2), symbols


class GridDecoder(nn.Module):
    """Receiver state -> colour logits (B, G, 10, 30, 30) and height/width logits (B, G, 2, 30).

    An 8x8 map grows to 15x15 by a transposed conv, and each 15x15 cell predicts its own 2x2 block of pixels
    (pixel shuffle): no layer runs at full resolution, where the copies around nearest upsampling took 40% of a
    step. A colour bias per grid, read straight from the state, paints the background from the first steps on, so
    the convolutions spend their capacity on the objects. A cell code (B, code_channels, 15, 15), when there is
    one, joins the 15x15 map through a 1x1 conv (for symbols: an embedding per symbol and cell channel).
    """

    def __init__(self, hidden_dim, num_colors, grids_per_example, channels=64, code_channels=0):
        super().__init__()
        self.g, self.num_colors, self.channels = grids_per_example, num_colors, channels
        self.from_code = nn.Conv2d(code_channels, channels, 1) if code_channels else None
        self.norm = nn.LayerNorm(hidden_dim)
        self.to_map = nn.Linear(hidden_dim, channels * 8 * 8)
        self.refine_8 = nn.Conv2d(channels, channels, 3, padding=1)
        self.up_to_15 = nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1)  # (8 - 1) * 2 + 1 = 15
        self.refine_15 = nn.Conv2d(channels, channels, 3, padding=1)
        self.to_colors = nn.Conv2d(channels, grids_per_example * num_colors * 4, 3, padding=1)
        self.to_background = nn.Linear(hidden_dim, grids_per_example * num_colors)
        self.to_sizes = nn.Linear(hidden_dim, grids_per_example * 2 * GRID_SIZE)

    def forward(self, state, cell_code=None):
        b = state.shape[0]
        state = self.norm(state)
        x = self.to_map(state).view(b, self.channels, 8, 8)
        x = F.gelu(self.refine_8(x))
        x = F.gelu(self.up_to_15(x))  # (B, channels, 15, 15)
        if self.from_code is not None:
            x = x + self.from_code(cell_code)
        x = F.gelu(self.refine_15(x))
        colors = F.pixel_shuffle(self.to_colors(x), 2).view(b, self.g, self.num_colors, GRID_SIZE, GRID_SIZE)
        colors = colors + self.to_background(state).view(b, self.g, self.num_colors, 1, 1)
        sizes = self.to_sizes(state).view(b, self.g, 2, GRID_SIZE)
        return colors, sizes


class ARCAutoencoder(nn.Module):
    """Encoder -> bottleneck (discrete message or continuous latent) -> receiver -> task head."""

    def __init__(self, encoder, vocab_size=10, max_length=5, bottleneck_type="communication",
                 task_type="reconstruction", num_distractors=3, use_input_output_pairs=False,
                 temperature=1.0, hidden_dim=None, num_classes=0, batch_negatives=False, message_norm="batch",
                 scoring="cosine", cell_channels=0):
        super().__init__()
        for what, value, allowed in (("bottleneck_type", bottleneck_type, BOTTLENECK_TYPES),
                                     ("task_type", task_type, TASK_TYPES), ("scoring", scoring, SCORINGS)):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
        if task_type == "puzzle_classification" and num_classes <= 0:
            raise ValueError(f"puzzle_classification needs num_classes above 0, got {num_classes!r}")
        hidden_dim = hidden_dim or max(encoder.latent_dim, 128)
        self.bottleneck_type, self.task_type = bottleneck_type, task_type
        self.num_distractors, self.use_input_output_pairs = num_distractors, use_input_output_pairs
        self.temperature = temperature
        # Selection and puzzle classification score by the angle between the receiver's state and each key (as
        # CLIP and Baseline++ do): with a dot product a few long vectors can win, and the sender settled on fewer
        # distinct messages (selection, 15 distractors, 60 s probes: 5.2 vs 7.6 bits of test messages).
        self.scoring = scoring
        # Selection in training: also score every other example's candidates in the batch (in-batch negatives,
        # as contrastive learning does), which asks the message for far more than telling K+1 grids apart.
        self.batch_negatives = batch_negatives
        grids_per_example = 2 if use_input_output_pairs else 1
        self.example_encoder = ExampleEncoder(encoder, grids_per_example)
        latent = encoder.latent_dim
        if bottleneck_type == "communication":
            self.sender = Sender(latent, vocab_size, max_length, hidden_dim, logit_norm=message_norm)
            self.receiver = Receiver(vocab_size, max_length, hidden_dim)
        else:
            self.receiver_net = nn.Sequential(nn.Linear(latent, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
        # Reconstruction with cell_channels: each grid's 15x15 map also crosses the bottleneck, as a cell code.
        self.cell_code = None
        if task_type == "reconstruction" and cell_channels:
            if not encoder.map_channels:
                raise ValueError("a cell code needs an encoder of at least two conv layers; set cell_channels=0")
            cell_vocab = vocab_size if bottleneck_type == "communication" else None  # None: floats
            self.cell_code = CellCode(encoder.map_channels, cell_channels, cell_vocab, message_norm)
        if task_type == "reconstruction":
            code_channels = grids_per_example * self.cell_code.out_channels if self.cell_code else 0
            self.decoder = GridDecoder(hidden_dim, encoder.num_colors, grids_per_example, code_channels=code_channels)
        elif task_type == "selection":
            self.candidate_projection = nn.Linear(latent, hidden_dim)
        else:
            self.classifier = nn.Linear(hidden_dim, num_classes, bias=scoring == "dot")

        self.batch_group = None  # see split_batch

    @property
    def encoder(self):
        return self.example_encoder.encoder

    def split_batch(self, batch_group):
        """Train on a batch split across processes: batch_group (distributed.DistributedContext) gives what the
        model computes over the whole batch (normalised logits, in-batch negatives, the rows of the Gumbel noise)."""
        for module in (self, getattr(self, "sender", None), self.cell_code):
            if module is not None:
                module.batch_group = batch_group

    def shard_parts(self):
        """[(part, methods)]: the parts a sharding wrapper (FSDP2) may gather as groups of their own, each with the
        methods besides forward the model calls it through. The classifier stays with the whole: the scores read
        its weight directly."""
        parts = [(self.example_encoder, ("encode",))]
        for name in ("sender", "receiver", "receiver_net", "cell_code", "decoder", "candidate_projection"):
            if getattr(self, name, None) is not None:
                parts.append((getattr(self, name), ()))
        return parts

    def scores(self, state, keys):
        """Receiver states (B, H) against each example's keys (B, K, H) -> (B, K), or shared keys (N, H) -> (B, N).

        In float32 even under bf16 autocast: the scores feed a softmax over up to 400 puzzles or the whole batch's
        candidates, where bf16's rounding (about 0.4% of a score of 10) would blur close calls."""
        with torch.autocast(state.device.type, enabled=False):
            return self._scores(full_precision(state), full_precision(keys))

    def _scores(self, state, keys):
        if self.scoring == "cosine":
            state, keys, scale = F.normalize(state, dim=-1), F.normalize(keys, dim=-1), COSINE_SCALE
        else:
            scale = 1 / math.sqrt(state.shape[-1])
        if keys.dim() == 3:
            return scale * torch.einsum("bkh,bh->bk", keys, state)
        return scale * state @ keys.T

    def transmit(self, latent, generator=None):
        """Latent -> receiver state, plus the message symbols (B, L, V) for communication, else None."""
        if self.bottleneck_type == "communication":
            symbols, _ = self.sender(latent, self.temperature, generator)
            return self.receiver(symbols), symbols
        return self.receiver_net(latent), None

    def forward(self, examples=None, candidates=None, target_index=None, generator=None):
        """Returns a dict of outputs; see the task heads.

        reconstruction / puzzle_classification: examples (B, G, 30, 30).
        selection: candidates (B, K+1, G, 30, 30) and target_index (B,); the sender sees the target candidate.
        generator: source of the Gumbel noise in training.
        """
        if self.task_type == "selection":
            b, k = candidates.shape[:2]
            cand_latents = self.example_encoder(candidates.flatten(0, 1)).view(b, k, -1)
            target_latent = cand_latents[torch.arange(b, device=candidates.device), target_index]
            state, symbols = self.transmit(target_latent, generator)
            keys = self.candidate_projection(cand_latents)  # (B, K+1, hidden)
            out = {"scores": self.scores(state, keys), "symbols": symbols}
            if self.training and self.batch_negatives and self.batch_group is not None:
                # every candidate of the whole batch: (B, B_all * (K+1)); this process's examples start at offset
                out["batch_scores"] = self.scores(state, self.batch_group.gather_rows(keys.flatten(0, 1)))
                out["batch_offset"] = self.batch_group.rows(b)[0]
            elif self.training and self.batch_negatives:
                out["batch_scores"] = self.scores(state, keys.flatten(0, 1))  # (B, B * (K+1))
            return out
        latents, cell_maps = self.example_encoder.encode(examples, keep_map=self.cell_code is not None)
        state, symbols = self.transmit(latents, generator)
        if self.task_type == "reconstruction":
            code = cell_symbols = None
            if self.cell_code is not None:
                code, cell_symbols = self.cell_code(cell_maps, self.temperature, generator)
            colors, sizes = self.decoder(state, code)
            return {"colors": colors, "sizes": sizes, "symbols": symbols, "cell_symbols": cell_symbols}
        logits = self.scores(state, self.classifier.weight) if self.scoring == "cosine" else self.classifier(state)
        return {"logits": logits, "symbols": symbols}


class EncoderPretrainer(nn.Module):
    """Encoder with a pretraining head: 'binary' (same puzzle?) or 'selection' (pick the target, no bottleneck)."""

    def __init__(self, encoder, mode, hidden_dim=128):
        super().__init__()
        if mode not in PRETRAIN_MODES:
            raise ValueError(f"mode must be one of {PRETRAIN_MODES}, got {mode!r}")
        self.encoder, self.mode = encoder, mode
        latent = encoder.latent_dim
        if mode == "binary":
            self.head = nn.Sequential(nn.Linear(4 * latent, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
        else:
            self.query = nn.Linear(latent, hidden_dim)
            self.key = nn.Linear(latent, hidden_dim)

    def shard_parts(self):
        """The encoder, called through its forward: a group of its own under FSDP2 (see ARCAutoencoder)."""
        return [(self.encoder, ())]

    def forward(self, first=None, second=None, candidates=None, target_index=None):
        if self.mode == "binary":
            a, b = self.encoder(first), self.encoder(second)  # (B, latent)
            return {"logits": self.head(torch.cat([a, b, (a - b).abs(), a * b], dim=1)).squeeze(1)}
        bsz, k = candidates.shape[:2]
        latents = self.encoder(candidates.flatten(0, 1)).view(bsz, k, -1)
        target = latents[torch.arange(bsz, device=candidates.device), target_index]
        scores = torch.einsum("bkh,bh->bk", self.key(latents), self.query(target)) / math.sqrt(self.query.out_features)
        return {"scores": scores}


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
