"""Callbacks of ftkit runs: adapter export at the end, MCoT sample grids every N steps, an EMA of the weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("ftkit")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class AdapterExport(L.Callback):
    """Writes the trained adapter (peft format + ftkit metadata, and the recipe's ``sampling`` settings as
    its ``sampling.json``) to ``out`` when training ends."""

    def __init__(self, out: str | Path, extra: dict | None = None, sampling: dict | None = None):
        self.out, self.extra, self.sampling = Path(out), dict(extra or {}), sampling

    def on_train_end(self, trainer, pl_module) -> None:
        from ftkit.adapters.io import save_adapter

        if pl_module.adapter_cfg is None:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        extra = {**self.extra, "global_step": trainer.global_step, "metrics": metrics,
                 "region_noise": bool(pl_module.hparams.get("region_noise", False))}  # its sampler's inpaint mode
        # FSDP2: gather full parameters on every rank (a collective), save on rank 0, shard again
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # torch without FSDP2
            FSDPModule = ()  # noqa: N806
        sharded = [m for m in pl_module.model.modules() if FSDPModule and isinstance(m, FSDPModule)]
        for m in sharded:
            m.unshard()
        try:
            if trainer.is_global_zero:
                save_adapter(pl_module.model, pl_module.adapter_cfg, self.out,
                             base_path=str(pl_module.hparams.model_path), extra=extra, sampling=self.sampling,
                             overwrite=True)
                log.info("adapter written to %s", self.out)
        finally:
            for m in sharded:
                m.reshard()
        trainer.strategy.barrier()


class MCoTSamples(L.Callback):
    """Every ``every_n_steps`` steps: run plan -> draft -> reflect -> refine on a few prompts and save a
    PNG contact sheet (also logged to TensorBoard)."""

    def __init__(self, out: str | Path, every_n_steps: int, prompts: list[str], image_size: int = 64,
                 num_timesteps: int = 10, rounds: int = 1, max_new_tokens: int = 48):
        self.out, self.every = Path(out), every_n_steps
        self.prompts, self.size, self.steps, self.rounds, self.max_new = prompts, image_size, num_timesteps, rounds, max_new_tokens
        self.sampler = None

    def on_fit_start(self, trainer, pl_module) -> None:
        """The model folder's sampler settings (its ``sampling.json``; read here so a bad one stops the run
        before step 0), at this callback's number of steps."""
        from ftkit.infer.mcot import SamplerSettings

        self.sampler = SamplerSettings.for_model(pl_module.hparams.model_path)
        self.sampler.num_timesteps = self.steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every or (trainer.global_step % self.every) or not trainer.is_global_zero:
            return
        self.render(trainer, pl_module, trainer.global_step)

    def render(self, trainer, pl_module, step: int) -> Path | None:
        from PIL import Image

        from ftkit.infer.mcot import TextSettings, contact_sheet, run_mcot

        model = pl_module.model
        tok = trainer.datamodule.tokenizer if trainer.datamodule is not None else None
        if tok is None:
            return None
        was = model.training
        model.eval()
        sheets = []
        try:
            with torch.no_grad():
                for i, prompt in enumerate(self.prompts):
                    g = torch.Generator().manual_seed(i)
                    trace = run_mcot(model, tok, prompt, rounds=self.rounds, image_hw=(self.size, self.size),
                                     sampler=self.sampler,
                                     text=TextSettings(max_plan_tokens=self.max_new, max_reflect_tokens=self.max_new),
                                     generator=g)
                    sheets.append(contact_sheet(trace))
        finally:
            model.train(was)
            if model.vae is not None:
                model.vae.eval()
        w = max(s.width for s in sheets)
        grid = Image.new("RGB", (w, sum(s.height for s in sheets)), "white")
        y = 0
        for s in sheets:
            grid.paste(s, (0, y))
            y += s.height
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"step{step:06d}.png"
        grid.save(path)
        for lg in trainer.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_image"):
                import numpy as np

                exp.add_image("mcot_samples", np.asarray(grid).transpose(2, 0, 1), step)
        (self.out / "latest.json").write_text(json.dumps({"step": step, "png": path.name}))
        return path


class WeightEMA(L.Callback):
    r"""Exponential moving average of the trainable weights (what a diffusion model samples with).

    After optimizer step :math:`n` (1-based), with :math:`w` the trained weights and :math:`\bar w` the average:

    .. math::  \bar w \leftarrow \beta_n \bar w + (1 - \beta_n)\, w, \qquad
               \beta_n = \min\big(\beta, \tfrac{1 + n}{10 + n}\big)

    (the warm-up keeps early averages from remembering the initial weights). The average starts from the
    weights the run starts with (a checkpoint's average when the checkpoint has one). Checkpoints keep the
    trained weights in ``state_dict``, so a resume continues training exactly, and the average in
    ``checkpoint["ema"] = {"decay", "updates", "state_dict"}`` (fp32, the trainable tensors only);
    ``ftkit pretrain-export`` writes the average. Single process and DDP (every rank holds the same weights).
    """

    def __init__(self, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ftkit.ema.decay: {decay} is not in (0, 1)")
        self.decay, self.updates, self.avg = float(decay), 0, None
        self._step = -1

    def _trainable(self, pl_module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module) -> None:
        live = self._trainable(pl_module)
        if self.avg is None:
            self.avg = {n: p.detach().float().clone() for n, p in live.items()}
        elif set(self.avg) != set(live):
            raise ValueError(f"checkpoint's EMA holds other tensors than the model trains "
                             f"({sorted(set(self.avg) ^ set(live))[:3]})")
        self.avg = {n: t.to(live[n].device) for n, t in self.avg.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # gradient accumulation: no optimizer step since the last update
            return
        self._step = trainer.global_step
        self.updates += 1
        beta = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = self._trainable(pl_module)
        with torch.no_grad():
            names = list(self.avg)
            torch._foreach_lerp_([self.avg[n] for n in names], [live[n].detach().float() for n in names], 1.0 - beta)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.avg is not None:
            checkpoint["ema"] = {"decay": self.decay, "updates": self.updates,
                                 "state_dict": {n: t.detach().cpu().clone() for n, t in self.avg.items()}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        ema = checkpoint.get("ema")
        if ema is None:
            log.info("checkpoint has no EMA: the average starts from its weights")
            return
        self.updates, self.avg = int(ema["updates"]), dict(ema["state_dict"])


class GradientDump(L.Callback):
    """Debugging aid: write the trainable parameters' gradients (full tensors, after the DDP/FSDP
    reduction) at optimizer step ``step`` to ``path`` (safetensors, rank 0), e.g. to compare a
    multi-process run with a single-process one."""

    def __init__(self, path: str, step: int = 0):
        self.path, self.step = path, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != self.step:
            return
        from safetensors.torch import save_file

        grads = {}
        for n, p in pl_module.named_parameters():
            if p.requires_grad and p.grad is not None:
                grads[n] = _full(p.grad).detach().float().cpu().contiguous()
        if trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            save_file(grads, self.path)
