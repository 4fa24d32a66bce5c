"""Paired comparison of adapters (or rounds) on the same ablation prompts.

Each argument is NAME=PATH of an ``ablation.json`` written by ``ftkit eval shapes --ablation`` with the same
``--n`` / ``--seed`` (so prompt ``i`` and its noises are the same in every run). Prints each run's scores and
reflection quality, then, for every run after the first, its difference from the first on each shared mode and
on verdict accuracy, with ftkit's paired, category-stratified bootstrap 95% interval::

    python bench/compare_adapters.py r1=abl_r1/ablation.json r2=abl_r2/ablation.json dpo=abl_dpo/ablation.json
"""

import json
import sys

from ftkit.infer.ablation import paired_bootstrap


def _fmt(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def main(argv: list[str]) -> int:
    runs = {}
    for arg in argv:
        name, sep, path = arg.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=PATH, got {arg!r}")
        with open(path) as fh:
            runs[name] = json.load(fh)
    for name, r in runs.items():
        ref = r.get("reflection") or {}
        print(f"{name}: " + ", ".join(f"{m} {r['scores'][m]['overall']:.3f}" for m in r["modes"]))
        if ref:
            iou = "n/a" if ref.get("region_iou") is None else f"{ref['region_iou']:.3f}"
            print(f"  verdict accuracy {ref['verdict_accuracy']:.3f} (always revise {ref['always_revise_accuracy']:.3f}), "
                  f"parsed {ref['parsed']:.3f}, region IoU {iou} over {ref['region_iou_n']}; {ref['confusion']}")
        print(f"  s/prompt {r['seconds_per_prompt']}")
    first, *others = runs
    base = runs[first]["prompts"]
    tags = [p["tag"] for p in base]
    for name in others:
        rows = runs[name]["prompts"]
        if [p["id"] for p in rows] != [p["id"] for p in base]:
            raise SystemExit(f"{name} and {first} ran on different prompts (same --n and --seed needed)")
        for m in runs[name]["modes"]:
            if m in runs[first]["modes"]:
                d = paired_bootstrap([p[m]["passed"] for p in rows], [p[m]["passed"] for p in base], tags)
                print(f"{name} - {first} ({m}): {_fmt(d['overall'])}")
        if "reflection" in rows[0] and "reflection" in base[0]:
            def right(ps):
                return [p["reflection"]["parsed"] and p["reflection"]["truth"] == p["reflection"]["verdict"] for p in ps]
            print(f"{name} - {first} (verdict accuracy): {_fmt(paired_bootstrap(right(rows), right(base), tags)['overall'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
