"""Data parallelism under ``accelerate launch``: N processes, the same global batch as one process.

The training commands (``debias``, ``align train``) take their batch sizes as the **global** batch
of one optimizer step, whatever the number of processes.  Under ``accelerate launch
--num_processes N`` every process draws the same global batch (same seeds), keeps the rows
``rank, rank + N, rank + 2N, ...`` of it (:func:`split_rows`) and runs the model on those only.
:func:`gather_rows` then puts the per-sequence results of all processes (summed log-probs, token
counts, summed KL: ``(rows,)`` tensors, never logits) back into the global order, the process's own
rows keeping their autograd graph and the others' arriving detached.  Every process computes the
same loss ``L`` on the whole global batch, so the logged loss, the NaN check and every decision
agree across processes.

Gradients: process ``r`` back-propagates ``N * L`` (:func:`data_parallel_loss`), whose gradient
only flows through its own rows ``S_r``: ``g_r = N * sum_{i in S_r} dL/dx_i * dx_i/dtheta``.  DDP
averages the ``N`` gradients, ``(1/N) * sum_r g_r = sum_i dL/dx_i * dx_i/dtheta = dL/dtheta``:
exactly the one-process gradient of the same loss on the same batch, for any loss (also the
batch-level ones: NPO's ``batch_mean``, the token-mean CE and KL), up to floating-point rounding.
A process whose share is empty (a global batch smaller than ``N``) runs the model on the batch's
first row as a placeholder and adds it to the loss times zero, so that DDP still receives a
(zero) gradient for every parameter from it.

With one process every function here is the identity (no communication).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence, TypeVar

import torch

T = TypeVar("T")

RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")  # torchrun, Intel MPI, Open MPI, MVAPICH


def launched_rank() -> int:
    """This process's global rank as the launcher set it (``accelerate launch`` / torchrun: ``RANK``;
    MPI launchers: their own variables); 0 when not launched.

    Read from the environment, so a command can decide before any model or ``Accelerator`` exists
    whether it is the main process (the one that prints and shows progress bars).
    """
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def is_main_launched_process() -> bool:
    """True in the process that prints (rank 0, or the only process); see :func:`launched_rank`."""
    return launched_rank() == 0


def device_type_only(said: str, device: str) -> str:
    """The one refusal of a device with a card index where Accelerate places the model (``debias``,
    ``align train``): ``"<said>: give the type only (cuda), no card index; choose the card with ..."``.

    Args:
        said: how the caller names the value (``"--device cuda:1"``, ``"device='cuda:1'"``).
        device: the value, e.g. ``cuda:1``.
    """
    return (f"{said}: give the type only ({device.split(':')[0]}), no card index; choose the card with "
            "CUDA_VISIBLE_DEVICES or accelerate launch")


def check_device(device: str, option: str = "--device", index: bool = False) -> None:
    """Refuse, before any model loads, a device that Accelerate would silently replace by the CPU, or
    that ``model.to`` would fail on only after the weights were read.

    ``cpu`` always passes; an accelerator type (``cuda``, ``mps``, ``xpu``, ...) passes when torch
    reports one present.  The training commands, whose models Accelerate places (``index=False``:
    ``debias`` and ``align train``), take ``cpu``, ``auto`` (an accelerator when Accelerate finds one,
    else the CPU) and an accelerator type without an index: Accelerate gives each process its own card
    (choose cards with ``CUDA_VISIBLE_DEVICES`` or ``accelerate launch``).  The commands that put the
    model on the device themselves (``index=True``: ``align sample / generate / eval``, ``eval``,
    ``serve``, ``merge``) take ``cpu`` or a torch device string, a card index included (``cuda:1``,
    checked against the cards present), and not ``auto``.

    Raises:
        ValueError: one line naming ``option`` and the value: an index where the type only is taken,
            a name torch does not know, an accelerator this machine does not have, or a card index
            beyond those present.
    """
    if device == "cpu" or (device == "auto" and not index):
        return
    if ":" in device and not index:
        raise ValueError(device_type_only(f"{option} {device}", device))
    try:
        parsed = torch.device(device)
    except RuntimeError:
        valid = "cpu, cuda, cuda:1, mps, ..." if index else "auto, cpu, cuda, mps, ..."
        raise ValueError(f"{option} {device}: not a device ({valid})") from None
    if parsed.type == "cpu":
        return
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    if not (callable(getattr(backend, "is_available", None)) and backend.is_available()):
        raise ValueError(f"{option} {device}: no such accelerator on this machine (use {'cpu' if index else 'auto or cpu'})")
    counter = getattr(torch.mps if parsed.type == "mps" else backend, "device_count", None)
    count = counter() if callable(counter) else None
    if parsed.index is not None and count is not None and parsed.index >= count:
        raise ValueError(f"{option} {device}: this machine has {count} {parsed.type} device(s), "
                         f"{parsed.type}:0 to {parsed.type}:{count - 1}")


def split_rows(rows: Sequence[T], world: int, rank: int) -> tuple[list[T], bool]:
    """Process ``rank``'s share of a global batch: ``rows[rank::world]``.

    Returns:
        ``(share, placeholder)``: ``placeholder`` is True when the share would be empty
        (``len(rows) <= rank``); the share is then ``rows[:1]``, to be run and counted zero
        (:func:`zero_anchor`), so that every process takes part in the backward pass.

    Raises:
        ValueError: an empty global batch, or ``rank`` outside ``[0, world)``.
    """
    if not rows:
        raise ValueError("empty global batch")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    share = list(rows[rank::world])
    return (share, False) if share else ([rows[0]], True)


def global_order(per_process: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    """Interleave the processes' ``(m, ...)`` padded shares back into the global ``(total, ...)`` batch.

    ``per_process[r][p]`` is global row ``p * world + r`` (the rows :func:`split_rows` gave process
    ``r``); padding rows map past ``total`` and are dropped.  Pure (no communication).
    """
    stacked = torch.stack(list(per_process), dim=1)  # (m, world, ...): [p, r] = global row p * world + r
    return stacked.reshape(-1, *stacked.shape[2:])[:total]


def gather_rows(local: torch.Tensor, total: int, accelerator) -> torch.Tensor:
    """``(n_local, ...)`` results of this process's share -> ``(total, ...)`` of the global batch, in global order.

    The own rows are ``local`` itself (autograd graph kept); the other processes' rows are
    detached copies.  ``n_local`` is ``len(rows[rank::world])`` (0 for a placeholder share: pass
    ``local[:0]``).  With one process returns ``local``.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return local
    width = -(-total // world)  # rows per process, the shorter shares padded with zeros
    padded = torch.cat([local, local.new_zeros((width - local.shape[0], *local.shape[1:]))]) if local.shape[0] < width else local
    gathered = accelerator.gather(padded.detach().contiguous()).reshape(world, width, *local.shape[1:])
    per_process = [padded if r == rank else gathered[r] for r in range(world)]
    return global_order(per_process, total)


def zero_anchor(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor | float:
    """``0 * sum`` of the given tensors: adds nothing to a loss but keeps their graph (placeholder shares)."""
    present = [t.sum() for t in tensors if t is not None and t.requires_grad]
    return 0.0 * torch.stack(present).sum() if present else 0.0


def data_parallel_loss(loss: torch.Tensor, accelerator) -> torch.Tensor:
    """What each process back-propagates for a loss computed on the gathered global batch: ``N * loss``
    (DDP divides the summed gradients by ``N``; see the module docstring)."""
    return loss * accelerator.num_processes if accelerator.num_processes > 1 else loss


def main_process_value(value: Any, accelerator) -> Any:
    """The main process's ``value`` in every process (e.g. a dtype that ``auto`` chose by timing,
    which could differ between processes)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def every_process_value(value: Any, accelerator) -> list:
    """``[value of process 0, value of process 1, ...]`` in every process (e.g. their RNG states)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))
