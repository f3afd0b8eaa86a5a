"""Worker for tests/test_distributed.py: one `scalebio reweight` run on however many ranks torchrun starts.

    torchrun --nproc_per_node 2 tests/distributed_worker.py CONFIG OUT_DIR [key=value ...]

Each rank writes OUT_DIR/rank<r>.json: the world size it saw, the LISA blocks it activated at every step, its
final λ, the sharding mode and CPU offload, and how many parameter elements of u and w it holds.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scalebio import lisa as lisa_mod
from scalebio.config import load_config
from scalebio.reweight import Reweighting


def main() -> None:
    config, out, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    seen = []
    original = lisa_mod.Lisa.update

    def recording_update(self, step, optimizer):
        changed = original(self, step, optimizer)
        seen.append([self.stream, step, list(self.active)])
        return changed

    lisa_mod.Lisa.update = recording_update
    rw = Reweighting(load_config(config, overrides))
    stop = os.environ.get("STOP_AFTER")
    rw.run_loop(stop_after=int(stop) if stop else None, progress=False)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    Path(out).mkdir(parents=True, exist_ok=True)
    # With FSDP each rank holds a shard of every parameter of u and w: count the elements it really holds.
    params = list(rw.solver.u.parameters()) + list(rw.solver.w.parameters())
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "world_size": world, "lisa": seen, "lambda": rw.solver.lam.detach().tolist(),
        "sharding": rw.sharding, "offload": rw.offload,
        "local_numel": local, "numel": sum(p.numel() for p in params)}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
