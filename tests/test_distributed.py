"""The data-parallel pieces of amendlm.distributed without launching: two processes simulated in one."""

from __future__ import annotations

import pytest
import torch

from amendlm.distributed import (data_parallel_loss, gather_rows, global_order, launched_rank, split_rows,
                                 zero_anchor)
from amendlm.unlearn import losses


class FakeAccelerator:
    """Process ``rank`` of ``world``: ``gather`` returns every process's padded share (given up front)."""

    def __init__(self, world: int, rank: int, shares: list[torch.Tensor] | None = None):
        self.num_processes, self.process_index, self.shares = world, rank, shares

    def gather(self, tensor):
        width = tensor.shape[0]
        padded = [torch.cat([s, s.new_zeros(width - s.shape[0])]) for s in self.shares]
        padded[self.process_index] = tensor
        return torch.cat(padded)


def test_split_rows_deals_rows_round_robin_and_marks_empty_shares():
    rows = ["a", "b", "c"]
    assert split_rows(rows, 2, 0) == (["a", "c"], False)
    assert split_rows(rows, 2, 1) == (["b"], False)
    assert split_rows(rows, 4, 3) == (["a"], True)  # 3 rows, 4 processes: the last one runs a placeholder
    assert split_rows(rows, 1, 0) == (rows, False)
    with pytest.raises(ValueError, match="empty global batch"):
        split_rows([], 2, 0)


def test_global_order_interleaves_the_shares_back():
    # 5 rows on 2 processes: process 0 has rows 0, 2, 4, process 1 rows 1, 3 (+ one padding row)
    shares = [torch.tensor([0.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, -1.0])]
    assert global_order(shares, 5).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_gathered_rows_keep_only_the_own_graph():
    values = torch.arange(5.0)
    shares = [values[r::2].clone().requires_grad_() for r in range(2)]
    gathered = gather_rows(shares[1], 5, FakeAccelerator(2, 1, [s.detach() for s in shares]))
    assert gathered.tolist() == values.tolist()
    gathered.sum().backward()
    assert shares[1].grad.tolist() == [1.0, 1.0] and shares[0].grad is None
    one = torch.ones(3, requires_grad=True)
    assert gather_rows(one, 3, FakeAccelerator(1, 0)) is one  # one process: no copy, no communication


@pytest.mark.parametrize("reduction", ["sequence", "batch_mean", "batch_sequence_mean"])
def test_two_simulated_processes_give_the_one_process_gradient(reduction):
    """N * L back-propagated by each process, averaged like DDP, equals dL/dtheta on the global batch."""
    torch.manual_seed(0)
    theta = torch.randn(3, requires_grad=True)
    features = torch.randn(5, 3)
    reference_logps, n_tokens = torch.randn(5), torch.tensor([1, 2, 3, 4, 5])

    def loss_of(policy_logps, n):
        return losses.npo_loss(policy_logps, reference_logps, 0.5, n, reduction) + losses.ce_loss(policy_logps, n)

    loss_of(features @ theta, n_tokens).backward()
    expected, theta.grad = theta.grad.clone(), None

    world, grads = 2, []
    shares = [(features @ theta)[r::world].detach() for r in range(world)]
    for rank in range(world):
        accelerator = FakeAccelerator(world, rank, shares)
        rows, _ = split_rows(list(range(5)), world, rank)
        local = features[rows] @ theta
        policy_logps = gather_rows(local, 5, accelerator)
        n = gather_rows(n_tokens[rows], 5, FakeAccelerator(world, rank, [n_tokens[r::world] for r in range(world)]))
        data_parallel_loss(loss_of(policy_logps, n), accelerator).backward()
        grads.append(theta.grad.clone())
        theta.grad = None
    torch.testing.assert_close(sum(grads) / world, expected)  # DDP's average


def test_zero_anchor_adds_nothing_but_reaches_the_parameters():
    theta = torch.ones(2, requires_grad=True)
    anchor = zero_anchor([theta * 3, None, torch.ones(2)])
    assert anchor.item() == 0.0
    anchor.backward()
    assert theta.grad.tolist() == [0.0, 0.0]
    assert zero_anchor([torch.ones(2)]) == 0.0


def test_launched_rank_reads_the_launcher_environment(monkeypatch):
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched_rank() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert launched_rank() == 3
    monkeypatch.setenv("RANK", "1")
    assert launched_rank() == 1


def test_only_the_main_process_log_touches_the_file(tmp_path):
    from amendlm.unlearn.artifacts import StepLog

    seen = []
    StepLog(tmp_path / "log.jsonl", None, seen.append, enabled=False).write({"step": 1})
    assert not (tmp_path / "log.jsonl").exists() and seen == []
    StepLog(tmp_path / "log.jsonl", None, seen.append).write({"step": 1})
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n' and seen == [{"step": 1}]


def test_a_checkpoint_gives_each_process_its_own_rng_state(tmp_path):
    from amendlm.unlearn.artifacts import load_checkpoint, rng_state, save_checkpoint

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state())
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, {"step": 3}, states)
    draws = {}
    for process_index in (0, 1, 2):  # 2: a run resumed by more processes than wrote it gets process 0's
        assert load_checkpoint(tmp_path / "checkpoint", model, optimizer, process_index) == {"step": 3}
        draws[process_index] = torch.rand(1).item()
    for process_index, seed in ((0, 1), (1, 2), (2, 1)):
        torch.manual_seed(seed)
        assert draws[process_index] == torch.rand(1).item()


def test_check_device_takes_what_the_command_can_place_and_this_machine_has(monkeypatch):
    import re

    from amendlm.distributed import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one CUDA card
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("cpu", "auto", "cuda"):
        check_device(device)  # training commands: Accelerate places the model
    for device in ("cpu", "cpu:0", "cuda", "cuda:0"):
        check_device(device, index=True)  # commands that call model.to(device)
    refused = {("cuda:0", False): "--device cuda:0: give the type only (cuda), no card index",
               ("auto", True): "--device auto: not a device (cpu, cuda, cuda:1, mps, ...)",
               ("cuda:1", True): "--device cuda:1: this machine has 1 cuda device(s), cuda:0 to cuda:0",
               ("gpu", False): "--device gpu: not a device (auto, cpu, cuda, mps, ...)",
               ("cuda:x", True): "--device cuda:x: not a device"}
    for (device, index), said in refused.items():
        with pytest.raises(ValueError, match="^" + re.escape(said)):
            check_device(device, index=index)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--opt cuda: no such accelerator on this machine [(]use auto or cpu[)]"):
        check_device("cuda", "--opt")
