"""Write BAGEL-architecture models in the release folder format, and build tiny ones.

``save_bagel`` writes what :func:`ftkit.models.loading.load_bagel` (and upstream's loader) reads:
``llm_config.json``, ``vit_config.json`` (listing one more layer than is stored, as the release does),
``ema.safetensors`` (one flat file), ``ae.safetensors`` in the original FLUX key naming (+
``ae_config.json`` when the autoencoder is not the FLUX default) and the tokenizer files. Everything
is written into a temporary sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ftkit.files import fsync_dir, take_pid_lock
from ftkit.models.bagel import BagelModel
from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig
from ftkit.models.vae import AEConfig, FluxAE, build_autoencoder, diffusers_to_flux_key

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


class atomic_dir:
    """``with atomic_dir(out, overwrite) as tmp:`` write into ``tmp``; renamed to ``out`` on success.

    Refuses an existing ``out`` unless ``overwrite``; on error the temporary folder is removed and
    nothing is left under the final name. With ``inputs`` (the folders being read, e.g. a merge's base and
    adapter) an ``out`` that is, contains or lies inside an input is refused. With ``model_folder=True``
    an existing ``out`` is replaced only when it is itself a model folder (never a folder of other files).
    A lock file ``.<name>.lock`` beside ``out`` (created exclusively, holding the pid) refuses a second
    writer of the same ``out`` while the first runs; a lock left by a dead process is taken over.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, *, inputs: tuple = (), model_folder: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.inputs = tuple(Path(p) for p in inputs)
        self.model_folder = model_folder
        self.lock: Path | None = None

    def _check(self) -> None:
        from ftkit.errors import FtkitError

        out = self.out.resolve()
        for src in self.inputs:
            src = src.resolve()
            if out == src or out in src.parents or src in out.parents:
                rel = "is" if out == src else ("contains" if out in src.parents else "is inside")
                raise FtkitError(f"{self.out}: the output folder {rel} the input {src}; choose an output folder "
                                 "outside every input")
        if self.out.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.out}: output folder exists (pass overwrite=True / --overwrite)")
            if self.model_folder:
                from ftkit.models.folders import detect_model_folder

                try:
                    detect_model_folder(self.out)
                except (OSError, ValueError) as e:
                    raise FtkitError(f"{self.out}: --overwrite replaces only a model folder, and this is not one "
                                     f"({e}); nothing was deleted") from e

    def _take_lock(self) -> None:
        self.lock = self.out.with_name(f".{self.out.name}.lock")
        try:
            take_pid_lock(self.lock, lambda pid: f"{self.out}: another process (pid {pid}) is writing this folder; "
                                                 f"lock {self.lock}")
        except BaseException:
            self.lock = None
            raise

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._check()
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        except BaseException:
            self._release()
            raise
        return self.tmp

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)
            self.lock = None

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            _fsync_tree(self.tmp)  # the files' bytes are on disk before the name says they are complete
            if self.out.exists():
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                os.replace(self.out, old)
                os.replace(self.tmp, self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.out)
            fsync_dir(self.out.parent)
            return False
        finally:
            self._release()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Write ``tokenizer`` the way a Qwen2 release does, so that every transformers version loads it.

    ``tokenizer.json`` (fast, transformers >= 4) plus, for a byte-level BPE, ``vocab.json`` + ``merges.txt``
    and a Qwen2-style ``tokenizer_config.json`` (``tokenizer_class: Qwen2Tokenizer``, special tokens in
    ``added_tokens_decoder``): what upstream BAGEL's pinned transformers 4.49 reads with
    ``Qwen2Tokenizer.from_pretrained``.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        return
    backend.model.save(str(folder))  # vocab.json + merges.txt
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    cfg = {"add_prefix_space": False, "added_tokens_decoder": added,
           "additional_special_tokens": [t for t in specials if t not in (tokenizer.pad_token, )],
           "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": tokenizer.eos_token,
           "errors": "replace", "model_max_length": 32768, "pad_token": tokenizer.pad_token,
           "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def ae_state_dict_flux(ae: FluxAE) -> dict[str, torch.Tensor]:
    """The autoencoder's weights under the original FLUX key names (attention projections as 1x1 convs)."""
    levels = len(ae.config.ch_mult)
    out = {}
    for k, v in ae.autoencoder.state_dict().items():
        fk = diffusers_to_flux_key(k, levels)
        if fk is None:
            raise ValueError(f"autoencoder key {k} has no FLUX name")
        if v.dim() == 2 and (".attn_1." in fk):
            v = v[:, :, None, None]
        out[fk] = v.contiguous()
    return out


def save_bagel(model: BagelModel, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
               tokenizer=None, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` as a BAGEL release folder. ``state_dict`` overrides the weights written (merge)."""
    cfg = model.cfg
    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / "llm_config.json").write_text(json.dumps(cfg.llm.to_hf_dict(), indent=2))
        (tmp / "vit_config.json").write_text(json.dumps(cfg.vit.to_hf_dict(
            add_dropped_layer=True, image_size=cfg.vit_max_num_patch_per_side * cfg.vit.patch_size), indent=2))
        sd = state_dict if state_dict is not None else model.release_state_dict()
        sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
        save_file(sd, str(tmp / "ema.safetensors"), metadata={"format": "pt"})
        if model.vae is not None:
            save_file({k: v.to(dtype) for k, v in ae_state_dict_flux(model.vae).items()}, str(tmp / "ae.safetensors"))
            if model.vae.config.to_dict() != AEConfig.flux().to_dict():
                (tmp / "ae_config.json").write_text(json.dumps(model.vae.config.to_dict(), indent=2))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        elif tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        (tmp / "ftkit_bagel.json").write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("llm", "vit")},
                                                          indent=2))
    return Path(out_dir)


# ----------------------------------------------------------------------------- tiny models

def init_weights(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Fresh initialisation: Linear/Embedding N(0, std), zero biases, unit norms, sin-cos tables kept;
    llm2vae zero (training starts at v_hat = 0, as upstream)."""
    for name, p in model.named_parameters():
        if name.startswith("vae.") or name.endswith("pos_embed"):
            continue
        if p.dim() >= 2:
            with torch.no_grad():
                p.normal_(0.0, std, generator=generator)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)
    if isinstance(model, BagelModel):
        nn.init.zeros_(model.llm2vae.weight)
        nn.init.zeros_(model.llm2vae.bias)


def tiny_bagel_config(*, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, vit_hidden: int = 32, vit_layers: int = 2, vit_heads: int = 2,
                      vit_intermediate: int = 64, max_latent_size: int = 8, vit_max: int = 8,
                      special_ids: dict | None = None, timestep_shift: float = 1.0) -> BagelConfig:
    llm = LLMConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size)
    vit = ViTConfig(hidden_size=vit_hidden, intermediate_size=vit_intermediate, num_hidden_layers=vit_layers,
                    num_attention_heads=vit_heads)
    return BagelConfig(llm=llm, vit=vit, max_latent_size=max_latent_size, vit_max_num_patch_per_side=vit_max,
                       timestep_shift=timestep_shift, **(special_ids or {}))


def tiny_ae_config(ch: int = 32, levels: int = 4) -> AEConfig:
    return AEConfig(resolution=256, in_channels=3, downsample=2 ** (levels - 1), ch=ch, out_ch=3,
                    ch_mult=[1] * levels, num_res_blocks=1, z_channels=16)


def build_random_bagel(cfg: BagelConfig, ae_cfg: AEConfig | None = None, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> BagelModel:
    """A randomly initialised BAGEL-architecture model (with a random autoencoder)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = BagelModel(cfg)
    init_weights(model, generator=g)
    ae = build_autoencoder(ae_cfg or tiny_ae_config())
    model.vae = FluxAE(ae, ae_cfg or tiny_ae_config()).requires_grad_(False).eval()
    return model.to(dtype)
