"""Distributed support (fastirl.distributed): vocabulary parallelism, data
parallelism (global_num_items with DDP) and FSDP2, on CPU with gloo.

The multi-process tests launch this file as a script (one process per rank,
a TCP store on 127.0.0.1 at a free port, 30 s collective timeouts, and a hard
deadline after which the parent kills the workers, so nothing can hang).  One
launch per world size runs every scenario and saves each rank's outputs; the
tests below compare them, in this process, with the float64 reference
(``fastirl.reference``) and the single-process ``fastirl.iq_loss`` on the
gathered weight.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn

import fastirl
from fastirl import distributed as fd
from fastirl import reference

ROOT = Path(__file__).resolve().parents[1]
V, H, B, T = 11, 8, 3, 9
SHARDS = {2: [6, 5], 3: [5, 2, 4]}           # uneven, and V = 11 divides by neither
DEADLINE = {2: 150, 3: 150}                   # seconds per launch before the workers are killed
_NON_REF = ("chunk_size", "backend", "preset")


def _native_ready() -> str | None:
    """Loads (building it once if needed) the native CPU extension here, so that the
    workers load it without compiling.  None when ready, else why not."""
    from fastirl.backends import get_backend
    try:
        get_backend("cpu")
    except RuntimeError as exc:
        return str(exc)
    return None


NATIVE_MISSING = _native_ready()
NATIVE_READY = NATIVE_MISSING is None
# "auto" would compile the native extension in every worker when it is not built
DEFAULT_BACKEND = "auto" if NATIVE_READY else "torch"


# --------------------------------------------------------------------------- scenarios

def _spec(name: str) -> dict:
    """Options and input flavour of a vocabulary-parallel scenario."""
    specs = {
        "default": {},
        "chunked": {"opts": {"chunk_size": 4}},
        "chunk1_nobias": {"bias": False, "opts": {"chunk_size": 1}},
        "hellinger": {"opts": {"divergence": "hellinger", "td_weight": 0.5}},
        "js": {"opts": {"divergence": "js", "td_weight": 0.5, "chunk_size": 5}},
        "kl": {"opts": {"divergence": "kl"}},
        "kl_fix": {"opts": {"divergence": "kl_fix", "gamma": 0.9}},
        "total_variation": {"opts": {"divergence": "total_variation"}},
        "online_all": {"expert": True, "opts": {"td_rows": "all", "chunk_size": 3}},
        "online_value_expert": {"expert": True, "opts": {"value_term": "value_expert"}},
        "v0": {"expert": True, "opts": {"value_term": "v0", "gamma": 0.8}},
        "detach_next": {"opts": {"detach_next_value": True, "gamma": 0.95, "chunk_size": 4}},
        "softcap_temp": {"opts": {"softcap": 2.0, "temperature": 0.7, "chunk_size": 4}},
        "temperature": {"opts": {"temperature": 1.7, "td_weight": 1.0}},
        "packed": {"packed": True, "opts": {"chunk_size": 5}},
        "done": {"done": True, "opts": {"chunk_size": 4}},
        "none": {"opts": {"reduction": "none"}},
        "none_softcap_chunked": {"opts": {"reduction": "none", "softcap": 3.0,
                                          "temperature": 0.8, "chunk_size": 2}},
        "sum": {"opts": {"reduction": "sum", "gamma": 0.9}},
        "metrics": {"opts": {"return_metrics": True, "chunk_size": 4}},
        "metrics_ties": {"ties": True, "opts": {"return_metrics": True}},
        "metrics_none": {"opts": {"return_metrics": True, "reduction": "none",
                                  "temperature": 0.6}},
        "ignore_minus_one": {"ignore": -1, "opts": {"ignore_index": -1}},
        "num_items": {"opts": {"num_items_in_batch": 7, "chunk_size": 3}},
        "flat_2d": {"flat": True, "opts": {"chunk_size": 4}},
        "hidden_no_grad": {"hidden_grad": False},
        "no_grad": {"no_grad": True, "opts": {"return_metrics": True}},
        "all_ignored": {"all_ignored": True},
        "float32": {"dtype": torch.float32, "opts": {"chunk_size": 5, "softcap": 4.0}},
        "bfloat16": {"dtype": torch.bfloat16},
        "convenience": {"convenience": True, "expert": True, "packed": True},
        # the native C++ backend as the inner backend (only where already built)
        "native_f32": {"backend": "cpu", "dtype": torch.float32, "opts": {"chunk_size": 5}},
        "native_none": {"backend": "cpu", "dtype": torch.float32,
                        "opts": {"reduction": "none", "softcap": 3.0, "temperature": 0.8,
                                 "chunk_size": 3}},
        "native_metrics": {"backend": "cpu", "dtype": torch.float32, "expert": True,
                           "opts": {"return_metrics": True, "td_rows": "all",
                                    "softcap": 5.0, "temperature": 1.3}},
        "native_bf16": {"backend": "cpu", "dtype": torch.bfloat16, "opts": {"chunk_size": 4}},
    }
    return specs[name]


VOCAB_CASES = [
    "default", "chunked", "chunk1_nobias", "hellinger", "js", "kl", "kl_fix",
    "total_variation", "online_all", "online_value_expert", "v0", "detach_next",
    "softcap_temp", "temperature", "packed", "done", "none", "none_softcap_chunked", "sum",
    "metrics", "metrics_ties", "metrics_none", "ignore_minus_one", "num_items", "flat_2d",
    "hidden_no_grad", "no_grad", "all_ignored", "float32", "bfloat16", "convenience",
]
NATIVE_CASES = ["native_f32", "native_none", "native_metrics", "native_bf16"]
ERROR_CASES = ["batch_rows", "hidden_size", "dtype", "targets_differ", "one_rank_empty",
               "empty_shard", "target_range", "backend_batch_check"]


def make_case(name: str) -> dict:
    """The full (unsharded) inputs of a scenario, identical in every process."""
    spec = _spec(name)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dtype = spec.get("dtype", torch.float64)
    ignore = spec.get("ignore", -100)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < 0.2] = ignore
    targets[:, :2] = ignore
    targets[-1, T // 2:] = ignore
    opts = dict(spec.get("opts", {}), backend=spec.get("backend", "torch"))
    if spec.get("ties"):
        # two identical rows in different shards of every layout (1: rank 0;
        # 8: rank 1 of [6, 5], rank 2 of [5, 2, 4]) that dominate every row:
        # argmax must be the first one, 1, as for torch.argmax on full logits
        weight[8] = weight[1]
        bias[1] = bias[8] = 20.0
        targets[0, 2:] = 8
        targets[1, 2:5] = 1
    if spec.get("all_ignored"):
        targets[:] = ignore
    if spec.get("expert"):
        opts["is_expert"] = torch.tensor([True, False, True])
    if spec.get("packed"):
        pos = torch.cat([torch.arange(4), torch.arange(T - 4)]).repeat(B, 1)
        pos[1] = torch.arange(T)
        opts["position_ids"] = pos
    if spec.get("done"):
        done = torch.zeros(B, T, dtype=torch.bool)
        done[0, 4] = done[2, 6] = True
        opts["done"] = done
    if spec.get("flat"):           # (N, H) rows read as one sequence: said explicitly
        hidden, targets = hidden.reshape(B * T, H), targets.reshape(B * T)
        opts["position_ids"] = torch.arange(B * T)
    upstream = None
    if opts.get("reduction") == "none":
        upstream = torch.randn(targets.shape, generator=g, dtype=torch.float64)
    return {"hidden": hidden.to(dtype), "weight": weight.to(dtype),
            "bias": bias.to(dtype) if spec.get("bias", True) else None,
            "targets": targets, "opts": opts, "upstream": upstream,
            "hidden_grad": spec.get("hidden_grad", True), "no_grad": spec.get("no_grad", False),
            "convenience": spec.get("convenience", False)}


def _shard(world: int, rank: int) -> slice:
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _run_loss(case: dict, weight, bias, loss_fn, **extra):
    """Loss (and metrics) and gradients (hidden, weight, bias) of one scenario."""
    hidden = case["hidden"].clone().requires_grad_(case["hidden_grad"] and not case["no_grad"])
    weight = weight.clone().requires_grad_(not case["no_grad"])
    bias = None if bias is None else bias.clone().requires_grad_(not case["no_grad"])
    with torch.set_grad_enabled(not case["no_grad"]):
        out = loss_fn(hidden, weight, case["targets"], bias=bias, **case["opts"], **extra)
    loss, metrics = out if isinstance(out, tuple) else (out, None)
    grads = [None, None, None]
    if not case["no_grad"]:
        up = case["upstream"]
        total = loss.sum() if up is None else (loss * up.to(loss.dtype)).sum()
        total.backward()
        grads = [t.grad if t is not None else None for t in (hidden, weight, bias)]
    return {"loss": loss.detach(), "metrics": metrics, "dhidden": grads[0], "dweight": grads[1],
            "dbias": grads[2]}


# --------------------------------------------------------------------------- worker side

def _vocab_case(name: str, rank: int, world: int) -> dict:
    case = make_case(name)
    sl = _shard(world, rank)
    w = case["weight"][sl]
    b = None if case["bias"] is None else case["bias"][sl]
    if case["convenience"]:
        return _run_loss(case, w, b, fd.vocab_parallel_iq_loss,
                         process_group=torch.distributed.group.WORLD)
    return _run_loss(case, w, b, fastirl.iq_loss, process_group=torch.distributed.group.WORLD)


def _error_case(name: str, rank: int, world: int) -> str:
    """Runs a scenario whose ranks disagree; returns the error message (or '')."""
    group = torch.distributed.group.WORLD
    case = make_case("default")
    sl = _shard(world, rank)
    hidden, weight, targets = case["hidden"], case["weight"][sl], case["targets"]
    loss_fn = fastirl.iq_loss
    if name == "batch_rows":          # a different batch size on the last rank
        if rank == world - 1:
            hidden, targets = hidden[:-1], targets[:-1]
    elif name == "hidden_size":       # a different hidden size on the last rank
        if rank == world - 1:
            hidden, weight = hidden[..., :-1], weight[:, :-1]
    elif name == "dtype":
        if rank == world - 1:
            hidden, weight = hidden.float(), weight.float()
    elif name == "targets_differ":    # same shapes, other targets (checked by the fingerprint)
        loss_fn = fd.vocab_parallel_iq_loss
        if rank == 0:
            targets = targets.clone()
            targets[0, 3] = (targets[0, 3] + 1) % V if targets[0, 3] >= 0 else 2
    elif name == "one_rank_empty":    # one rank has no action row at all
        loss_fn = fd.vocab_parallel_iq_loss
        if rank == 0:
            targets = torch.full_like(targets, -100)
    elif name == "empty_shard":
        weight = case["weight"][: (0 if rank == 1 else V)]
    elif name == "target_range":      # a target >= the global vocabulary
        targets = targets.clone()
        targets[1, 4] = V
    elif name == "backend_batch_check":   # vocab_parallel(batch=...): other position_ids
        pos = torch.arange(T).repeat(B, 1)
        if rank == world - 1:
            pos[1, 5] = 0
        try:
            fd.vocab_parallel(group, weight, DEFAULT_BACKEND, batch=dict(
                hidden=hidden, targets=targets, position_ids=pos))
        except ValueError as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""
    try:
        loss_fn(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets,
                process_group=group, backend=DEFAULT_BACKEND).backward()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


class Tiny(nn.Module):
    """embedding -> linear -> tanh -> LM head, with the fused loss in forward."""

    def __init__(self, vocab=13, hidden=8, mode="module", **options):
        super().__init__()
        self.mode = mode
        self.emb = nn.Embedding(vocab, hidden)
        self.lin = nn.Linear(hidden, hidden)
        head = nn.Linear(hidden, vocab)
        if mode in ("module", "module_none"):
            self.head = fd.FusedLMHeadLoss(head, **options)
        else:
            self.lm_head = head

    def hidden(self, ids):
        return torch.tanh(self.lin(self.emb(ids)))

    def forward(self, ids, targets=None, **per_batch):
        h = self.hidden(ids)
        return self.head(h, targets, **per_batch) if hasattr(self, "head") else h


FSDP_MODES = ["module", "module_none", "ctx", "root"]
TINY_OPTS = {"td_weight": 0.3, "gamma": 0.9, "backend": DEFAULT_BACKEND}


def tiny_batch(world: int):
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 13, (2 * world, 7), generator=g)
    targets = torch.randint(0, 13, (2 * world, 7), generator=g)
    targets[:, :2] = -100
    targets[0, 4:] = -100             # uneven token counts across ranks
    targets[-1, 1:] = -100
    return ids, targets


def tiny_loss(model, ids, targets, mode, **per_batch):
    if mode == "module":
        return model(ids, targets, **per_batch)
    if mode == "module_none":
        per_row = model(ids, targets, reduction="none")
        n = per_batch.get("num_items_in_batch")
        n = (targets != -100).sum() if n is None else n
        return per_row.sum() / n
    h = model(ids)
    with fd.gathered_lm_head(model.lm_head) as head:
        return fastirl.iq_loss(h, head.weight, targets, bias=head.bias, **TINY_OPTS,
                               **per_batch)


def _fsdp_case(mode: str, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = Tiny(mode=mode, **TINY_OPTS).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.lin, mesh=mesh)
    if mode in ("module", "module_none"):
        fully_shard(model.head, mesh=mesh, reshard_after_forward=True)   # worst case
    elif mode == "ctx":
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)              # "root": the head is in the root unit
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, targets = tiny_batch(world)
    mine = slice(2 * rank, 2 * rank + 2)
    out = {"init": init, "losses": [], "grads": []}
    for _ in range(2):
        n = fd.global_num_items(targets[mine])
        loss = tiny_loss(model, ids[mine], targets[mine], mode, num_items_in_batch=n)
        loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        out["losses"].append(total / world)  # mean over ranks of sum_rank l / (N / W)
        out["grads"].append({k: p.grad.full_tensor() for k, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    if mode == "ctx":                        # evaluation: gathered_lm_head reshards on exit
        with torch.no_grad():
            h = model(ids[mine])
            with fd.gathered_lm_head(model.lm_head) as head:
                out["eval_unsharded"] = not isinstance(head.weight, DTensor)
                ev = fastirl.iq_loss(h, head.weight, targets[mine], bias=head.bias, **TINY_OPTS,
                                     reduction="sum")
            out["eval_resharded"] = isinstance(model.lm_head.weight, DTensor)
        torch.distributed.all_reduce(ev)
        out["eval_sum"] = ev
    return out


def _ddp_case(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Tiny(mode="module", **TINY_OPTS).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ddp = DDP(model)
    ids, targets = tiny_batch(world)
    mine = slice(2 * rank, 2 * rank + 2)
    loss = ddp(ids[mine], targets[mine], num_items_in_batch=fd.global_num_items(targets[mine]))
    loss.backward()
    return {"init": init, "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
            "num_items": fd.global_num_items([targets[mine][:1], targets[mine][1:]]),
            "num_items_sum": fd.global_num_items(targets[mine], grads_averaged=False)}


DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
             "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}


def _deepspeed_worker(rank: int, world: int, port: int, out: Path) -> None:
    """ZeRO-3 training steps of Tiny (FusedLMHeadLoss in its forward), float32."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo",
                               timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = Tiny(mode="module", **TINY_OPTS)
    res = {"init": {k: v.clone() for k, v in model.state_dict().items()}, "losses": [],
           "params": []}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=DS_CONFIG)
    ids, targets = tiny_batch(world)
    mine = slice(2 * rank, 2 * rank + 2)
    for _ in range(2):
        loss = engine(ids[mine], targets[mine],
                      num_items_in_batch=fd.global_num_items(targets[mine]))
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        res["losses"].append(total / world)
        params = {}
        for k, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                params[k] = p.detach().clone()
        res["params"].append(params)
    torch.save(res, out / f"deepspeed_{rank}.pt")
    torch.distributed.barrier()


