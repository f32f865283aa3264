"""Out-of-memory in a training step: re-raised naming the step and the batch that hit it.

CUDA raises :class:`torch.OutOfMemoryError`; a failed CPU allocation raises ``RuntimeError``
("DefaultCPUAllocator: can't allocate memory") or :class:`MemoryError`. All of them become one
``torch.OutOfMemoryError`` whose message says where it happened and what to try, with the
original error chained. Lightning then stops the run as for any exception: the checkpoints
already on disk are untouched, so ``fit --ckpt_path last`` resumes from the last good one.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

_CPU_ALLOCATION_FAILURES = ("can't allocate memory", "out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a GPU or CPU allocation failure."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in message for m in _CPU_ALLOCATION_FAILURES)


def step_location(global_step: int, batch_idx: int, names: Sequence[str] | None = None) -> str:
    """``"global step 12, batch 3 (samples ['a', 'b']...)"``: where a failure happened."""
    where = f"global step {global_step}, batch {batch_idx}"
    if names:
        where += f" (samples {list(names[:4])}{'...' if len(names) > 4 else ''})"
    return where


class LocatedOutOfMemoryError(torch.OutOfMemoryError):
    """An out-of-memory error whose message names the step and the batch."""


@contextmanager
def locate_out_of_memory(where: str, phase: str) -> Iterator[None]:
    """Re-raise an allocation failure inside the block as :class:`LocatedOutOfMemoryError`.

    Args:
        where: The step and batch (:func:`step_location`).
        phase: What was running (``forward``, ``backward``).
    """
    try:
        yield
    except LocatedOutOfMemoryError:
        raise
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise LocatedOutOfMemoryError(
            f"out of memory in the {phase} pass at {where}: {str(err).splitlines()[0]}. Lower "
            "data.batch_size (raise trainer.accumulate_grad_batches to keep the effective "
            "batch), use a smaller dtype or fewer tokens per stream; the checkpoints on disk "
            "are kept, resume with `fit --ckpt_path last`"
        ) from err
