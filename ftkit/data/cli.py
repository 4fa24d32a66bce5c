"""``ftkit data``: validate, preview, list and generate (shapes) datasets.

    ftkit data validate NAME|PATH [--format F] [--registry FILE] [--split S] [--min-size N]
    ftkit data preview NAME|PATH --out FILE.png [--n 8] [--format F] [--registry FILE]
    ftkit data list [--registry FILE]
    ftkit data shapes --out DIR --n N --seed S [--size 64]     (ftkit.data.shapes)
    ftkit data self-critique --model M [--adapter A] --prompts RECORDS.jsonl [--judge shapes|MODULE:FN] --out DIR
                                                               (ftkit.infer.selfcritique)

Exit status: 0 on success, 1 when ``validate`` finds bad records, 2 on usage / lookup errors.
"""

from __future__ import annotations

import argparse
import sys

from ftkit.data.registry import FORMATS, RegistryError, UnknownDatasetError
from ftkit.errors import FtkitError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftkit data", description="validate, preview, list and generate datasets")
    sub = p.add_subparsers(dest="verb", required=True, metavar="{validate,preview,list,shapes,self-critique}")

    def common(sp):
        sp.add_argument("dataset", help="registry name or path (file / folder)")
        sp.add_argument("--format", choices=FORMATS, default=None, help="override the format")
        sp.add_argument("--registry", action="append", default=None,
                        help="extra registry YAML (repeatable; also $FTKIT_DATA_REGISTRY)")
        sp.add_argument("--split", default=None, help="split of a registry entry")

    v = sub.add_parser("validate", help="check every record; print a summary and each problem")
    common(v)
    v.add_argument("--min-size", type=int, default=16, help="smallest allowed image side (pixels)")
    v.add_argument("--no-images", action="store_true", help="schema only, do not decode images")

    pv = sub.add_parser("preview", help="contact sheet PNG of a few records")
    common(pv)
    pv.add_argument("--out", required=True, help="output PNG")
    pv.add_argument("--n", type=int, default=8, help="records to show")
    pv.add_argument("--cell", type=int, default=192, help="panel size in pixels")

    ls = sub.add_parser("list", help="registered datasets")
    ls.add_argument("--registry", action="append", default=None)

    sub.add_parser("shapes", help="generate shapes-world records (ftkit data shapes --help)", add_help=False)

    sc = sub.add_parser("self-critique", help="the model's own drafts, judged, as reflection / correction records")
    sc.add_argument("--model", required=True, help="base model folder")
    sc.add_argument("--adapter", default=None, help="adapter folder (the round being improved)")
    sc.add_argument("--prompts", required=True, help="records.jsonl whose records carry GenEval meta (shapes world)")
    sc.add_argument("--judge", default="shapes", help="shapes (default) or MODULE:FUNCTION (ftkit.infer.selfcritique)")
    sc.add_argument("--out", required=True, help="output folder (records.jsonl, images/, summary.json)")
    sc.add_argument("--n", type=int, default=None, help="first N prompts, balanced over categories (default all)")
    sc.add_argument("--batch", type=int, default=16, help="prompts per sampler call")
    sc.add_argument("--steps", type=int, default=50, help="Euler steps of the flow sampler")
    sc.add_argument("--size", type=int, default=64, help="image side in pixels")
    sc.add_argument("--seed", type=int, default=0, help="prompt i draws its noise from seed + i")
    sc.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sc.add_argument("--no-progress", action="store_true")
    return p


def _self_critique(args) -> int:
    import json
    from pathlib import Path

    from ftkit.infer.cli import check_finite, check_out_dir
    from ftkit.infer.evaluate import balanced_subset
    from ftkit.infer.load import load_for_inference
    from ftkit.infer.mcot import SamplerSettings
    from ftkit.infer.selfcritique import load_judge, self_critique
    from ftkit.models.release import atomic_dir

    out = check_out_dir(args.out, args.overwrite)
    src = Path(args.prompts)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: prompts file not found")
    records = []
    for ln, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{src}:line {ln}: not JSON ({e.msg})") from e
    if args.n is not None:
        records = balanced_subset(records, args.n)
    judge = load_judge(args.judge, root=src.parent)
    model, tok = load_for_inference(args.model, args.adapter)
    check_finite(model, args.adapter or args.model)
    with atomic_dir(out, overwrite=True) as tmp:
        summary = self_critique(model, tok, records, judge, tmp, batch_size=args.batch, image_hw=(args.size, args.size),
                                sampler=SamplerSettings(num_timesteps=args.steps), seed=args.seed,
                                progress=not args.no_progress)
    print(f"{summary['prompts']} prompts: drafts ok {summary['ok']}, revise {summary['revise']}, skipped "
          f"{summary['skipped']}; wrote {summary['records']} records ({summary['corrections']} corrections) to {out}")
    return 0


def _validate(args) -> int:
    from ftkit.data.validate import validate

    report = validate(args.dataset, format=args.format, registry=args.registry, split=args.split,
                      min_size=args.min_size, images=not args.no_images)
    print(report.summary())
    for prob in report.problems:
        print(str(prob))
    return 0 if report.ok else 1


def _preview(args) -> int:
    from ftkit.data.dataset import load_records
    from ftkit.data.preview import contact_sheet
    from ftkit.data.schema import RecordError

    ds = load_records(args.dataset, registry=args.registry, split=args.split, format=args.format, check=False)
    recs, skipped = [], 0
    for i in range(len(ds)):
        if len(recs) >= args.n:
            break
        try:
            recs.append(ds[i])
        except RecordError as e:
            skipped += 1
            print(f"skipping invalid record: {e}", file=sys.stderr)
    if not recs:
        print(f"ftkit data preview: no valid record in {args.dataset}", file=sys.stderr)
        return 1
    out = contact_sheet(recs, args.out, cell=args.cell)
    print(f"wrote {out} ({len(recs)} records{f', {skipped} invalid skipped' if skipped else ''})")
    return 0


def _list(args) -> int:
    from ftkit.data.registry import Registry

    reg = Registry.load(args.registry)
    if not reg.names():
        print("no datasets registered")
        return 0
    print(f"{'name':<24} {'format':<11} {'split':<8} {'weight':>6}  paths")
    for name in reg.names():
        s = reg.get(name)
        paths = "; ".join(f"{sp}: {', '.join(ps)}" for sp, ps in s.paths.items())
        print(f"{name:<24} {s.format:<11} {s.split:<8} {s.weight:>6g}  {paths}")
        if s.description:
            print(f"{'':<24} {s.description}")
    print(f"(registry files: {', '.join(reg.files)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "shapes":
        from ftkit.data import shapes

        return int(shapes.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    try:
        if args.verb == "validate":
            return _validate(args)
        if args.verb == "preview":
            return _preview(args)
        if args.verb == "self-critique":
            return _self_critique(args)
        return _list(args)
    except (FtkitError, UnknownDatasetError, RegistryError, FileNotFoundError, FileExistsError) as e:
        print(f"ftkit data {args.verb}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. InvalidDatasetError, unreadable file type
        print(f"ftkit data {args.verb}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