def _worker(job: str, rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    if job == "deepspeed":
        return _deepspeed_worker(rank, world, port, out)

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        res = {}
        native = os.environ.get("FASTIRL_TEST_NATIVE") == "1"
        for name in VOCAB_CASES + (NATIVE_CASES if native else []):
            res[name] = _vocab_case(name, rank, world)
        torch.save(res, out / f"vocab_{rank}.pt")
        errs = {}
        for name in ERROR_CASES:
            errs[name] = _error_case(name, rank, world)
        # still in step after the errors: the same loss again
        errs["after_errors"] = _vocab_case("chunked", rank, world)
        torch.save(errs, out / f"errors_{rank}.pt")
        if world == 2:
            torch.save(_ddp_case(rank, world), out / f"ddp_{rank}.pt")
            for mode in FSDP_MODES:
                torch.save(_fsdp_case(mode, rank, world), out / f"fsdp_{mode}_{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- parent side

import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def _launch(world: int, tmp: Path, job: str = "main", deadline: float | None = None,
            **env_extra) -> dict:
    """Runs the workers of one world size; returns {"dir", "logs", "rcs", "seconds"}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
        FASTIRL_TEST_NATIVE="1" if NATIVE_READY else "0", **env_extra)
    logs = [tmp / f"log_{r}.txt" for r in range(world)]
    port = _free_port()
    start = time.monotonic()
    procs = []
    for r in range(world):
        with open(logs[r], "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", job, str(r), str(world), str(port),
                 str(tmp)],
                env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT)))
    deadline = start + (deadline or DEADLINE[world])
    rcs = []
    for p in procs:
        try:
            rcs.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            rcs.append("killed at the deadline")
    for p in procs:
        p.wait()
    return {"dir": tmp, "logs": [x.read_text()[-3000:] for x in logs], "rcs": rcs,
            "seconds": time.monotonic() - start}


class Launch:
    def __init__(self, world, info):
        self.world, self.info = world, info

    def load(self, stem: str) -> list:
        files = [self.info["dir"] / f"{stem}_{r}.pt" for r in range(self.world)]
        if not all(f.exists() for f in files):
            pytest.fail(f"world {self.world}: no {stem} results (worker exit codes "
                        f"{self.info['rcs']}); logs:\n" + "\n---\n".join(self.info["logs"]))
        return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return Launch(2, _launch(2, tmp_path_factory.mktemp("world2")))


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    return Launch(3, _launch(3, tmp_path_factory.mktemp("world3")))


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def launch(request):
    return request.getfixturevalue(f"world{request.param}")


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-12),
            torch.float32: dict(rtol=2e-5, atol=2e-6),
            torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}[dtype]


def _close(name, got, want, dtype):
    assert (got is None) == (want is None), f"{name}: {got} vs {want}"
    if got is None:
        return
    torch.testing.assert_close(got.double(), want.double(), **_tol(dtype), msg=lambda m:
                               f"{name}: {m}")


def _gather(results, key):
    parts = [r[key] for r in results]
    return None if parts[0] is None else torch.cat(parts)


@pytest.mark.parametrize("name", VOCAB_CASES + NATIVE_CASES)
def test_vocab_parallel_matches_single_process(launch, name):
    if name in NATIVE_CASES and not NATIVE_READY:
        pytest.skip(f"the native CPU extension cannot be built here: {NATIVE_MISSING}")
    results = [r[name] for r in launch.load("vocab")]
    case = make_case(name)
    dtype = case["hidden"].dtype
    single = _run_loss(case, case["weight"], case["bias"], fastirl.iq_loss)
    ref_case = dict(case, hidden=case["hidden"].double())
    flat = case["targets"].dim() == 1          # the reference takes (B, T) batches only
    if flat:
        ref_case.update(hidden=ref_case["hidden"].unsqueeze(0),
                        targets=case["targets"].unsqueeze(0),
                        opts=dict(case["opts"], position_ids=case["opts"]["position_ids"][None]))
    ref = _run_loss(ref_case, case["weight"].double(),
                    None if case["bias"] is None else case["bias"].double(),
                    lambda *a, **k: reference.iq_loss(
                        *a, **{o: v for o, v in k.items() if o not in _NON_REF}))
    if flat:
        ref["dhidden"] = ref["dhidden"].squeeze(0)
    got = dict(results[0], dweight=_gather(results, "dweight"), dbias=_gather(results, "dbias"))
    for other in results[1:]:      # every rank has the same loss, metrics and dhidden
        assert torch.equal(other["loss"], results[0]["loss"])
        if other["dhidden"] is not None:
            torch.testing.assert_close(other["dhidden"], results[0]["dhidden"], rtol=0, atol=0)
        if other["metrics"] is not None:
            for k in other["metrics"]:
                assert torch.equal(other["metrics"][k], results[0]["metrics"][k]), k
    for key in ("loss", "dhidden", "dweight", "dbias"):
        _close(f"{key} vs single process", got[key], single[key], dtype)
        loose = torch.float32 if dtype == torch.float64 else dtype
        _close(f"{key} vs float64 reference", got[key], ref[key],
               dtype if dtype == torch.float64 else loose)
    if case["opts"].get("return_metrics"):
        for k, v in ref["metrics"].items():
            _close(f"metric {k}", got["metrics"][k], v, dtype)
            _close(f"metric {k} vs single", got["metrics"][k], single["metrics"][k], dtype)
    if name == "hidden_no_grad":
        assert got["dhidden"] is None and got["dweight"] is not None
    if name == "all_ignored":
        assert float(got["loss"]) == 0.0 and not got["dweight"].any()
    if name == "metrics_ties":   # the tie is real and was resolved to the first index
        assert 0.0 < float(ref["metrics"]["accuracy"]) < 1.0
        _close("tie accuracy", got["metrics"]["accuracy"], ref["metrics"]["accuracy"], dtype)


ERROR_TEXT = {
    "batch_rows": "ranks disagree on hidden shape",
    "hidden_size": "ranks disagree on the hidden size",
    "dtype": "ranks disagree on the weight dtype",
    "targets_differ": "ranks disagree on targets",
    "one_rank_empty": "ranks disagree on targets",
    "empty_shard": "non-empty vocabulary shard",
    "target_range": f"targets must lie in [0, {V})",
    "backend_batch_check": "ranks disagree on position_ids",
}


@pytest.mark.parametrize("name", ERROR_CASES)
def test_mismatch_raises_on_every_rank(launch, name):
    results = launch.load("errors")
    for rank, res in enumerate(results):
        assert ERROR_TEXT[name] in res[name], f"rank {rank}: {res[name]!r}"


def test_still_in_step_after_errors(launch):
    results = launch.load("errors")
    vocab = launch.load("vocab")
    for r in range(launch.world):
        torch.testing.assert_close(results[r]["after_errors"]["loss"], vocab[r]["chunked"]["loss"],
                                   rtol=0, atol=0)
        torch.testing.assert_close(results[r]["after_errors"]["dweight"],
                                   vocab[r]["chunked"]["dweight"], rtol=0, atol=0)


def _tiny_reference(init, mode, world, steps):
    model = Tiny(mode=mode, **TINY_OPTS).double()
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, targets = tiny_batch(world)
    out = []
    for _ in range(steps):
        loss = tiny_loss(model, ids, targets, mode)     # the whole global batch, token mean
        loss.backward()
        out.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad()
    return model, out


def test_ddp_global_num_items(world2):
    res = world2.load("ddp")
    _, ref = _tiny_reference(res[0]["init"], "module", 2, 1)
    ids, targets = tiny_batch(2)
    n = (targets != -100).sum().double()
    for r in res:
        assert float(r["num_items"]) == pytest.approx(float(n) / 2)
        assert float(r["num_items_sum"]) == pytest.approx(float(n))
        assert set(r["grads"]) == set(ref[0][1])
        for k, g in r["grads"].items():
            torch.testing.assert_close(g, ref[0][1][k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp2_training_matches_unsharded(world2, mode):
    res = world2.load(f"fsdp_{mode}")
    ref_model, ref = _tiny_reference(res[0]["init"], mode, 2, 2)
    for r in res:
        for step, (loss, grads) in enumerate(ref):
            torch.testing.assert_close(r["losses"][step], loss, rtol=1e-10, atol=1e-12)
            assert set(r["grads"][step]) == set(grads)
            for k, g in grads.items():   # step 1 also checks the parameters after step 0
                torch.testing.assert_close(r["grads"][step][k], g, rtol=1e-10, atol=1e-12,
                                           msg=f"step {step} {k}")
    if mode == "ctx":
        ids, targets = tiny_batch(2)
        with torch.no_grad():
            want = fastirl.iq_loss(ref_model(ids), ref_model.lm_head.weight, targets,
                                   bias=ref_model.lm_head.bias, **TINY_OPTS, reduction="sum")
        for r in res:
            assert r["eval_unsharded"] and r["eval_resharded"]
            torch.testing.assert_close(r["eval_sum"], want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- in process

def test_vocab_parallel_needs_initialized_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        fd.vocab_parallel(object(), torch.zeros(3, 2))


def test_global_num_items_without_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    t = torch.tensor([[1, -100, 2], [-100, -100, 3]])
    assert float(fd.global_num_items(t)) == 3.0
    assert float(fd.global_num_items([t, t[:1]], grads_averaged=False)) == 5.0
    assert float(fd.global_num_items(torch.full((2, 2), -1), ignore_index=-1)) == 1.0


def test_fused_lm_head_loss_module_equals_functional():
    torch.manual_seed(0)
    head = nn.Linear(H, V).double()
    mod = fd.FusedLMHeadLoss(head, td_weight=0.2, gamma=0.9)
    case = make_case("packed")
    h1 = case["hidden"].clone().requires_grad_()
    loss = mod(h1, case["targets"], position_ids=case["opts"]["position_ids"])
    loss.backward()
    h2 = case["hidden"].clone().requires_grad_()
    w2 = head.weight.detach().clone().requires_grad_()
    want = reference.iq_loss(h2, w2, case["targets"], bias=head.bias.detach(), td_weight=0.2,
                             gamma=0.9, position_ids=case["opts"]["position_ids"])
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(head.weight.grad, w2.grad)
    assert mod.logits(h1).shape == (B, T, V)
    with pytest.raises(ValueError, match="td_weight"):
        fd.FusedLMHeadLoss(head, td_weight=-1.0)


def test_gathered_lm_head_plain_module_is_identity():
    head = nn.Linear(H, V)
    with fd.gathered_lm_head(head) as got:
        assert got is head


@pytest.mark.slow
def test_deepspeed_zero3_training_matches_unsharded(tmp_path):
    """ZeRO-3 (DeepSpeed's CPU accelerator, gloo): FusedLMHeadLoss inside the
    engine's module.  Needs deepspeed installed; its first run JIT-compiles
    DeepSpeed's shared-memory comm op (minutes)."""
    pytest.importorskip("deepspeed")
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
    info = _launch(2, tmp_path, job="deepspeed", deadline=900, **env)
    res = Launch(2, info).load("deepspeed")
    model = Tiny(mode="module", **TINY_OPTS)
    model.load_state_dict(res[0]["init"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, targets = tiny_batch(2)
    for step in range(2):
        loss = tiny_loss(model, ids, targets, "module")
        loss.backward()
        opt.step()
        opt.zero_grad()
        for r in res:
            torch.testing.assert_close(r["losses"][step], loss.detach(), rtol=1e-5, atol=1e-6)
            for k, p in model.named_parameters():
                torch.testing.assert_close(r["params"][step][k], p.detach(), rtol=1e-5,
                                           atol=1e-6, msg=f"step {step} {k}")


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
