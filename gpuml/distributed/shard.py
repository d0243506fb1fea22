"""How a global batch and an evaluation split are divided between ranks, and what depends on it
(dropout keys, the rank count a checkpoint was written with). Pure Python."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuml.errors import ConfigError

if TYPE_CHECKING:
    from gpuml.data.loader import Split
    from gpuml.nn.model import Sequential


def shard_bounds(rows: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of `rows` that `rank` of `size` takes: rows // size each, the first rows % size
    ranks one more, in rank order (so the shards tile the batch in its own order)."""
    q, extra = divmod(rows, size)
    lo = rank * q + min(rank, extra)
    return lo, lo + q + (1 if rank < extra else 0)


def check_batches(samples: int, batch_size: int, drop_last: bool, size: int, source: Any) -> None:
    """Every global batch of an epoch must give each of `size` ranks at least one sample: the
    full batches and, without drop_last, the short last one. `source`: the config's (for blame)."""
    from gpuml.train.config import blame

    if size == 1:
        return
    if batch_size < size:
        raise ConfigError(blame(source, "trainer.batch_size", f"{batch_size} is the global batch, smaller "
                                f"than the {size} ranks: every rank needs at least one sample (start at "
                                f"most {batch_size} rank{'s' if batch_size != 1 else ''}, or use a larger batch)"))
    last = samples % batch_size
    if last and not drop_last and last < size:
        raise ConfigError(blame(source, "trainer.batch_size", f"the last batch of each epoch holds {last} of "
                                f"the {samples} training samples, fewer than the {size} ranks; set "
                                f"trainer.drop_last: true, or change trainer.batch_size or data.limit"))


def eval_part(split: Split, name: str, rank: int, size: int) -> Split:
    """The contiguous part of an evaluation split that `rank` scores (sums are reduced later)."""
    from gpuml.data.loader import Split

    if size == 1:
        return split
    if len(split) < size:
        raise ConfigError(f"the {name} split holds {len(split)} samples, fewer than the {size} ranks")
    lo, hi = shard_bounds(len(split), rank, size)
    return Split(split.images[lo:hi], split.labels[lo:hi])


def offset_dropout(model: Sequential, first_sample: int) -> None:
    """Key every dropout mask by the sample's index in the global batch (this rank's part starts
    at `first_sample`), so the ranks together draw the masks one process draws."""
    for layer in model.layers:
        if hasattr(layer, "sample_offset"):
            layer.sample_offset = first_sample


def check_resume_ranks(point: tuple[Path, Any], size: int, allow: bool) -> None:
    """Refuse to continue a checkpoint written with another number of ranks (older ones: 1)
    unless allowed: the sum over ranks is taken in another order, so the run would not go on
    bit for bit as it would have (the result is the same up to rounding)."""
    path, (_, _, meta) = point
    before = int(meta.get("world_size", 1))
    if before != size and not allow:
        raise ConfigError(f"--resume: {path} was written by a run on {before} rank{'s' if before != 1 else ''}, "
                          f"this one has {size}: the gradient sums would be taken in another order, so it "
                          f"would not continue bit for bit as before (the same up to rounding); pass "
                          f"--allow-config-change to accept, or start {before} rank{'s' if before != 1 else ''}")
