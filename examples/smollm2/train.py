"""Fine-tuning with fastirl's IQTrainer: every step's loss terms are logged, and
the TD weight lambda is fixed, warmed up, or (``td_ratio``) set relative to the NLL."""

from __future__ import annotations

import copy
import tempfile
import time

import torch
from transformers import TrainerCallback


class RelativeTDWeight(TrainerCallback):
    """Sets lambda so that the TD term is a fixed fraction of the NLL: after each
    (logged) step,

        lambda <- clip(ratio * nll / td_penalty, 0, max_weight)

    smoothed with an exponential moving average, and applied with
    ``fastirl.integrations.set_loss_options(model, td_weight=lambda)``.  The first
    step uses the config's ``td_weight`` (0 here).  Needs ``logging_steps=1``.

    On a pretrained model td_penalty (the mean squared implicit reward) starts at
    100+ and falls as IQ-Learn fixes the values' offsets, so this is an automatic
    warm-up: lambda starts near ratio * nll / td and grows as the TD error shrinks.
    """

    def __init__(self, ratio: float, max_weight: float = 1.0, smoothing: float = 0.3):
        self.ratio, self.max_weight, self.smoothing = ratio, max_weight, smoothing
        self.weight: float | None = None

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        from fastirl.integrations import set_loss_options
        if not logs or "nll" not in logs or not logs.get("td_penalty"):
            return
        target = min(self.max_weight, self.ratio * logs["nll"] / logs["td_penalty"])
        self.weight = target if self.weight is None else \
            (1 - self.smoothing) * self.weight + self.smoothing * target
        set_loss_options(model, td_weight=self.weight)


def train(setting: dict, base, tok, train_ds, *, steps: int | None = None,
          epochs: int | None = None, batch: int, lr: float, seed: int, threads: int,
          backend: str, max_length: int, eval_ds=None, on_step=None, on_epoch=None,
          progress=None):
    """Fine-tunes a copy of ``base`` on ``train_ds`` with IQTrainer, either for
    ``steps`` optimizer steps or for ``epochs`` epochs.

    ``setting``: ``td_weight`` (lambda; 0 is MLE, exactly the token cross-entropy),
    optional ``gamma``, ``td_warmup`` (a fraction of the steps over which lambda
    rises linearly from 0: IQConfig's ``td_weight_warmup_steps``) and ``td_ratio``
    (lambda relative to the NLL: :class:`RelativeTDWeight`).  Every step is logged
    (``logging_steps=1``): loss, nll, td_penalty, reward, value, entropy and the
    lambda in force.  ``on_step(step, model)`` / ``on_epoch(epoch, model)`` run after
    each step / epoch (evaluations); ``eval_ds`` is evaluated by the trainer after
    every epoch (its ``eval_nll``).  Returns (the trained model, the log)."""
    import transformers

    from fastirl.integrations import IQConfig, IQTrainer

    torch.set_num_threads(threads)
    model = copy.deepcopy(base)
    total_steps = steps if steps is not None else epochs * -(-len(train_ds) // batch)
    warmup = round(setting.get("td_warmup", 0) * total_steps)
    log: dict = {"step": [], "loss": [], "nll": [], "td_penalty": [], "reward": [], "value": [],
                 "entropy": [], "td_weight": [], "step_s": [], "eval_epoch": [], "eval_nll": [],
                 "eval_td_penalty": []}
    relative = RelativeTDWeight(setting["td_ratio"]) if "td_ratio" in setting else None
    relative_next = [0.0]          # the relative lambda of the next step (the first: 0)

    class Monitor(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            log["step_s"].append(time.perf_counter() - self.t0)
            if on_step is not None:
                on_step(state.global_step, model)

        def on_epoch_end(self, args, state, control, model=None, **kw):
            if on_epoch is not None:
                on_epoch(round(state.epoch), model)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "nll" in logs:
                log["step"].append(state.global_step)
                for key in ("loss", "nll", "td_penalty", "reward", "value", "entropy"):
                    log[key].append(logs.get(key))
                # the lambda this step used: the warm-up's, the relative callback's, or fixed
                if relative is not None:
                    lam, relative_next[0] = relative_next[0], relative.weight  # it ran first
                elif warmup:
                    lam = setting["td_weight"] * min(1.0, (state.global_step - 1) / warmup)
                else:
                    lam = setting["td_weight"]
                log["td_weight"].append(lam)
            if "eval_nll" in logs:
                log["eval_epoch"].append(round(state.epoch or 0))
                log["eval_nll"].append(logs["eval_nll"])
                log["eval_td_penalty"].append(logs.get("eval_td_penalty"))
            if progress is not None:
                progress()

    args = IQConfig(
        output_dir=tempfile.mkdtemp(prefix="smollm2-"), report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=seed, data_seed=seed,
        max_steps=steps if steps is not None else -1, num_train_epochs=epochs or 1,
        per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, total_steps // 15), weight_decay=0.0, max_grad_norm=1.0, bf16=True,
        gradient_checkpointing=False, max_length=max_length, logging_steps=1,
        eval_strategy="epoch" if eval_ds is not None else "no",
        dataloader_num_workers=0, loss_backend=backend,
        td_weight=0.0 if relative is not None else setting["td_weight"],
        gamma=setting.get("gamma", 1.0), divergence="chi2", td_weight_warmup_steps=warmup)
    transformers.set_seed(seed)
    trainer = IQTrainer(model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                        processing_class=tok)
    if relative is not None:
        trainer.add_callback(relative)
    trainer.add_callback(Monitor())
    trainer.callback_handler.callbacks = [
        c for c in trainer.callback_handler.callbacks if type(c).__name__ != "PrinterCallback"]
    if eval_ds is not None and on_epoch is not None:      # epoch 0: the model before training
        on_epoch(0, trainer.model)
        trainer.evaluate()                                  # logged as epoch 0 by Monitor
    trainer.train()
    return trainer.model, log
