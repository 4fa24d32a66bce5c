"""One MCoT record -> FoX's separately trained tasks (plus the multi-step record), as raw record dicts.

FoX trains planning, reflection and correction as separate tasks. From a record
``prompt, plan, draft, reflect, [refine]`` (``input_image`` and other keys are kept):

============  ==========================================  ==============================================
task          steps                                       supervised (``supervise``)
============  ==========================================  ==============================================
``plan-act``  plan, draft = the *correct* image           plan, draft (the refine image when the
                                                          reflection says ``revise``, else the draft)
``reflect``   plan, draft, reflect                        reflect (the draft is context, ok or broken)
``correct``   plan, draft, reflect, refine                refine (only when there is a refine)
``mcot``      every step                                  every step except a draft the reflection
                                                          rejects (the model must not learn to draw it)
============  ==========================================  ==============================================

A record without a plan gets the same tasks without it; one without a reflect yields ``plan-act``
(its draft taken as correct) only. Each task's ``id`` is the record's ``id`` + ``"#" + task``; the
task name is also in ``meta["mcot_task"]``. The records are still validated by
:meth:`~ftkit.data.schema.StepRecord.from_dict` when loaded.
"""

from __future__ import annotations

import copy

TASKS = ("plan-act", "reflect", "correct", "mcot")


def split_tasks(record: dict, tasks: tuple[str, ...] | list[str] = TASKS) -> list[dict]:
    """The records of ``tasks`` (a subset of :data:`TASKS`, in that order) built from ``record``."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown MCoT task {bad[0]!r}; known: {', '.join(TASKS)}")
    steps = record.get("steps") or []
    types = [s.get("type") for s in steps]
    plan = [steps[types.index("plan")]] if "plan" in types else []
    if "draft" not in types:
        raise ValueError(f"record {record.get('id')!r}: has no draft step to split into tasks")
    draft = steps[types.index("draft")]
    reflect = steps[types.index("reflect")] if "reflect" in types else None
    refine = steps[types.index("refine")] if "refine" in types else None
    revise = reflect is not None and reflect.get("verdict") == "revise"
    if revise and refine is None:
        correct_image = None  # the right image is unknown: no plan-act sample
    else:
        correct_image = refine["image"] if revise else draft["image"]
    plan_t = ["plan"] if plan else []

    def make(task: str, new_steps: list[dict], supervise: list[str]) -> dict:
        out = copy.deepcopy({k: v for k, v in record.items() if k not in ("steps", "supervise")})
        out["id"] = f"{record.get('id')}#{task}"
        out["meta"] = {**(out.get("meta") or {}), "mcot_task": task}
        out["steps"] = copy.deepcopy(new_steps)
        out["supervise"] = supervise
        return out

    outs = []
    for task in (t for t in TASKS if t in tasks):
        if task == "plan-act" and correct_image is not None:
            outs.append(make(task, [*plan, {"type": "draft", "image": correct_image, "partial": False}],
                             [*plan_t, "draft"]))
        elif task == "reflect" and reflect is not None:
            outs.append(make(task, [*plan, draft, reflect], ["reflect"]))
        elif task == "correct" and revise and refine is not None:
            outs.append(make(task, [*plan, draft, reflect, refine], ["refine"]))
        elif task == "mcot" and reflect is not None:
            keep = [t for t in dict.fromkeys(types) if t != "draft" or not revise]
            outs.append(make(task, list(steps), keep))
    return outs
