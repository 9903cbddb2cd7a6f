"""Two CPU processes (gloo): a hand-written DDP loop on a patched model with
gradient accumulation, normalised by ``global_num_items``, and IQTrainer under
DDP with gradient accumulation, match single-process gradients."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

WORLD = 2
V = 61
OPTIONS = dict(td_weight=0.3, gamma=0.9)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def padded_rows(n=8, T=12, seed=5):
    """Sequences of very different lengths (so ranks hold different token counts)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        L = [12, 3, 10, 4, 11, 5, 12, 3][i % 8]
        ids = torch.zeros(T, dtype=torch.long)
        ids[:L] = torch.randint(3, V, (L,), generator=g)
        attn = (torch.arange(T) < L).long()
        rows.append({"input_ids": ids, "attention_mask": attn,
                     "labels": ids.masked_fill(attn == 0, -100)})
    return rows


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


# Rank r's micro-batches in the plain DDP loop (two per optimizer step): rank 0
# holds far more tokens than rank 1, and its micro-batches differ in size.
MICRO = {0: [[0, 2], [4]], 1: [[1], [3]]}
SHARDS = {r: [i for mb in mbs for i in mb] for r, mbs in MICRO.items()}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from fastirl.integrations import IQConfig, IQTrainer, apply_fastirl, global_num_items
    transformers.logging.set_verbosity_error()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)

    # (a) A hand-written DDP loop on a patched model with gradient accumulation:
    # one num_items_in_batch for the whole optimizer step, all ranks and micro-batches
    # (global count / world size, since DDP averages gradients), the loss as it comes.
    import fastirl.distributed
    assert global_num_items is fastirl.distributed.global_num_items
    model = tiny_llama()
    apply_fastirl(model, backend="torch", **OPTIONS)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rows = padded_rows()
    micro = [stack([rows[i] for i in mb]) for mb in MICRO[rank]]
    n = global_num_items([mb["labels"][:, 1:] for mb in micro])
    with ddp.no_sync():                                        # accumulate locally...
        ddp(**micro[0], num_items_in_batch=n).loss.backward()
    ddp(**micro[1], num_items_in_batch=n).loss.backward()      # ...then average over ranks
    if rank == 0:
        torch.save({"n": float(n), "grads": {k: p.grad for k, p in model.named_parameters()}},
                   os.path.join(out_dir, "loop.pt"))

    # (b) IQTrainer under DDP (accelerate, gloo), 2 ranks x 2 sequences x 2 accumulation steps.
    model = tiny_llama()
    args = IQConfig(output_dir=os.path.join(out_dir, f"run{rank}"), report_to=[], use_cpu=True,
                    save_strategy="no", disable_tqdm=True, max_steps=1, logging_steps=1,
                    per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                    lr_scheduler_type="constant", train_sampling_strategy="sequential",
                    dataloader_num_workers=0, seed=0, loss_backend="torch", bf16=False,
                    gradient_checkpointing=False, **OPTIONS)
    trainer = IQTrainer(model, args, train_dataset=ListDataset(rows))
    assert trainer.accelerator.num_processes == WORLD
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer.train()
    update = {k: before[k] - p.detach() for k, p in model.named_parameters()}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, update)
    if rank == 0:
        torch.save({"updates": gathered, "log": trainer.state.log_history},
                   os.path.join(out_dir, "trainer.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_batch_grads(rows, per_rank_mean_of=None):
    """Gradient of the mean IQ loss over ``rows`` in one process; with
    ``per_rank_mean_of``, the naive average of per-shard means instead."""
    from fastirl.integrations import apply_fastirl
    model = tiny_llama()
    apply_fastirl(model, backend="torch", **OPTIONS)
    if per_rank_mean_of is None:
        model(**stack(rows)).loss.backward()
    else:
        for idx in per_rank_mean_of:
            (model(**stack([rows[i] for i in idx])).loss / len(per_rank_mean_of)).backward()
    return {k: p.grad for k, p in model.named_parameters()}


def _close(a, b, rtol=1e-4):
    return all((a[k] - b[k]).abs().max() <= rtol * (b[k].abs().max() + 1e-6) for k in b)


def test_two_process_ddp_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 150
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process run did not finish within 150 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    rows = padded_rows()
    # (a) the loop: global normalisation == one process on all rows of both shards.
    loop = torch.load(tmp_path / "loop.pt")
    used = SHARDS[0] + SHARDS[1]
    count = int((stack([rows[i] for i in used])["labels"][:, 1:] != -100).sum())
    assert loop["n"] == count / WORLD
    want = _full_batch_grads([rows[i] for i in used])
    assert _close(loop["grads"], want)
    # The check can fail: averaging per-rank means weighs tokens unequally.
    naive = _full_batch_grads(rows, per_rank_mean_of=[SHARDS[0], SHARDS[1]])
    assert not _close(naive, want)

    # (b) the trainer: both ranks made the same update, the full-batch gradient.
    out = torch.load(tmp_path / "trainer.pt")
    u0, u1 = out["updates"]
    assert _close(u0, u1, rtol=1e-6)
    assert _close(u0, _full_batch_grads(rows))
    assert any("nll" in h for h in out["log"])
