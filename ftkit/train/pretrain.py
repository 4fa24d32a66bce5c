"""``ftkit pretrain-export``: a full-fine-tuning checkpoint of ``ftkit fit`` -> a BAGEL release folder.

The tiny backbone is pretrained by ``ftkit fit --config recipes/tiny-pretrain.yaml`` (full fine-tuning:
the checkpoint holds every trainable tensor, not an adapter). Exporting loads the run's initial folder
(``checkpoint["ftkit"]["model_path"]``: tokenizer, autoencoder, frozen sin-cos tables), overwrites the
trained tensors with the checkpoint's and writes the result with :func:`ftkit.models.release.save_bagel`
(``ema.safetensors`` + ``ae.safetensors`` + configs + tokenizer), plus ``pretrain.json`` (step, seconds
trained, source checkpoint), so ``ftkit eval``/``ftkit fit --model.model_path`` read it like a release.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def export_release(ckpt: str | Path, out: str | Path, *, base: str | Path | None = None,
                   dtype: torch.dtype = torch.float32, overwrite: bool = True, raw: bool = False) -> Path:
    """Write the weights of Lightning checkpoint ``ckpt`` (written by MCoTModule with full_finetune) at ``out``:
    the moving average of :class:`~ftkit.train.callbacks.WeightEMA` when the checkpoint has one (unless ``raw``),
    else the trained weights."""
    from ftkit.errors import FtkitError
    from ftkit.models.loading import load_bagel
    from ftkit.models.release import save_bagel
    from ftkit.train.faults import AtomicCheckpointIO

    st = AtomicCheckpointIO().load_checkpoint(ckpt, map_location="cpu")  # sha256 sidecar checked, no pickles
    base = Path(base or st.get("ftkit", {}).get("model_path", ""))
    if not (base / "ema.safetensors").is_file():
        raise FtkitError(f"{ckpt}: its initial model folder {base} is missing (pass --base)")
    model = load_bagel(base, dtype=torch.float32)
    ema = None if raw else st.get("ema")
    src = ema["state_dict"] if ema else st["state_dict"]
    sd = {k.removeprefix("model."): v for k, v in src.items()}
    unknown = sorted(set(sd) - set(model.state_dict()))
    if unknown:
        raise FtkitError(f"{ckpt}: tensors {unknown[:3]} are not in the model of {base}")
    model.load_state_dict(sd, strict=False)
    save_bagel(model, out, tokenizer_dir=base, dtype=dtype, overwrite=overwrite)
    info = {"step": st.get("global_step"), "epoch": st.get("epoch"), "checkpoint": str(ckpt),
            "trained_tensors": len(sd), "weights": f"ema {ema['decay']} ({ema['updates']} updates)" if ema else "trained"}
    (Path(out) / "pretrain.json").write_text(json.dumps(info, indent=2))
    return Path(out)


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ftkit pretrain-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint, e.g. RUN/checkpoints/last.ckpt")
    p.add_argument("--out", required=True, help="release folder to write (replaced when it is a model folder)")
    p.add_argument("--base", default=None, help="initial model folder (default: the one the checkpoint names)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--raw", action="store_true", help="the trained weights, not the checkpoint's moving average")
    a = p.parse_args(argv)
    out = export_release(a.ckpt, a.out, base=a.base, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype],
                         raw=a.raw)
    print(f"wrote {out} ({json.loads((out / 'pretrain.json').read_text())})")
    return 0
