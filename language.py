"""Emergent-language analysis of a split's messages, as EGG's language_analysis judges a protocol: topographic
similarity, per-position entropy and symbol usage, and plug-in estimates of what the message says about the grid.

Pure functions of tensors (no trainer, no Flask). A message is (L,) symbol ids; messages are (N, L). Grids are what
the sender saw for each example, (N, G, 30, 30) colour ids with `pad` outside the real area. Entropies are in bits.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import CROP_SIDES, GRID_SIZE, grid_extents

# Topographic similarity reads the pairs of a fixed sample: 500 examples give 124,750 pairs, enough for a stable
# correlation, while the grids' distances (computed once per split) stay a few MB.
TOPSIM_SAMPLE = 500
TOP_MESSAGES = 10  # the messages panel: the most frequent messages of the split...
EXAMPLES_PER_MESSAGE = 3  # ...with this many of the grids that got each
GRID_CELLS = GRID_SIZE * GRID_SIZE


# ---------------------------------------------------------------------------------------------- entropies

def entropy_of_counts(counts):
    """Plug-in entropy (bits) of the distribution these counts give."""
    p = counts[counts > 0].double() / counts.sum()
    return max(0.0, float(-(p * p.log2()).sum()))  # max: -0.0 and rounding below zero read as 0


def row_codes(rows):
    """(N, K) non-negative ids -> (N,) one number per row, equal for equal rows and ordered as the rows are
    (lexicographically): the row read as a mixed-radix number where that fits in 62 bits, else its rank among the
    distinct rows. One-dimensional unique is several times faster than unique over rows."""
    bases = rows.amax(0) + 1
    if float(bases.double().log2().sum()) >= 62:
        return torch.unique(rows, dim=0, return_inverse=True)[1]
    weights = torch.ones_like(bases)
    weights[:-1] = bases.flip(0)[:-1].cumprod(0).flip(0)  # the first column weighs most
    return (rows * weights).sum(1)


def entropy(rows):
    """Plug-in entropy (bits) of the rows of a (N, K) tensor, each row one outcome."""
    return entropy_of_counts(torch.unique(row_codes(rows), return_counts=True)[1])


def conditional_entropy(messages, labels):
    """Plug-in H(M | Y) = H(M, Y) - H(Y) in bits: messages (N, L), labels (N,) one outcome of Y per example."""
    labels = labels.to(messages.dtype)[:, None]
    return max(0.0, entropy(torch.cat([messages, labels], 1)) - entropy(labels))


def symbol_usage(messages, vocab_size):
    """(L, V): at each position, the share of messages that use each symbol there."""
    return F.one_hot(messages, vocab_size).sum(0).double() / len(messages)


def position_entropies(usage):
    """(L, V) symbol usage -> (L,) the entropy (bits) of the symbol at each position; 0 is a collapsed position."""
    logs = torch.where(usage > 0, usage.log2(), torch.zeros_like(usage))
    return (-(usage * logs).sum(1)).clamp_min(0.0)


# ---------------------------------------------------------------------------------------------- what the grids are

def colour_counts(grids, pad):
    """(N, G, 30, 30) -> (N,) how many distinct colours the sender saw in each example (all its grids together)."""
    present = torch.zeros(len(grids), pad + 1, dtype=torch.long, device=grids.device)
    return present.scatter_(1, grids.flatten(1).long(), 1)[:, :pad].sum(1)


def size_buckets(grids, pad):
    """(N, G, 30, 30) -> (N,) the side of the encoder's crop (model.CROP_SIDES) of each example: its grid's, or the
    larger of its grids' for a pair."""
    sides = grid_extents(grids.flatten(0, 1), pad).view(len(grids), -1).amax(1)
    crops = torch.tensor(CROP_SIDES, device=grids.device)
    return crops[torch.bucketize(sides, crops)]


def grid_shapes(grids, pad):
    """(N, 30, 30) -> (N,) one code per (height, width) of the real area."""
    real = grids != pad
    return real.any(2).sum(1) * (GRID_SIZE + 1) + real.any(1).sum(1)


# ---------------------------------------------------------------------------------------------- distances

def hamming_distances(ids, num_values):
    """(N, K) ids in [0, num_values) -> (N, N) long: in how many of the K places two rows differ, from one one-hot
    matmul that counts the places where they agree (whole numbers below 2 ** 24: exact in float32)."""
    one_hot = F.one_hot(ids.long(), num_values).flatten(1).float()
    return ids.shape[1] - (one_hot @ one_hot.T).round().long()


