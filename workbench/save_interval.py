"""How often to save: a checkpoint's write time against the work a failure loses (Young 1974, Daly 2006).

With checkpoints every tau seconds of training, each costing C seconds to write, and failures
arriving at random with mean time between them M (the MTBF), the share of time lost is about

    overhead(tau) = C / tau                 writing, once per interval
    lost(tau)     = (tau + C) / (2 M)       redone after a failure: on average half an interval
                                            (and the write under way), once per M

and their sum is least at Young's interval tau* = sqrt(2 C M) (Daly's higher-order terms matter
only when C is not small against M). ``plan`` turns tau* into optimizer steps from the measured
step time, as a multiple of the evaluation interval: a checkpoint is taken at a validation, so
it carries the metrics that rank it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from .checks import is_finite_number, is_integer

AUTO = "auto"  # save_every="auto": the interval is planned from the measured write time and the MTBF
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")


def parse_duration(value: object, name: str = "mtbf") -> float:
    """Seconds, from a number of seconds or a string such as ``"4h"``, ``"30m"``, ``"90s"``, ``"1.5d"``.

    Raises:
        ValueError: not a finite number > 0, nor such a string (naming the units).
    """
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"{name} {value!r} is not a duration: give seconds (14400) or a number with a unit, "
                             f"one of {', '.join(DURATION_UNITS)} (\"4h\", \"30m\")")
        value = float(match[1]) * DURATION_UNITS[match[2] or "s"]
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"{name} must be a duration > 0, in seconds or as \"4h\", not {value!r}")
    return float(value)


def check_save_every(save_every: object, mtbf: object) -> float | None:
    """The MTBF in seconds for ``save_every="auto"``, None for an integer interval.

    Raises:
        ValueError: save_every neither an integer >= 1 nor "auto"; "auto" without an MTBF, or an MTBF
            with an integer interval; a bad MTBF (``parse_duration``).
    """
    if save_every == AUTO:
        if mtbf is None:
            raise ValueError("save_every='auto' (--save-every auto) needs mtbf (--mtbf), the expected time between "
                             "failures, e.g. mtbf='4h', to weigh a checkpoint's write time against lost work")
        return parse_duration(mtbf)
    if not is_integer(save_every) or save_every < 1:
        raise ValueError(f"save_every must be an integer >= 1 or 'auto', not {save_every!r}")
    if mtbf is not None:
        raise ValueError(f"mtbf (--mtbf) is for save_every='auto' (--save-every auto), which picks the interval "
                         f"from it; with save_every={save_every} it would be ignored")
    return None


def young_daly(write_seconds: float, mtbf_seconds: float) -> float:
    """tau* = sqrt(2 C M): the checkpoint interval (seconds of training) that wastes least time."""
    return math.sqrt(2.0 * write_seconds * mtbf_seconds)


def overhead(interval_seconds: float, write_seconds: float) -> float:
    """C / tau: the share of the run's time spent writing checkpoints."""
    return write_seconds / interval_seconds


def lost_work(interval_seconds: float, write_seconds: float, mtbf_seconds: float) -> float:
    """(tau + C) / (2 M): the expected share of the run's time redone after failures."""
    return (interval_seconds + write_seconds) / (2.0 * mtbf_seconds)


@dataclass(frozen=True)
class SavePlan:
    """The interval ``save_every="auto"`` chose, and why: a run records it (``RunRecord.save_plan``)."""

    steps: int  # the interval, in optimizer steps
    write_seconds: float  # the mean measured write time of the run's checkpoints so far
    step_seconds: float  # the mean measured time of an optimizer step (validation and saving left out)
    mtbf_seconds: float
    optimal_seconds: float  # Young's tau* = sqrt(2 C M)
    overhead: float  # C / tau at the chosen interval
    lost_work: float  # (tau + C) / (2 M) at the chosen interval
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(write_seconds: float, step_seconds: float, mtbf_seconds: float, eval_every: int) -> SavePlan:
    """The checkpoint interval in steps: Young's tau* in steps of ``step_seconds``, rounded to the nearest
    multiple of ``eval_every`` and never below it (a checkpoint is taken where the run validates)."""
    optimal = young_daly(write_seconds, mtbf_seconds)
    ideal = optimal / step_seconds
    multiples = max(1, round(ideal / eval_every))
    steps = multiples * eval_every
    seconds = steps * step_seconds
    why = (f"Young/Daly: sqrt(2 x {write_seconds:.3g} s write x {mtbf_seconds:g} s MTBF) = {optimal:.3g} s "
           f"= {ideal:.1f} steps of {step_seconds:.3g} s; ")
    why += (f"raised to the evaluation interval, {eval_every} steps (a checkpoint is taken at a validation)"
            if ideal < eval_every else f"rounded to {multiples} evaluation intervals of {eval_every} steps")
    return SavePlan(steps, write_seconds, step_seconds, mtbf_seconds, optimal, overhead(seconds, write_seconds),
                    lost_work(seconds, write_seconds, mtbf_seconds), why)
