"""The tiny BAGEL-architecture backbone of the tiny-mcot recipe, built and cached when absent.

A byte-level BPE tokenizer (Qwen2's special tokens) is trained on the recipe's own text corpus, and a
randomly initialised BAGEL-architecture model sized for a CPU is saved in the release folder format,
so every later step (training, merge, generate, eval) runs exactly the code a 7B run runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("ftkit")
# Qwen2's pre-tokenization pattern (its tokenizer.json / Qwen2Tokenizer): contractions, letters, single digits
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


def corpus_texts(records_path: str | Path) -> Iterable[str]:
    """Prompts, serialised plans and reflections of an ftkit JSONL dataset."""
    from ftkit.data.schema import PlanStep, ReflectStep, StepRecord
    from ftkit.data.serialize import serialize_plan, serialize_reflection

    path = Path(records_path)
    with open(path) as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            rec = StepRecord.from_dict(json.loads(line), source=str(path), index=i)
            yield rec.prompt
            for s in rec.steps:
                if isinstance(s, PlanStep):
                    yield serialize_plan(s)
                elif isinstance(s, ReflectStep):
                    yield serialize_reflection(s)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Byte-level BPE with Qwen2's pre-tokenizer (NFC, Qwen2's split pattern) and chat/vision special tokens,
    as a transformers fast tokenizer; saved with vocab.json + merges.txt it loads as ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])


@dataclass
class TinyBackbone:
    """How the tiny-mcot recipe's backbone is built when its folder is absent (``model.tiny``):
    a tokenizer trained on ``corpus`` (an ftkit JSONL dataset) and a random BAGEL-architecture model of
    these sizes (:func:`ensure_tiny_bagel`)."""

    corpus: str
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vit_hidden: int = 64
    vit_layers: int = 2
    vit_heads: int = 2
    vit_intermediate: int = 128
    max_latent_size: int = 4
    vit_max: int = 8
    ae_ch: int = 32
    seed: int = 0
    ae: str | None = None


def ensure_tiny_bagel(path: str | Path, *, corpus: str, vocab_size: int = 1024, hidden: int = 128, layers: int = 4,
                      heads: int = 4, kv_heads: int = 2, intermediate: int = 256, vit_hidden: int = 64,
                      vit_layers: int = 2, vit_heads: int = 2, vit_intermediate: int = 128, max_latent_size: int = 4,
                      vit_max: int = 8, ae_ch: int = 32, seed: int = 0, ae: str | None = None) -> Path:
    """Build (once) a tiny random BAGEL with a tokenizer trained on ``corpus`` and save it at ``path``.

    ``ae``: a folder with a trained ``ae.safetensors`` + ``ae_config.json`` (``ftkit pretrain-ae``) used
    instead of a random autoencoder of width ``ae_ch``; its stride must tile ``max_latent_size`` patches."""
    from ftkit.models.loading import special_token_ids
    from ftkit.models.release import build_random_bagel, save_bagel, tiny_ae_config, tiny_bagel_config

    path = Path(path)
    if (path / "ema.safetensors").is_file():
        return path
    if not Path(corpus).is_file():
        raise FileNotFoundError(f"{corpus}: tokenizer corpus for the tiny backbone not found (run `make data`)")
    log.info("building tiny BAGEL backbone at %s (tokenizer trained on %s)", path, corpus)
    tok = train_tokenizer(corpus_texts(corpus), vocab_size)
    vocab = -(-len(tok) // 64) * 64
    cfg = tiny_bagel_config(vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                            intermediate=intermediate, vit_hidden=vit_hidden, vit_layers=vit_layers,
                            vit_heads=vit_heads, vit_intermediate=vit_intermediate, max_latent_size=max_latent_size,
                            vit_max=vit_max, special_ids=special_token_ids(tok))
    model = build_random_bagel(cfg, tiny_ae_config(ch=ae_ch), seed=seed)
    if ae is not None:
        from ftkit.models.vae import AEConfig, load_ae

        ae_cfg = AEConfig.from_json(Path(ae) / "ae_config.json")
        model.vae = load_ae(Path(ae) / "ae.safetensors", ae_cfg)
        cfg.vae_downsample = ae_cfg.downsample
    save_bagel(model, path, tokenizer=tok, dtype=torch.float32, overwrite=False)
    return path
