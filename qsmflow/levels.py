"""The analysis levels (``participant``, ``group``, ``atlas``): what each one runs.

A level is a function ``build(bids_dir, output_dir, config, participant_labels) -> LevelPlan``
registered in :data:`LEVELS`. It finds its inputs, reports what it cannot process, and returns
a nipype workflow whose units of work are declared (:mod:`qsmflow.workunits`). The command
line runs every level the same way (:func:`qsmflow.cli.run_level`): records for ``qsmflow
status``, the progress display, resuming from the cache, and the table of failures.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from .workunits import WorkUnit, collect_units


@dataclass
class Problem:
    """A unit of work refused before the run (its inputs failed a check)."""

    unit: str
    subject: str | None
    reason: str


@dataclass
class LevelPlan:
    """What a level will run.

    Attributes
    ----------
    workflow : nipype Workflow
        With its units of work declared.
    problems : list of Problem
        Units that cannot start, each with a one-line reason naming the file.
    noun : str
        What the level's summary counts (``scan``, ``fit``, ``template`` ...): units of this kind.
    units : list of WorkUnit
        Filled from ``workflow`` by :meth:`collect`.
    after_failures : callable, optional
        Called with the run's failures (``qsmflow.execution.Failure``) when some units failed,
        to write what can still be written from the units that finished (the participant
        level: the report pages of subjects with a failed scan).
    """

    workflow: object
    problems: list = field(default_factory=list)
    noun: str = "scan"
    units: list = field(default_factory=list)
    after_failures: object = None

    def collect(self) -> "LevelPlan":
        self.units = collect_units(self.workflow)
        return self

    @property
    def counted(self) -> list[WorkUnit]:
        """The units the summary counts (those of kind ``noun``, or all if none is)."""
        chosen = [unit for unit in self.units if unit.kind == self.noun]
        return chosen or self.units


def participant_level(bids_dir: Path, output_dir: Path, config: dict, participant_labels=()) -> LevelPlan:
    """Reconstruct (and analyse) every scan of the selected participants."""
    from .bids import collect_scans
    from .workflows.base import init_participant_wf

    scans, invalid = collect_scans(bids_dir, participant_labels, field_strength=config["input"]["field_strength"])
    problems = [Problem(unit=name, subject=name.split("_")[0][4:], reason=reason) for name, reason in invalid]
    workflow = init_participant_wf(scans, config, output_dir) if scans else None
    after_failures = None
    if config["report"]["enabled"]:
        from .workflows.reports import report_unfinished_subjects

        def after_failures(failures):
            return report_unfinished_subjects(scans, failures, config, output_dir)
    return LevelPlan(workflow=workflow, problems=problems, noun="scan", after_failures=after_failures)


#: Level name -> builder, or "module:function" imported when the level is run.
LEVELS = {
    "participant": participant_level,
    "group": "qsmflow.workflows.group:group_level",
    "atlas": "qsmflow.workflows.atlas:atlas_level",
}


def level_builder(name: str):
    """The builder of level ``name`` (see :data:`LEVELS`)."""
    try:
        builder = LEVELS[name]
    except KeyError:
        raise ValueError(f"unknown analysis level {name!r} (known: {', '.join(LEVELS)})") from None
    if isinstance(builder, str):
        module, _, function = builder.partition(":")
        builder = getattr(importlib.import_module(module), function)
    return builder
