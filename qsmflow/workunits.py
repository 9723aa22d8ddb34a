"""Units of work: what a run counts, reports and resumes (a scan, a subject, a fit, a template).

Workflow builders declare which of their sub-workflows (or nodes) is a unit with
:func:`declare_unit`; :func:`collect_units` finds them in a composed workflow and assigns every
node to the innermost unit that contains it. The command line, ``qsmflow status``, the
progress display, crash attribution and the cluster array mode read these units and never
the shape of node names, so a new level adds units without touching any of them::

    scan_wf = declare_unit(pe.Workflow(name="sub_01_MEGRE_wf"), kind="scan", name="sub-01_MEGRE",
                           subject="01", outputs=["sub-01/anat/sub-01_Chimap.nii.gz"])

A unit is *done* when every one of its ``outputs`` (paths relative to the output directory)
exists and all its nodes have finished in the cache; builders write the outputs last (see
:class:`qsmflow.interfaces.derivatives.WriteDerivatives`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

_ATTRIBUTE = "_qsmflow_unit"


@dataclass
class WorkUnit:
    """One unit of work of a run.

    Attributes
    ----------
    kind : str
        What it is: ``scan``, ``subject``, ``group``, ``band``, ``atlas`` ...
    name : str
        Display name, unique in a run (e.g. ``sub-01_MEGRE``, ``PU-exponential``).
    subject : str or None
        Participant label for per-participant units; None for units of the whole cohort.
    outputs : list of str
        Paths relative to the output directory whose presence means the unit is done.
    nodes : list of str
        Its nodes, as dotted names relative to the top workflow
        (``Workflow.list_node_names()`` form, e.g. ``sub_01_wf.sub_01_MEGRE_wf.load_echoes``).
    after : list of str
        Names of the units whose results it consumes (a group fit after every scan's ROI table):
        it is done only when they are.
    """

    kind: str
    name: str
    subject: str | None = None
    outputs: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    after: list = field(default_factory=list)

    @property
    def owner(self) -> str:
        """What the progress display groups the unit under: its subject, or itself."""
        return f"sub-{self.subject}" if self.subject else self.name

    def record(self) -> dict:
        """The unit as the JSON record :mod:`qsmflow.status` keeps."""
        return {"kind": self.kind, "name": self.name, "subject": self.subject, "outputs": list(self.outputs),
                "nodes": list(self.nodes), "after": list(self.after)}


def declare_unit(target, *, kind: str, name: str, subject: str | None = None, outputs=()):
    """Mark a nipype ``Workflow`` or ``Node`` as a unit of work; returns ``target``.

    Parameters
    ----------
    target : nipype Workflow or Node
        Its nodes (all nodes of a workflow, nested ones included, except those inside a
        nested unit) belong to the unit. Declaring several targets with the same ``name``
        (and kind and subject) makes them one unit.
    kind, name, subject, outputs
        See :class:`WorkUnit`.
    """
    if not kind or not name:
        raise ValueError("a unit of work needs a kind and a name")
    setattr(target, _ATTRIBUTE, {"kind": kind, "name": name, "subject": subject, "outputs": [str(p) for p in outputs]})
    return target


def collect_units(workflow, *, default_kind: str = "run") -> list[WorkUnit]:
    """The units declared in ``workflow``, each with its nodes, in the order first met.

    Workflows declared with the same name, kind and subject form one unit (e.g. a scan's
    reconstruction and its segmentation, built by different builders), whose outputs are the
    union of theirs. Nodes outside every declared unit belong to one unit named after
    ``workflow`` (kind ``default_kind``), so that every node is counted somewhere. Raises
    ``ValueError`` when two different units share a name.
    """
    units: dict[str, WorkUnit] = {}

    def unit_of(target, enclosing):
        declared = getattr(target, _ATTRIBUTE, None)
        if declared is None:
            return enclosing
        unit = units.get(declared["name"])
        if unit is None:
            unit = units[declared["name"]] = WorkUnit(**{**declared, "outputs": list(declared["outputs"])})
        elif (unit.kind, unit.subject) != (declared["kind"], declared["subject"]):
            raise ValueError(f"two different units of work are named {unit.name!r}")
        else:  # one unit made of several workflows, e.g. a scan's reconstruction and segmentation
            unit.outputs.extend(p for p in declared["outputs"] if p not in unit.outputs)
        return unit

    orphans = WorkUnit(kind=default_kind, name=workflow.name)

    def walk(current, prefix: str, enclosing: WorkUnit | None):
        # a Workflow's own graph holds its direct children: nodes and nested workflows
        for child in sorted(current._graph.nodes(), key=lambda c: c.name):
            unit = unit_of(child, enclosing)
            path = prefix + child.name
            if hasattr(child, "_graph"):
                walk(child, path + ".", unit)
            elif not _removed_before_running(child):
                (unit or orphans).nodes.append(path)

    walk(workflow, "", unit_of(workflow, None))
    found = [unit for unit in units.values() if unit.nodes]  # e.g. a subject with no steps of its own
    if orphans.nodes:
        found.append(orphans)
    _add_dependencies(workflow, found)
    return found


def _add_dependencies(workflow, units: list[WorkUnit]) -> None:
    """Fill each unit's ``after`` from the connections between nodes of different units, read
    from the graph nipype itself runs (``Workflow._create_flat_graph``)."""
    owner = {node: unit for unit in units for node in unit.nodes}
    top = workflow.name + "."

    def relative(node) -> str:
        name = f"{node._hierarchy}.{node.name}" if node._hierarchy else node.name
        return name[len(top):] if name.startswith(top) else name

    for source, target in workflow._create_flat_graph().edges():
        before, after = owner.get(relative(source)), owner.get(relative(target))
        if before is not None and after is not None and before is not after and before.name not in after.after:
            after.after.append(before.name)


def _removed_before_running(node) -> bool:
    """nipype drops plain IdentityInterface nodes (inputnode/outputnode) from the graph it runs
    (``Workflow._create_flat_graph``): they never run, so no unit counts them."""
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline.engine import JoinNode

    return (isinstance(getattr(node, "interface", None), IdentityInterface) and not isinstance(node, JoinNode)
            and not getattr(node, "iterables", None))


def unit_of_node(units: list[WorkUnit], node_name: str) -> WorkUnit | None:
    """The unit holding ``node_name`` (dotted, relative to the top workflow, or with the top
    workflow's name in front as nipype's crash files and callbacks give it)."""
    for unit in units:
        if node_name in unit.nodes:
            return unit
    head, _, rest = node_name.partition(".")
    if rest:
        for unit in units:
            if rest in unit.nodes:
                return unit
    return None