def grid_distances(grids, pad):
    """(N, G, 30, 30) -> (N, N) long: Hamming over the padded 30x30 grids, summed over an example's grids, a grid of
    another size counting as all its 900 cells differing.

    Grids of one size only are compared cell by cell, so the one-hot matmuls run per size, on the real area: most
    pairs differ in size. One matmul over every grid's 30x30 cells took 14 ms for ARC-AGI-1's 348 validation
    grids, 8% of the default model's validation pass; per size, 3.3 ms (each timed alone)."""
    n = len(grids)
    total = torch.zeros(n, n, dtype=torch.long, device=grids.device)
    for g in range(grids.shape[1]):
        flat = grids[:, g]
        shapes = grid_shapes(flat, pad)
        part = torch.full((n, n), GRID_CELLS, dtype=torch.long, device=grids.device).fill_diagonal_(0)
        kinds, counts = torch.unique(shapes, return_counts=True)
        for shape in kinds[counts > 1].tolist():  # a grid whose size no other shares differs from the rest in full
            index = (shapes == shape).nonzero().squeeze(1)
            rows, cols = divmod(shape, GRID_SIZE + 1)
            crop = flat[index, :rows, :cols].flatten(1)
            part[index[:, None], index[None, :]] = hamming_distances(crop, pad + 1)
        total += part
    return total


def edit_distances(messages, lengths):
    """(N, L) symbol ids of which each row's first lengths[i] count -> (N, N) long Levenshtein distances, for
    messages of varying length; the dynamic programme runs over all pairs at once, L x L steps."""
    n, most = messages.shape
    a, b = messages[:, None, :], messages[None, :, :]
    steps = torch.arange(most + 1, device=messages.device)
    row = steps.view(-1, 1, 1).expand(-1, n, n).clone()  # row[j]: distance from a's first i symbols to b's first j
    done = torch.zeros(n, n, dtype=torch.long, device=messages.device)
    done += torch.where(lengths[:, None] == 0, lengths[None, :], 0)
    for i in range(1, most + 1):
        new = [torch.full((n, n), i, dtype=torch.long, device=messages.device)]
        for j in range(1, most + 1):
            substitute = row[j - 1] + (a[:, :, i - 1] != b[:, :, j - 1]).long()
            new.append(torch.minimum(torch.minimum(row[j] + 1, new[j - 1] + 1), substitute))
        row = torch.stack(new)
        ends = row.gather(0, lengths.view(1, 1, n).expand(1, n, n))[0]  # each pair's distance at b's length
        done = torch.where(lengths[:, None] == i, ends, done)
    return done


def message_distances(messages, vocab_size, lengths=None):
    """(N, N) long distances between messages, and the name of the distance: Hamming where every message has the
    same length (as the Gumbel-softmax sender's all do), else edit distance."""
    if lengths is None or bool((lengths == messages.shape[1]).all()):
        return hamming_distances(messages, vocab_size), "hamming"
    return edit_distances(messages, lengths), "edit"


# ---------------------------------------------------------------------------------------------- topographic similarity

def average_ranks(values):
    """(P,) non-negative integers -> (P,) float64 ranks from 1, ties given their average rank (as Spearman's
    correlation, and scipy's rankdata, rank them); a count per value, no sort."""
    counts = torch.bincount(values)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[values]


def centred_ranks(values):
    """(ranks - their mean, their norm): what the correlation of these values' ranks with others' needs."""
    ranks = average_ranks(values)
    ranks = ranks - ranks.mean()
    return ranks, float(ranks.norm())


def correlation(centred_a, norm_a, centred_b, norm_b):
    """Pearson's correlation of two centred vectors; None where either is constant (undefined, not NaN)."""
    if norm_a == 0 or norm_b == 0:
        return None
    return max(-1.0, min(1.0, float(centred_a @ centred_b) / (norm_a * norm_b)))


def spearman(a, b):
    """Spearman's correlation of two (P,) integer vectors; None where either is constant."""
    return correlation(*centred_ranks(a), *centred_ranks(b))


def sample_indices(n, size=TOPSIM_SAMPLE):
    """Up to `size` indices spread evenly over 0..n-1: the same examples at every validation, whatever the seed."""
    if n <= size:
        return torch.arange(n)
    return torch.linspace(0, n - 1, size).round().long().unique()


@dataclass(frozen=True)
class Reference:
    """What a split's analysis needs of its grids, computed once: they do not change between validations."""
    grids: torch.Tensor  # (N, G, 30, 30) uint8: what the sender saw, for the examples of the top messages
    colours: torch.Tensor  # (N,) distinct colours of each example
    sizes: torch.Tensor  # (N,) crop side of each example
    sample: torch.Tensor  # (S,) the examples topographic similarity reads
    pairs: torch.Tensor  # (2, S * (S - 1) / 2) the sample's pairs, i < j
    grid_ranks: torch.Tensor  # (P,) the pairs' grid distances as centred ranks
    grid_norm: float
    pad: int


def reference(grids, pad, sample_size=TOPSIM_SAMPLE):
    """The Reference of a split whose examples showed the sender `grids` (N, G, 30, 30), in evaluation order."""
    sample = sample_indices(len(grids), sample_size)
    pairs = torch.triu_indices(len(sample), len(sample), 1)
    distances = grid_distances(grids[sample], pad)[pairs[0], pairs[1]]
    ranks, norm = centred_ranks(distances)
    return Reference(grids=grids.to(torch.uint8), colours=colour_counts(grids, pad), sizes=size_buckets(grids, pad),
                     sample=sample, pairs=pairs, grid_ranks=ranks, grid_norm=norm, pad=pad)


