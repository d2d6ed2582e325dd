"""What the language analysis adds to a validation pass: Trainer.evaluate with it and without it, side by side.

    python bench/language.py           # the default model, and the selection preset's; 10 rounds of each
    python bench/language.py --quick   # the default model only, 3 rounds (under a minute)

A model as Trainer.setup() builds it (the analysis costs the same whatever the weights say), ARC-AGI-1's
validation split. Rounds alternate with and without, so load from elsewhere hits both alike. "Without" runs the
same evaluate with language.analyse and the split's reference stubbed out: what evaluate cost before the analysis.
Two figures a row: a validation pass (the split's reference, its grids' distances, built once at setup and
kept), and, for context, a pass that builds the reference again, as the first validation did before Trainer.setup
built it. A validation pass varies by 10-30% from one to the
next here, more than the analysis costs, so each row also times the analysis itself inside the passes with it
(language.analyse and language.reference): its share of the pass is the steadier figure.
"""
import argparse
import contextlib
import time
from unittest import mock

from common import LoadWatch, add_wait_option, header, idle_check, percentile, verdict, wait_for_idle

import language  # noqa: E402
from data import load_data  # noqa: E402
from train import PRESETS, TrainConfig, Trainer  # noqa: E402

TARGET = 1.05  # the analysis adds under 5% to a validation pass


@contextlib.contextmanager
def without_analysis(trainer):
    """evaluate as it was before the analysis: no reference built, and analyse returns nothing."""
    with mock.patch.object(language, "analyse", lambda *args, **kwargs: ({}, None)), \
            mock.patch.object(trainer, "_language_reference", lambda batches: None):
        yield


@contextlib.contextmanager
def analysis_timed(spent):
    """evaluate as it is, the seconds it spends in language.analyse and language.reference added to spent[0]."""
    def timing(function):
        def timed_call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started
        return timed_call
    with mock.patch.object(language, "analyse", timing(language.analyse)), \
            mock.patch.object(language, "reference", timing(language.reference)):
        yield


def timed(trainer, first=False):
    """Seconds of one validation pass (evaluate over the validation split); first: the reference built in it."""
    if first:
        trainer._language_references = {}
    started = time.perf_counter()
    trainer.evaluate(trainer.model, trainer.val_batches, trainer.task.loss)
    return time.perf_counter() - started


def measure(trainer, rounds):
    """{(later or first, with, without or analysis): [seconds]} over alternating rounds; analysis: the time the
    passes with it spent in it."""
    times = {(when, how): [] for when in ("later", "first") for how in ("with", "without", "analysis")}
    timed(trainer)  # warm-up: first allocations, and the reference for the "later" rounds
    for _ in range(rounds):
        for when in ("later", "first"):
            spent = [0.0]
            with analysis_timed(spent):
                times[(when, "with")].append(timed(trainer, first=when == "first"))
            times[(when, "analysis")].append(spent[0])
            with without_analysis(trainer):
                times[(when, "without")].append(timed(trainer))
    return times


def row(name, config, data, rounds, wait_idle):
    if wait_idle:
        waited, others = wait_for_idle(wait_idle)
        print(f"waited {waited:.0f} s for the cores: other processes now keep {others:.2f} busy")
    trainer = Trainer(config, data, "cpu", "unused", publish=lambda e: None)
    trainer.setup()
    examples = len(trainer.val_batches.units)
    watch = LoadWatch()
    times = measure(trainer, rounds)
    medians = {key: percentile(values, 50) for key, values in times.items()}
    print(f"{name}: {examples} validation examples, {len(trainer.val_batches)} batches of {config.batch_size}, "
          f"{rounds} rounds")
    ratios = {}
    for when, what in (("later", "a validation (reference built at setup)"),
                       ("first", "a pass that builds the reference")):
        with_s, without_s = medians[(when, "with")], medians[(when, "without")]
        ratios[when] = with_s / without_s
        judged = f"(< {TARGET}: {verdict(ratios[when] < TARGET)})" if when == "later" else "(once a run, at setup)"
        print(f"  {what:<40} with {with_s * 1000:7.1f} ms / without {without_s * 1000:7.1f} ms = "
              f"{ratios[when]:.3f}  {judged}")
        inside = [a / w for a, w in zip(times[(when, "analysis")], times[(when, "with")])]
        share = percentile(inside, 50)
        print(f"  {'':<40} the analysis itself: {medians[(when, 'analysis')] * 1000:.1f} ms, "
              f"{share * 100:.1f}% of the pass with it (median of rounds; max {max(inside) * 100:.1f}%): "
              f"adds {share / (1 - share) * 100:.1f}% to the pass without it"
              + (f" (< 5%: {verdict(share / (1 - share) < TARGET - 1)})" if when == "later" else ""))
        print(f"    every round, ms: with {' '.join(f'{t * 1000:.1f}' for t in times[(when, 'with')])}; without "
              f"{' '.join(f'{t * 1000:.1f}' for t in times[(when, 'without')])}")
    print(f"  {watch.line()}")
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default model only, 3 rounds")
    add_wait_option(parser)
    args = parser.parse_args()
    rounds = 3 if args.quick else 10
    header("language analysis: a validation pass with and without it")
    print(f"target: with / without < {TARGET} (the analysis adds under 5%)")
    print(f"before start: other processes kept {idle_check():.2f} cores busy")
    data = load_data("arcagi")
    rows = {"default model (reconstruction, communication, cell code 8)": TrainConfig(device="cpu")}
    if not args.quick:
        selection = {k: v for k, v in PRESETS["selection"].values.items() if k != "epochs"}
        rows["selection preset (3 distractors)"] = TrainConfig(device="cpu", **selection)
    for name, config in rows.items():
        row(name, config, data, rounds, args.wait_idle)


if __name__ == "__main__":
    main()
