"""DistributedDataParallel over 2 CPU processes (gloo): prompt/key/head gradients equal single-process ones."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tcpa_kernels as tk
from tests.test_vit import TCPA_KW, images, small_vit

BATCH = 4


def _loss(model, x):
    return model(x).square().mean() + 0.01 * tk.get_matching_loss(model)


def _grads(model):
    return [p.grad.clone() for p in tk.trainable_parameters(model)]


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tk.apply_tcpa(small_vit(), backend="torch", **TCPA_KW)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    shard = images(BATCH).chunk(world)[rank]
    _loss(ddp, shard).backward()  # same forward/backward, through DDP's wrapper
    if rank == 0:
        torch.save(_grads(model), out_file)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    out_file = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    model = tk.apply_tcpa(small_vit(), backend="torch", **TCPA_KW)
    _loss(model, images(BATCH)).backward()
    ddp_grads = torch.load(out_file)
    for a, b in zip(_grads(model), ddp_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
