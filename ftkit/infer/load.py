"""Load a model folder (+ an adapter) for inference: :func:`load_for_inference`.

Any folder ftkit can generate with (the kinds :func:`ftkit.models.folders.detect_model_folder` tells apart):

* a BAGEL release folder (``llm_config.json``, ``vit_config.json``, ``ema.safetensors``, ``ae.safetensors``,
  tokenizer files), as downloaded or as written by ``ftkit merge`` into one file;
* a merged BAGEL folder written in shards (``model-0000i-of-0000n.safetensors`` +
  ``model.safetensors.index.json``, what ``ftkit merge`` writes above ``--max-shard-size``);
* an ftkit FoX folder (``config.json`` with ``"model_type": "ftkit-fox"``);

optionally with a trained adapter folder on top (``adapter_config.json``, ``adapter_model.safetensors``,
``ftkit_adapter.json``). :func:`check_finite` refuses a diverged model before any generation.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from ftkit.models.folders import DTYPES, detect_model_folder

log = logging.getLogger("ftkit")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given.

    Raises:
        ValueError: a CUDA device is asked for on a machine without one.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (use --device cpu)")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA, fp32 on CPU; ``"fp32" | "bf16" | "fp16"`` (or a torch dtype) as given.

    Raises:
        ValueError: unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _adapter_base(adapter: Path) -> tuple[str | None, list[str]]:
    """(recorded base path, experts the adapter was trained with) from ``ftkit_adapter.json``."""
    from ftkit.adapters.io import AdapterFolder

    ad = AdapterFolder(adapter)
    return (ad.meta.get("base") or {}).get("path"), ad.experts


def adapter_inpaint(adapter: str | os.PathLike) -> str:
    """The sampler's ``inpaint`` mode an adapter was trained for: ``"clean"`` when ``ftkit fit`` recorded
    ``region_noise`` in its ``ftkit_adapter.json`` (region-conditioned refinement), else ``"path"``."""
    from ftkit.adapters.io import AdapterFolder

    return "clean" if (AdapterFolder(Path(adapter)).meta.get("extra") or {}).get("region_noise") else "path"


def load_for_inference(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                       dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                       quantize: str | None = None):
    """Load a model folder (+ an adapter) for generation; returns ``(model, tokenizer)`` in eval mode with
    every parameter frozen.

    The folder kind is detected (:func:`detect_model_folder`): BAGEL release / merged folder
    (:func:`ftkit.models.loading.load_bagel`), sharded merged folder (also :func:`~ftkit.models.loading.load_bagel`) or FoX
    (:func:`ftkit.models.fox.load_fox`). With ``adapter``, the base is loaded the way the adapter was
    trained (an adapter trained on a three-expert upcycled BAGEL loads the base with ``three_experts``),
    then :func:`ftkit.adapters.io.load_adapter` attaches it and checks shapes and architecture. The base
    path recorded in the adapter's ``ftkit_adapter.json`` is compared with ``model_path``: a difference
    only warns (a copied folder is fine; a merged folder that already contains this adapter would apply
    it twice).

    Args:
        model_path: the model folder.
        adapter: an adapter folder (``ftkit fit`` writes ``runs/<recipe>/<run>/adapter``).
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        quantize: ``None``, ``"nf4"`` or ``"int8"``: decoder Linear layers as bitsandbytes layers.

    Raises:
        FileNotFoundError: model or adapter folder (or a file in them) missing; the message names it.
        ValueError: unknown dtype / device, quantizing a sharded folder; ``AdapterError`` /
            ``CheckpointError`` (ValueError subclasses) for an adapter that does not fit or broken weights.
    """
    from ftkit.adapters.io import load_adapter

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder = Path(model_path)
    kind = detect_model_folder(folder)
    three_experts = False
    if adapter is not None:
        adapter = Path(adapter)
        recorded, experts = _adapter_base(adapter)
        three_experts = "_moe_sem" in experts
        if recorded is not None and Path(recorded).resolve() != folder.resolve():
            msg = (f"{adapter}: adapter was trained on {recorded}, loading it on {folder.resolve()} (fine for a copy "
                   "of that base; a merged folder that already contains this adapter would apply it twice)")
            warnings.warn(msg, stacklevel=2)
    if kind == "fox":
        from ftkit.models.fox import load_fox, load_fox_tokenizer

        model = load_fox(folder, dtype=dt, device=dev, quantize=quantize)
        tokenizer = load_fox_tokenizer(folder, vocab_size=model.cfg.llm.vocab_size)
    else:  # "bagel" or "bagel-sharded": load_bagel reads ema.safetensors or the shards' index
        from ftkit.models.loading import load_bagel, load_tokenizer

        # three_experts only upcycles a two-expert folder; a three-expert (merged) folder loads as it is
        model = load_bagel(folder, dtype=dt, device=dev, quantize=quantize, three_experts=three_experts)
        tokenizer = load_tokenizer(folder)
    if adapter is not None:
        load_adapter(model, adapter)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s model from %s%s (%s, %s)", kind, folder, f" + adapter {adapter}" if adapter else "", dt, dev)
    return model, tokenizer


def check_finite(model, source) -> None:
    """Refuse weights with NaN/inf (a diverged adapter would draw black images): names ``source`` and a tensor."""
    from ftkit.models.loading import CheckpointError

    for n, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{source}: weight {n} holds non-finite values (NaN/inf); refusing to generate "
                                  "from a diverged model")


__all__ = ["check_finite", "import_spec", "load_for_inference", "resolve_device", "resolve_dtype"]


def import_spec(spec: str, option: str, expected: str) -> object:
    """The object named by ``"package.module:attr"`` (a ``--detector`` / ``--judge`` style option).

    Raises:
        ValueError: naming ``option``: a malformed spec (saying ``expected``) or an import failure.
    """
    import importlib

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{option} {spec!r}: expected {expected}")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{option} {spec!r}: cannot import ({type(e).__name__}: {e})") from e
