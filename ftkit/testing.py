"""Helpers shared by tests, benchmarks and recipes: the bagel-tiny fixture's example as segments,
and tiny BAGEL-architecture checkpoints written in the release format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch

from ftkit.data.packer import PackConfig
from ftkit.segments import Kind, Segment


def pack_config_for(cfg) -> PackConfig:
    """The packer geometry of a :class:`~ftkit.models.config.BagelConfig`."""
    return PackConfig(**cfg.pack_config())


def fixture_segments(fixture_dir: Path, inputs: dict[str, torch.Tensor]) -> list[Segment]:
    """The fixture's training example (inputs.json ``sequence_plan``) as ftkit segments."""
    te = json.loads((Path(fixture_dir) / "inputs.json").read_text())["training_example"]
    segs = []
    for it in te["sequence_plan"]:
        if it["item"] == "text":
            end = it.get("special_token_label") if it.get("special_token_loss") else None
            segs.append(Segment(Kind.TEXT, text_ids=te["text_ids"][it["text"]], loss=bool(it["loss"]), end_label=end))
        elif it["item"] == "vit_image":
            segs.append(Segment(Kind.VIT_IMAGE, image=inputs[it["image"]]))
        else:
            noisy = bool(it["loss"])
            segs.append(Segment(Kind.VAE_NOISY if noisy else Kind.VAE_CLEAN, image=inputs[it["image"]], loss=noisy,
                                timestep_logit=te["timestep_logit"] if noisy else None))
    return segs


class ScriptedTokenizer:
    """A real tokenizer for encoding whose ``decode`` returns scripted texts in call order (the plans and
    reflections a trained model would write), so parsing, stopping, verdict gating and region inpainting run on
    a random model."""

    def __init__(self, tok, texts):
        self.tok, self.texts = tok, list(texts)
        self.all_special_ids = tok.all_special_ids

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=True):
        return self.texts.pop(0)


class KillAtStep(L.Callback):
    """Lightning callback that hard-kills the process (``os._exit(17)``) once optimizer step ``step`` is
    done and its checkpoint written: a crash, for resume tests. Use via
    ``trainer.callbacks: [{class_path: ftkit.testing.KillAtStep, init_args: {step: 3}}]``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            for cb in trainer.checkpoint_callbacks:
                cb.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            trainer._logger_connector.update_train_step_metrics()  # flush this step's row, as a clean stop would
            for lg in trainer.loggers:
                lg.save()
            os._exit(17)
