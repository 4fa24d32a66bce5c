"""``ftkit merge``: fold a trained adapter into a BAGEL release folder (:func:`ftkit.adapters.merge.merge`) or a
FoX checkpoint folder (:func:`ftkit.adapters.merge_fox.merge_fox`, chosen when ``--base``'s config.json has
``model_type: "ftkit-fox"``)."""

from __future__ import annotations

import argparse
import sys

USAGE_EPILOG = """\
examples:
  ftkit merge --base models/BAGEL-7B-MoT --adapter runs/bagel-mcot/latest/adapter --out models/bagel-mcot
  ftkit merge --base B --adapter A --out O --max-shard-size 5GB      # shards + index (upstream will not load them)
  ftkit merge --base models/fox-shared --adapter runs/fox/latest/adapter --out models/fox-merged   # FoX folder
QLoRA adapters merge into the unquantized release folder (never into 4-bit weights)."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ftkit merge", description="Merge an adapter into a BAGEL release folder "
                                 "(streaming: peak RAM ~ the adapter plus one 64 MiB block) or a FoX folder "
                                 "(in memory; written as one model.safetensors).",
                                 epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the unquantized release folder the adapter was trained on")
    ap.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json, adapter_model.safetensors, "
                                                     "ftkit_adapter.json)")
    ap.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="dtype of the written weights")
    ap.add_argument("--max-shard-size", default="none",
                    help="default 'none': one ema.safetensors, the file upstream BAGEL's app.py / inferencer "
                         "load; a size (e.g. 5GB) writes shards + model.safetensors.index.json, which ftkit and "
                         "accelerate read but upstream's loader does not")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--no-verify", action="store_true", help="skip the probe-batch comparison with base + adapter")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max abs difference allowed by verification (default 1e-4 fp32, 2e-2 bf16/fp16)")
    return ap


def merge_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ftkit merge``; returns the exit status (0 ok, 1 failed, 2 bad usage)."""
    a = build_parser().parse_args(argv)
    from ftkit.adapters.io import AdapterError
    from ftkit.adapters.merge import merge
    from ftkit.adapters.merge_common import MergeError, verification_text
    from ftkit.adapters.merge_fox import is_fox_folder, merge_fox
    from ftkit.errors import FtkitError

    try:
        if is_fox_folder(a.base):
            if a.max_shard_size != build_parser().get_default("max_shard_size"):
                print("ftkit merge: note: --max-shard-size is ignored for a FoX base (load_fox reads one "
                      "model.safetensors)", file=sys.stderr)
            rep = merge_fox(a.base, a.adapter, a.out, dtype=a.dtype, overwrite=a.overwrite, verify=not a.no_verify,
                            tolerance=a.tolerance)
        else:
            rep = merge(a.base, a.adapter, a.out, dtype=a.dtype, max_shard_size=a.max_shard_size,
                        overwrite=a.overwrite, verify=not a.no_verify, tolerance=a.tolerance, progress=True)
    except (FileNotFoundError, FileExistsError, AdapterError, MergeError, FtkitError, OSError, ValueError) as e:
        print(f"ftkit merge: error: {e}", file=sys.stderr)
        return 1
    print(f"merged {rep.merged} projections ({rep.method})"
          + (f", replaced {rep.replaced} modules_to_save tensors" if rep.replaced else "")
          + (f", upcycled {rep.upcycled} _moe_sem tensors" if rep.upcycled else "")
          + f"; {rep.tensors} tensors, {rep.total_bytes / 1e9:.3f} GB in {rep.seconds:.1f} s")
    if hasattr(rep, "fox_mode_out"):
        print(f"FoX: fox_mode {rep.fox_mode_in} -> {rep.fox_mode_out}"
              + (f"; untied experts {[s or 'base' for s in rep.untied_experts]}" if rep.untied_experts else "")
              + (f"; still shared {rep.shared_experts}" if rep.shared_experts else ""))
    if rep.max_diff is not None:
        print(f"verification: {verification_text(rep)}")
    else:
        print("verification: skipped (--no-verify)")
    print(f"wrote {rep.out}: {', '.join(rep.files)}")
    if getattr(rep, "sharded", False):
        print("note: sharded output (--max-shard-size): upstream BAGEL's loader reads only ema.safetensors and will "
              "not open this folder; ftkit and accelerate do. Merge with --max-shard-size none for upstream.")
    return 0


if __name__ == "__main__":
    sys.exit(merge_main())