def topographic_similarity(messages, ref, vocab_size, lengths=None):
    """Spearman's correlation between the sample's pairwise grid and message distances; None where either is
    constant. And the message distance's name."""
    sample = ref.sample
    distances, kind = message_distances(messages[sample], vocab_size, None if lengths is None else lengths[sample])
    if len(sample) < 2:
        return None, kind
    ranks, norm = centred_ranks(distances[ref.pairs[0], ref.pairs[1]])
    return correlation(ref.grid_ranks, ref.grid_norm, ranks, norm), kind


# ---------------------------------------------------------------------------------------------- the messages panel

def crop(grid, pad):
    """(30, 30) ids -> rows of ids over the real area, as the page draws grids."""
    real = grid != pad
    return grid[:int(real.any(1).sum()), :int(real.any(0).sum())].tolist()


def top_messages(messages, grids, pad, k=TOP_MESSAGES, examples=EXAMPLES_PER_MESSAGE):
    """The k most frequent messages, most frequent first (ties in the order of the messages' ids): each its symbols,
    count, share, and the grids of its first `examples` examples (in split order), each a list of its grids."""
    _, inverse, counts = torch.unique(row_codes(messages), return_inverse=True, return_counts=True)
    chosen = torch.sort(-counts, stable=True).indices[:k]
    by_message = torch.argsort(inverse, stable=True)  # example indices grouped by message, in split order
    starts = counts.cumsum(0) - counts
    top = []
    for u in chosen.tolist():
        start = int(starts[u])
        first = by_message[start:start + min(examples, int(counts[u]))]
        top.append({"message": messages[first[0]].tolist(), "count": int(counts[u]),
                    "share": int(counts[u]) / len(messages),
                    "examples": [[crop(g, pad) for g in grids[i]] for i in first.tolist()]})
    return top


# ---------------------------------------------------------------------------------------------- all of it

def analyse(messages, ref, vocab_size, cell_symbols=0):
    """A split's messages (N, L) against its Reference -> (scalars for the validation metrics, the details the
    page draws: symbol usage per position, the top messages). cell_symbols: how many cell-code symbols each
    example also sent, which this analysis leaves out (it reads the L-symbol message)."""
    usage = symbol_usage(messages, vocab_size)
    per_position = position_entropies(usage)
    topsim, distance = topographic_similarity(messages, ref, vocab_size)
    h = entropy(messages)
    h_colours, h_size = conditional_entropy(messages, ref.colours), conditional_entropy(messages, ref.sizes)
    scalars = {"topsim": topsim,
               "position_entropy_mean": float(per_position.mean()), "position_entropy_min": float(per_position.min()),
               "h_message": h, "h_message_given_colours": h_colours, "h_message_given_size": h_size,
               "mi_colours": max(0.0, h - h_colours), "mi_size": max(0.0, h - h_size)}
    details = {"num_messages": len(messages), "positions": messages.shape[1], "vocab_size": vocab_size,
               "usage": [[round(x, 4) for x in row] for row in usage.tolist()],
               "position_entropy": per_position.tolist(), "top_messages": top_messages(messages, ref.grids, ref.pad),
               "topsim_examples": len(ref.sample), "message_distance": distance, "cell_symbols": cell_symbols,
               **scalars}
    return scalars, details


# ---------------------------------------------------------------------------------------------- from a record

SUMMARY_SCALARS = ("topsim", "position_entropy_mean", "position_entropy_min", "h_message", "h_message_given_colours",
                   "h_message_given_size", "mi_colours", "mi_size")
SUMMARY_COUNTS = ("global_step", "num_messages", "positions", "vocab_size", "topsim_examples", "cell_symbols")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary(details):
    """The language details a checkpoint carries -> what `load_checkpoint.py --info` shows: the figures and the top
    messages' symbols and counts (no grids); None for none. A record is a file that may lie: raises ValueError
    naming the first field that is not what analyse() writes."""
    if details is None:
        return None
    if not isinstance(details, dict):
        raise ValueError(f"language is a {type(details).__name__}, not a dict")
    for key in SUMMARY_SCALARS:  # None: constant messages have no topographic similarity
        if details.get(key) is not None and not _is_number(details[key]):
            raise ValueError(f"language.{key} is {details[key]!r}, not a number")
    for key in SUMMARY_COUNTS:
        if details.get(key) is not None and not (isinstance(details[key], int) and details[key] >= 0):
            raise ValueError(f"language.{key} is {details[key]!r}, not a count")
    top = details.get("top_messages", [])
    if not isinstance(top, list) or not all(isinstance(t, dict) and isinstance(t.get("message"), list)
                                            and all(isinstance(s, int) for s in t["message"])
                                            and isinstance(t.get("count"), int) for t in top):
        raise ValueError("language.top_messages is not a list of messages with their counts")
    figures = {k: details.get(k) for k in SUMMARY_COUNTS + SUMMARY_SCALARS if k in details}
    if "message_distance" in details:
        figures["message_distance"] = str(details["message_distance"])
    return {**figures, "top_messages": [{"message": t["message"], "count": t["count"]} for t in top]}
