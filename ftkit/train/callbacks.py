"""Callbacks of ftkit runs: adapter export at the end, MCoT sample grids every N steps."""

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
    """Writes the trained adapter (peft format + ftkit metadata) to ``out`` when training ends."""

    def __init__(self, out: str | Path, extra: dict | None = None):
        self.out, self.extra = Path(out), dict(extra or {})

    def on_train_end(self, trainer, pl_module) -> None:
        from ftkit.adapters.io import save_adapter

        if pl_module.adapter_cfg is None:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        extra = {**self.extra, "global_step": trainer.global_step, "metrics": metrics}
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
                             base_path=str(pl_module.hparams.model_path), extra=extra, overwrite=True)
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every or (trainer.global_step % self.every) or not trainer.is_global_zero:
            return
        self.render(trainer, pl_module, trainer.global_step)

    def render(self, trainer, pl_module, step: int) -> Path | None:
        from PIL import Image

        from ftkit.infer.mcot import SamplerSettings, TextSettings, contact_sheet, run_mcot

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
                                     sampler=SamplerSettings(num_timesteps=self.steps),
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
