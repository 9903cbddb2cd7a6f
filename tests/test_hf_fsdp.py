"""FSDP2 on a tiny Hugging Face Llama, 2 CPU processes (gloo): the patched forward's
loss and every gradient equal a single process on the whole batch.

* "accelerate": accelerate's FSDP2 (``fully_shard`` per decoder layer, then the
  root, which holds the LM head; accelerate only enables FSDP on GPUs, so the
  test switches its state to FSDP after creating the Accelerator on the CPU).
* "head_unit": ``fully_shard(model.lm_head)`` as its own unit: the loss runs
  through the head module's ``__call__`` so FSDP2 gathers it for the loss and the
  backward pass and reduce-scatters its gradient.

Each rank normalises by ``fastirl.distributed.global_num_items`` (global count /
world size: FSDP2 averages gradients).  After the step, ``extract_rewards`` on
the sharded model (the root gathers its parameters, the head unit its weight)
equals the rewards of the unsharded model's own logits.

One pair of processes runs both cases (start-up dominates the time).  This file
is also the worker: ``python test_hf_fsdp.py --worker RANK PORT OUT``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

WORLD = 2
OPTIONS = dict(td_weight=0.3, gamma=0.9)
CASES = ("accelerate", "head_unit")


def batch():
    """4 rows of different lengths with a prompt; rank r gets rows 2r, 2r + 1."""
    from _hf import LLAMA
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, LLAMA["vocab_size"], (4, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    attn[2, 3:] = 0
    ids = ids.masked_fill(attn == 0, 0)
    labels = ids.masked_fill(attn == 0, -100)
    labels[0, :4] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def num_items(local):
    """``num_items_in_batch`` of this rank's rows: the one rule, whatever the
    framework (DDP, FSDP2, ZeRO-3 average gradients over ranks)."""
    from fastirl.distributed import global_num_items
    return global_num_items(local["labels"][:, 1:])


def single_process():
    """Loss and gradients of the whole batch in one process (the reference)."""
    from _hf import grads, tiny_llama

    from fastirl.integrations import apply_fastirl
    model = tiny_llama()
    apply_fastirl(model, backend="torch", **OPTIONS)
    model.train()
    b = batch()
    loss = model(**b).loss
    loss.backward()
    return loss.detach(), grads(model)


def single_process_rewards():
    """The rewards of the unsharded model's own logits (extract_rewards' alignment)."""
    from _hf import reference_rewards, tiny_llama
    return reference_rewards(tiny_llama().eval(), batch(), OPTIONS["gamma"])


# --------------------------------------------------------------------------- worker


def _worker(rank: int, port: int, out: Path) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    for case in CASES:                    # "accelerate" first: it creates the process group
        _case(case, rank, out)
    dist.barrier()
    dist.destroy_process_group()


def _case(case: str, rank: int, out: Path) -> None:
    import torch.distributed as dist
    from _hf import tiny_llama

    from fastirl.integrations import apply_fastirl, extract_rewards, is_fastirl_applied
    model = tiny_llama()
    apply_fastirl(model, backend="torch", **OPTIONS)
    if case == "accelerate":
        from accelerate import Accelerator, FullyShardedDataParallelPlugin
        from accelerate.utils import DistributedType
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True)
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        accelerator.state.distributed_type = DistributedType.FSDP   # CPU: not set by accelerate
        accelerator.state.fsdp_plugin = plugin
        model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)
        fully_shard(model)
    assert is_fastirl_applied(model)
    model.train()
    b = batch()
    local = {k: v[2 * rank:2 * rank + 2] for k, v in b.items()}
    # Token mean of the whole batch: FSDP2 averages the gradients over ranks.
    loss = model(**local, num_items_in_batch=num_items(local)).loss
    loss.backward()
    total = loss.detach() / WORLD
    dist.all_reduce(total)
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in model.named_parameters() if p.grad is not None}
    # Rewards of the sharded model at rest (parameters resharded after backward).
    rewards = extract_rewards(model, local)
    gathered = [torch.empty_like(rewards) for _ in range(WORLD)]
    dist.all_gather(gathered, rewards)
    if rank == 0:
        torch.save({"loss": total, "grads": grads, "rewards": torch.cat(gathered)},
                   out / f"{case}.pt")


# --------------------------------------------------------------------------- test

import pytest  # noqa: E402


def test_fsdp2_matches_single_process(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from _hf import assert_grads_close, launch_workers
    results = launch_workers(__file__, WORLD, tmp_path, [f"{case}.pt" for case in CASES],
                             timeout=240)
    want_loss, want_grads = single_process()
    want_rewards = single_process_rewards()
    for case, got in zip(CASES, results):
        torch.testing.assert_close(got["loss"], want_loss, rtol=1e-5, atol=1e-6, msg=case)
        assert_grads_close(got["grads"], want_grads, rtol=1e-4)
        torch.testing.assert_close(got["rewards"].double(), want_rewards, rtol=1e-4, atol=1e-5,
                                   msg=case)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
