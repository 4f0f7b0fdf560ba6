"""The FSDP optimiser-state round trip used by resumable checkpoints, under real FSDP2 sharding on two
CPU processes (torchrun, gloo). accelerate enables FSDP only on GPUs, so the training loop's FSDP
launch cannot run here; these are the two functions the loop calls around `acc.prepare`: on save the
sharded Adam moments are gathered whole and keyed by parameter name; on resume they are scattered
into a fresh optimiser's shards, after which training continues exactly as if never interrupted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from llava_ultra.train.loop import _fsdp_optimizer_state, _load_fsdp_optimizer_state

dist.init_process_group("gloo")
rank, folder = dist.get_rank(), sys.argv[1]
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
FULL = StateDictOptions(full_state_dict=True)


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 6))
    head = nn.Linear(6, 3)  # like the LoGra-Med head: outside the model, in the same optimiser
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    groups = [{"params": list(model.parameters())}, {"params": list(head.parameters()), "lr": 5e-3}]
    return model, head, torch.optim.AdamW(groups, lr=1e-2)


def step(model, head, opt, s):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(10 * s + rank))
    head(model(x)).pow(2).sum().backward()
    for p in head.parameters():  # the head is not sharded: average its gradient like DDP would
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
    opt.step()
    opt.zero_grad()


def weights(model, head):
    return [*get_model_state_dict(model, options=FULL).values(), *[p.detach().clone() for p in head.parameters()]]


# the uninterrupted run, checkpointed after step 2
model, head, opt = build()
assert type(next(model.parameters())).__name__ == "DTensor"  # really sharded
for s in range(2):
    step(model, head, opt, s)
optim_state = _fsdp_optimizer_state(model, head, opt)  # collective; whole on rank 0
model_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    assert {"model.0.weight", "model.2.bias", "head.weight"} <= set(optim_state["state"]), sorted(optim_state["state"])
    assert optim_state["state"]["model.0.weight"]["exp_avg"].shape == (16, 8)  # gathered whole
    torch.save({"optim": optim_state, "model": model_state, "head": head.state_dict()}, folder + "/ckpt.pt")
dist.barrier()
for s in range(2, 5):
    step(model, head, opt, s)
expected = weights(model, head)


def resumed(load_moments):
    model, head, opt = build()
    ckpt = torch.load(folder + "/ckpt.pt", weights_only=False)
    set_model_state_dict(model, ckpt["model"], options=FULL)
    head.load_state_dict(ckpt["head"])
    if load_moments:  # as the loop does: only rank 0 holds the moments, the others receive them
        _load_fsdp_optimizer_state(model, head, opt, ckpt["optim"] if rank == 0 else {})
    for s in range(2, 5):
        step(model, head, opt, s)
    return max(float((a - b).abs().max()) for a, b in zip(expected, weights(model, head)))


same, restarted = resumed(True), resumed(False)
print(f"rank {rank} resumed_diff {same:.3e} restarted_diff {restarted:.3e}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_optimizer_state_round_trip_resumes_exactly(tmp_path: Path):
    script = tmp_path / "fsdp_roundtrip.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    number = r"(\d\.\d+e[+-]\d+)"  # the two ranks' lines may interleave without a newline
    found = re.findall(rf"rank (\d) resumed_diff {number} restarted_diff {number}", proc.stdout)
    assert sorted(r for r, _, _ in found) == ["0", "1"], proc.stdout
    for _, resumed_diff, restarted_diff in found:
        assert float(resumed_diff) <= 1e-7, found  # restored moments: the uninterrupted weights
        assert float(restarted_diff) > 1e-4, found  # restarting Adam would have shown (the test can fail)
