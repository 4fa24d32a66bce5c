"""Preference pairs of reflections (DPO): one context, a chosen and a rejected reflection.

A pair is a record whose last step is a reflect (the chosen one, e.g. the judge's) with a ``rejected``
reflect on the same context (the model's own wrong critique, or :func:`flipped_reflection`). Training
needs both sequences: :func:`pair_records` returns them as two ordinary records that share every step but
the last, each supervising only that reflection, so their log-probabilities compare like with like.
"""

from __future__ import annotations

from dataclasses import replace

from ftkit.data.schema import (
    BOX_MAX,
    ERR_MISSING,
    ERR_ORDER,
    PlanStep,
    RecordError,
    ReflectStep,
    Region,
    StepRecord,
)


def _chosen(record: StepRecord) -> ReflectStep:
    if not isinstance(record.steps[-1], ReflectStep):
        raise RecordError(record.source, record.index, "steps", "a preference pair needs a reflect as its last step "
                          "(the chosen one)", ERR_ORDER)
    return record.steps[-1]


def flipped_reflection(record: StepRecord) -> ReflectStep:
    """A rejected reflection made from the chosen one by flipping its verdict.

    * chosen ``revise`` -> ``ok``: "The image matches the prompt: <prompt>." with no region (the shapes judge's
      own sentence for a passing draft, so the two differ in the verdict and not in style);
    * chosen ``ok`` -> ``revise``: "The image does not match the prompt: <prompt>." flagging the plan's first box
      (else the whole image) as missing.
    """
    chosen = _chosen(record)
    prompt = record.prompt.rstrip(".")
    if chosen.verdict == "revise":
        return ReflectStep("ok", f"The image matches the prompt: {prompt}.")
    plan = next((s for s in record.steps if isinstance(s, PlanStep) and s.boxes), None)
    region = (Region(plan.boxes[0].box, plan.boxes[0].label, "missing") if plan
              else Region((0, 0, BOX_MAX, BOX_MAX), "", "missing"))
    return ReflectStep("revise", f"The image does not match the prompt: {prompt}.", [region])


def pair_records(record: StepRecord, perturb: bool = False) -> tuple[StepRecord, StepRecord]:
    """``(chosen, rejected)`` records of a preference pair, each supervising only its last (reflect) step.

    ``perturb``: a record without ``rejected`` gets :func:`flipped_reflection`; otherwise it is an error.
    Earlier reflect steps, if any, are the same tokens on the same context in both: their log-probabilities
    cancel in DPO's difference.

    Raises:
        RecordError: ``file:index:rejected`` (missing) or ``file:index:steps`` (the last step is not a reflect).
    """
    _chosen(record)
    rejected = record.rejected
    if rejected is None:
        if not perturb:
            raise RecordError(record.source, record.index, "rejected", "missing: a preference record needs one (or "
                              "set data.preference to perturb to flip the chosen verdict)", ERR_MISSING)
        rejected = flipped_reflection(record)
    chosen = replace(record, supervise=("reflect",), rejected=None)
    worse = replace(chosen, id=f"{record.id}#rejected", steps=[*record.steps[:-1], rejected])
    return chosen, worse


__all__ = ["flipped_reflection", "pair_records"]
