"""Worker for tests/test_distributed.py: does a DeepSpeed ZeRO engine follow LISA's switch of trainable blocks?

    torchrun --nproc_per_node 2 tests/deepspeed_lisa_worker.py STAGE OUT.json

A 2-block Llama starts with block 1 frozen (LISA's first draw), goes into ``deepspeed.initialize``, takes one
step, then switches as ``scalebio.lisa.Lisa.update`` does (block 0 frozen, block 1 trainable) and takes another.
Rank 0 writes how far each block moved in each step. This is the measurement behind `scalebio reweight` keeping
FSDP under a DeepSpeed launch (scalebio.sharding).
"""

import json
import sys

import torch
import torch.distributed as dist


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    blocks = model.model.layers
    blocks[1].requires_grad_(False)
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-2, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))

    def flat(i: int) -> torch.Tensor:
        params = list(blocks[i].parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            return torch.cat([p.detach().flatten().clone() for p in params])

    def step() -> list[float]:
        before = [flat(0), flat(1)]
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        return [float((flat(i) - before[i]).abs().max()) for i in range(2)]

    moved = {"before_switch": step()}
    blocks[0].requires_grad_(False)  # the LISA switch
    blocks[1].requires_grad_(True)
    moved["after_switch"] = step()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(moved, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
