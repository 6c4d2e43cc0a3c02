"""Two gloo CPU processes under DDP give the loss, penalty, GroupDRO state and gradients of one
process on the concatenated batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fastfair.distributed import all_reduce_sum
from fastfair.losses import FairnessLoss

CASES = [(p, "torch", torch.float64) for p in ("variance", "std", "range", "worst", "cvar")]
CASES += [("variance", "triton", torch.float32)]
D, C, G = 5, 4, 3
SPLIT = 5  # rank 0 gets rows [0, 5), rank 1 rows [5, 12): uneven on purpose


def batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(12, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (12,), generator=gen)
    y[[1, 7]] = -100
    # Group 2 lives on rank 1 only, so local and global group means differ.
    g = torch.tensor([0, 1, 0, 1, 0, 2, 2, 1, 0, 2, 1, 2])
    return x, y, g


def train(penalty, backend, dtype, rows=slice(None), wrap=lambda m: m):
    """Two SGD steps; returns per-step (loss, penalty, group_loss, grads) and the final state."""
    torch.manual_seed(0)
    model = wrap(nn.Linear(D, C).to(dtype))
    fn = FairnessLoss(G, lam=0.8, penalty=penalty, step_size=0.5, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    for step in range(2):
        x, y, g = batch(step)
        out = fn(model(x[rows].to(dtype)), y[rows], g[rows])
        opt.zero_grad()
        out.loss.backward()
        steps.append(dict(loss=out.loss.detach(), penalty=out.penalty.detach(),
                          group_loss=out.group_loss, group_count=out.group_count,
                          grads=[p.grad.clone() for p in model.parameters()]))
        opt.step()
    fn.check()
    state = {k: v.clone() for k, v in fn.state_dict().items()}
    return steps, state


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        wrap = lambda m: nn.parallel.DistributedDataParallel(m)  # noqa: E731
        results = {case: train(*case, rows=rows, wrap=wrap) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Tear down together: a rank that destroys its gloo group while the other still holds the
        # connection was seen to abort ('terminate called without an active exception').
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case in CASES:
        single_steps, single_state = train(*case)
        dtype = case[2]
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        for r in ranks:
            steps, state = r[case]
            for got, want in zip(steps, single_steps):
                for key in ("loss", "penalty", "group_loss", "group_count"):
                    torch.testing.assert_close(got[key], want[key], equal_nan=True, **tol, msg=f"{case} {key}")
                for gp, wp in zip(got["grads"], want["grads"]):
                    torch.testing.assert_close(gp, wp, **tol, msg=f"{case} grads")
            for k in single_state:  # the GroupDRO weights
                torch.testing.assert_close(state[k], single_state[k], **tol)
        # The penalty must actually differ from what one rank alone would compute.
        local = train(*case, rows=slice(0, SPLIT))[0][0]["penalty"]
        assert not torch.allclose(local, single_steps[0]["penalty"])


def test_all_reduce_is_identity_without_a_process_group():
    assert not dist.is_initialized()
    t = torch.randn(3, requires_grad=True)
    assert all_reduce_sum(t) is t
