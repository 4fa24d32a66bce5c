"""Two other DPO pair designs for the region pairs of a self-critique folder. (A probe; not shipped.)

    python bench/dpo_pair_variants.py SC_DIR OUT_DIR --variant region-only|own-words

``SC_DIR`` is an ``ftkit data self-critique --rejected own`` folder. Its region pairs are the reflections where the
model said ``revise`` with the judge but flagged the wrong place (the rejected side has the chosen verdict,
:func:`ftkit.infer.selfcritique.wrong_own_reflection`). The model's own reflection text is read from the
folder's ``sampled/ablation.json``; every other record is copied unchanged, and so are the images (a dataset's
images must lie inside its folder).

* ``region-only``: rejected = the judge's verdict and words with the model's regions, so a pair differs only in
  its regions;
* ``own-words``: chosen = the model's words with the judge's regions, rejected = the model's own reflection, so
  the regions are contrasted in the words the model writes.

Then ``ftkit fit --config recipes/tiny-dpo.yaml --data.datasets '[OUT_DIR/records.jsonl]'`` and ``ftkit eval
shapes --ablation --ablation-modes plan-act mcot`` on development prompts (BENCHMARKS.md, "Round 2 on the judge's
fixed regions", its DPO table).
"""

import argparse
import json
import shutil
from pathlib import Path

from ftkit.data.schema import ReflectStep, step_to_dict
from ftkit.data.serialize import parse_reflection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sc_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--variant", required=True, choices=["region-only", "own-words"])
    args = ap.parse_args()
    rows = json.loads((args.sc_dir / "sampled" / "ablation.json").read_text())["prompts"]
    said = {f"{r['id']}#self-reflect": r["reflection"]["text"] for r in rows}
    args.out_dir.mkdir(parents=True, exist_ok=False)
    shutil.copytree(args.sc_dir / "images", args.out_dir / "images")
    n = 0
    with open(args.out_dir / "records.jsonl", "w", encoding="utf-8", newline="\n") as out:
        for line in (args.sc_dir / "records.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            chosen, rejected = rec["steps"][-1], rec.get("rejected")
            if rejected is not None and rejected["verdict"] == chosen["verdict"] == "revise":
                mine = parse_reflection(said[rec["id"]])
                if args.variant == "region-only":
                    rec["rejected"] = step_to_dict(ReflectStep("revise", chosen["critique"], list(mine.regions)))
                else:
                    rec["steps"][-1] = {**chosen, "critique": mine.critique}
                    rec["rejected"] = step_to_dict(mine)
                n += 1
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"{args.variant}: {n} region pairs rewritten; {args.out_dir / 'records.jsonl'}")


if __name__ == "__main__":
    main()
