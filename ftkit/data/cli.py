"""``ftkit data``: validate, preview, list and generate (shapes) datasets.

    ftkit data validate NAME|PATH [--format F] [--registry FILE] [--split S] [--min-size N]
    ftkit data preview NAME|PATH --out FILE.png [--n 8] [--format F] [--registry FILE]
    ftkit data list [--registry FILE]
    ftkit data shapes --out DIR --n N --seed S [--size 64]     (ftkit.data.shapes)
    ftkit data self-critique ...   (parsed and run by ftkit.infer.cli.self_critique_main; routed by ftkit.cli)

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

    sub.add_parser("self-critique", help="the model's own drafts, judged, as reflection / correction records "
                   "(ftkit data self-critique --help; ftkit.infer.selfcritique)", add_help=False)
    return p


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
        return _list(args)
    except (FtkitError, UnknownDatasetError, RegistryError, FileNotFoundError) as e:
        print(f"ftkit data {args.verb}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. InvalidDatasetError, unreadable file type
        print(f"ftkit data {args.verb}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
