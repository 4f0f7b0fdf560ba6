"""The FSDP optimiser-state round trip that resumable checkpoints use, under real FSDP2 sharding on
two CPU processes (torchrun, gloo). accelerate enables FSDP only on GPUs, so the trainer's FSDP
launch cannot run here (docs/training.md gives the GPU check); under FSDP `accelerator.save_state` /
`load_state` call accelerate's `save_fsdp_optimizer` / `load_fsdp_optimizer` with the plugin of
configs/accelerate/fsdp.yaml (FSDP2, FULL_STATE_DICT), and these are run here: on save the sharded
Adam moments are gathered whole and keyed by parameter name; on resume they are scattered into a
fresh optimiser's shards, after which training continues exactly as if never interrupted."""

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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import load_fsdp_optimizer, save_fsdp_optimizer

acc = Accelerator(cpu=True)
rank, folder = acc.process_index, sys.argv[1]
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
assert acc.distributed_type == DistributedType.MULTI_CPU  # gloo; accelerate itself enables FSDP only on GPUs
FULL = StateDictOptions(full_state_dict=True)

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 6))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(next(model.parameters())).__name__ == "DTensor"  # really sharded
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

def step(model, opt, s):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(10 * s + rank))
    model(x).pow(2).sum().backward()
    opt.step(); opt.zero_grad()

model, opt = build()
for s in range(2): step(model, opt, s)
save_fsdp_optimizer(plugin, acc, opt, model, folder)  # what acc.save_state runs under FSDP
if rank == 0:
    state = torch.load(folder + "/optimizer.bin", weights_only=True)["state"]
    assert state["0.weight"]["exp_avg"].shape == (16, 8), sorted(state)  # gathered whole, keyed by name
ms = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0: torch.save(ms, folder + "/m.pt")
dist.barrier()
for s in range(2, 5): step(model, opt, s)
expected = list(get_model_state_dict(model, options=FULL).values())
def resumed(load):
    model, opt = build()
    set_model_state_dict(model, torch.load(folder + "/m.pt"), options=FULL)
    if load:  # what acc.load_state runs under FSDP: rank 0 reads, the shards are scattered
        load_fsdp_optimizer(plugin, acc, opt, model, folder)
    for s in range(2, 5): step(model, opt, s)
    return max(float((a - b).abs().max()) for a, b in zip(expected, get_model_state_dict(model, options=FULL).values()))
print(f"rank {rank} resumed_diff {resumed(True):.3e} restarted_diff {resumed(False):.3e}", flush=True)
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
