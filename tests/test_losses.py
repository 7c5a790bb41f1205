"""InfoNCE against hand-computed values, false-negative grouping and the DDP gather."""

from __future__ import annotations

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scripts.losses import ContrastiveInfoNCELoss, gather_keys, gather_with_grad, pair_keys, positive_groups


def test_infonce_two_by_two_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))
    row1 = -math.log(math.exp(1.6) / (math.exp(0) + math.exp(1.6)))
    col0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    col1 = -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    loss = ContrastiveInfoNCELoss()(image, text, scale)
    assert abs(loss.item() - expected) < 1e-6


def test_false_negatives_become_soft_positives():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = image.clone()
    scale = torch.tensor(3.0)
    logits = 3.0 * image @ text.T
    # items 0 and 1 share a study: each row's target is 1/2 on both
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    groups = positive_groups(pair_keys(["s1", "s1", "s2"], ["a", "b", "c"]))
    assert groups.tolist() == [0, 0, 2]
    loss = ContrastiveInfoNCELoss()(image, text, scale, groups)
    assert torch.allclose(loss, expected)
    # and it differs from treating item 1 as a negative of item 0
    assert not torch.allclose(loss, ContrastiveInfoNCELoss()(image, text, scale))


def test_groups_join_same_study_or_identical_report_transitively():
    keys = pair_keys(["a", "b", "c", "d", "e"], ["x", "y", "y  ", "z", "w"])
    keys[3, 0] = keys[2, 0]  # d shares c's study; c shares b's report (whitespace-normalised)
    assert positive_groups(keys).tolist() == [0, 1, 1, 1, 4]


def _ddp_worker(rank: int, world: int, port: int, image: torch.Tensor, text: torch.Tensor, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        weight = torch.nn.Parameter(torch.eye(4))
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4, bias=False))
        with torch.no_grad():
            model.module.weight.copy_(weight)
        shard = slice(rank * 2, rank * 2 + 2)
        keys = pair_keys([f"s{i}" for i in range(4)][shard], [f"t{i}" for i in range(4)][shard])
        groups = positive_groups(gather_keys(keys))
        loss = ContrastiveInfoNCELoss()(
            gather_with_grad(model(image[shard])), gather_with_grad(text[shard]), torch.tensor(5.0), groups
        )
        loss.backward()
        if rank == 0:
            torch.save((loss.detach(), model.module.weight.grad.clone()), result)
    finally:
        dist.destroy_process_group()


def test_ddp_gather_gives_the_single_process_gradient(tmp_path):
    torch.manual_seed(0)
    image, text = torch.randn(4, 4), torch.randn(4, 4)
    single = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        single.weight.copy_(torch.eye(4))
    loss = ContrastiveInfoNCELoss()(single(image), text, torch.tensor(5.0), positive_groups(pair_keys(list("abcd"), list("wxyz"))))
    loss.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "rank0.pt"
    mp.start_processes(_ddp_worker, args=(2, port, image, text, str(result)), nprocs=2, start_method="spawn")
    ddp_loss, ddp_grad = torch.load(result)
    assert torch.allclose(ddp_loss, loss.detach(), atol=1e-6)
    assert torch.allclose(ddp_grad, single.weight.grad, atol=1e-6)
