"""DeepSpeed ZeRO-3 (CPU accelerator, gloo, 2 processes) on a tiny Hugging Face
Llama patched by apply_fastirl: the partitioned LM head (its weight has a
``ds_id``) is gathered by running the loss through the head module's
``__call__``; the loss and every gradient equal a single process on the whole
batch, and so do ``extract_rewards`` (through the same head path) after the step.  Needs deepspeed (not a dependency of fastirl); slow: DeepSpeed's CPU
accelerator JIT-compiles a communication op on first use.

This file is also the worker: ``python test_hf_zero3.py --worker RANK PORT OUT``."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
OPTIONS = dict(td_weight=0.3, gamma=0.9)
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
             "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed
    from _hf import tiny_llama
    from test_hf_fsdp import batch, num_items

    from fastirl.integrations import apply_fastirl, extract_rewards
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    model = tiny_llama()
    apply_fastirl(model, backend="torch", **OPTIONS)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=DS_CONFIG)
    assert hasattr(model.lm_head.weight, "ds_id")
    b = batch()
    local = {k: v[2 * rank:2 * rank + 2] for k, v in b.items()}
    loss = engine(**local, num_items_in_batch=num_items(local)).loss      # grads averaged
    engine.backward(loss)
    total = loss.detach() / WORLD
    torch.distributed.all_reduce(total)
    grads = {n: deepspeed.utils.safe_get_full_grad(p).clone()
             for n, p in engine.module.named_parameters()}
    rewards = extract_rewards(engine, local)          # the head gathered by its module hooks
    gathered = [torch.empty_like(rewards) for _ in range(WORLD)]
    torch.distributed.all_gather(gathered, rewards)
    if rank == 0:
        torch.save({"loss": total, "grads": grads, "rewards": torch.cat(gathered)},
                   out / "zero3.pt")
    torch.distributed.barrier()


@pytest.mark.slow
def test_zero3_matches_single_process(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    from _hf import assert_grads_close, launch_workers
    from test_hf_fsdp import single_process, single_process_rewards
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
    got, = launch_workers(__file__, WORLD, tmp_path, ["zero3.pt"], timeout=900, **env)
    want_loss, want_grads = single_process()
    torch.testing.assert_close(got["loss"], want_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(got["grads"], want_grads, rtol=1e-4)
    torch.testing.assert_close(got["rewards"].double(), single_process_rewards(), rtol=1e-4,
                               atol=1e-5)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
