"""Multi-orientation QSM (COSMOS) of one orientation set, fed by the scans' own workflows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.bids import derivative_path, orientation_set_entities
from qsmflow.interfaces.cosmos import AlignOrientation, COSMOSMetadata, SolveCOSMOS
from qsmflow.interfaces.derivatives import WriteDerivatives
from qsmflow.interfaces.recon import ReferenceSusceptibility
from qsmflow.workunits import declare_unit

#: ITK threads (and declared n_procs) of each orientation's rigid registration.
REGISTRATION_THREADS = 2


def orientation_fields(index: int) -> tuple[str, str, str]:
    """``inputnode`` fields of the orientation at ``index`` (0: the reference)."""
    return f"magnitude_{index}", f"qsm_mask_{index}", f"local_field_{index}"


def init_cosmos_wf(members, config: dict, output_dir, *, shape, name: str = "cosmos_wf"):
    """COSMOS susceptibility of one orientation set on the grid of its first scan.

    Workflow graph: each other orientation's first-echo magnitude is rigidly registered to the
    reference's (one ``align_<scan>`` node per orientation, so adding an orientation runs only
    its own registration) and its local field resampled onto the reference grid → closed-form
    COSMOS with masked least-squares refinement on the intersection of the masks → reference →
    write ``_rec-cosmos_Chimap.nii.gz`` and ``_rec-cosmos_desc-qsm_mask.nii.gz``.

    Parameters
    ----------
    members : list of qsmflow.bids.Scan
        The orientation set (:func:`qsmflow.bids.orientation_sets`), reference first.
    config : dict
        Validated configuration; reads ``cosmos`` and ``reference``.
    output_dir : path
        Root of the derivatives dataset.
    shape : tuple of int
        Image shape, to declare each node's memory.

    Inputs (``inputnode``, connected to each scan workflow's ``outputnode``)
    ------------------------------------------------------------------------
    magnitude_<i>, qsm_mask_<i>, local_field_<i>
        Of orientation ``i`` of ``members`` (:func:`orientation_fields`).

    Outputs (``outputnode``)
    ------------------------
    chi
        Referenced COSMOS susceptibility (ppm) in the work directory.
    qsm_mask
        Intersection of the orientations' masks on the reference grid.
    rotations, b0_directions
        Recovered rotation (degrees about x, y, z) of each non-reference orientation, concatenated
        (3 values each); B0 direction of every orientation in the reference voxel axes (a list of
        3-vectors, reference first).
    chimap
        Path of the written ``_rec-cosmos_Chimap.nii.gz``.

    The workflow is the set's unit of work (kind ``cosmos``), done when its Chimap is written.
    """
    if len(members) < 2:
        names = ", ".join(f"{s.name}_{s.suffix}" for s in members)
        raise ValueError(f"COSMOS orientation set [{names}] has {len(members)} scan(s); two or more are needed")
    settings = config["cosmos"]
    for key, allowed in (("weighting", ("none", "noise")), ("interpolation", ("bSpline", "linear", "lanczosWindowedSinc"))):
        if settings[key] not in allowed:
            raise ValueError(f"configuration key 'cosmos.{key}': {settings[key]!r} is not one of {', '.join(allowed)}")
    if not 0 < float(settings["threshold"]) < 4.0 / 9.0:
        raise ValueError(f"configuration key 'cosmos.threshold': {settings['threshold']!r} is not in (0, 4/9)")
    if int(settings["iterations"]) < 0:
        raise ValueError(f"configuration key 'cosmos.iterations': {settings['iterations']!r} is negative")
    entities = orientation_set_entities(members)
    chimap_path = derivative_path(".", entities, "Chimap")
    reference_scan = members[0]
    workflow = declare_unit(
        pe.Workflow(name=name), kind="cosmos", name=chimap_path.name.replace("_Chimap.nii.gz", ""),
        subject=reference_scan.subject, outputs=[str(chimap_path)],
    )
    volume_gb = float(np.prod(shape)) * 4 / 1024**3
    inputnode = pe.Node(niu.IdentityInterface(fields=[f for i in range(len(members)) for f in orientation_fields(i)]
                                              + ["reference_brain_mask", "reference_dseg", "reference_dseg_tsv"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["chi", "qsm_mask", "rotations", "b0_directions", "chimap"]),
                         name="outputnode")

    others = members[1:]
    merged = {key: pe.Node(niu.Merge(len(others)), name=f"merge_{key}", run_without_submitting=True)
              for key in ("fields", "masks", "directions", "rotations", "registrations")}
    reference_magnitude, reference_mask, reference_field = orientation_fields(0)
    for index, scan in enumerate(others, start=1):
        magnitude, mask, field = orientation_fields(index)
        align = pe.Node(AlignOrientation(interpolation=settings["interpolation"], threads=REGISTRATION_THREADS),
                        name=f"align_{scan.node_name}_{scan.suffix}", n_procs=REGISTRATION_THREADS,
                        mem_gb=round(max(0.5, 30 * volume_gb), 2))
        workflow.connect([
            (inputnode, align, [(reference_magnitude, "reference_magnitude"), (magnitude, "magnitude"), (mask, "mask"),
                                (field, "local_field")]),
            (align, merged["fields"], [("local_field", f"in{index}")]),
            (align, merged["masks"], [("mask", f"in{index}")]),
            (align, merged["directions"], [("b0_direction", f"in{index}")]),
            (align, merged["rotations"], [("rotation_degrees", f"in{index}")]),
            (align, merged["registrations"], [("provenance", f"in{index}")]),
        ])

    solve = pe.Node(SolveCOSMOS(weighting=settings["weighting"],
                                parameters={"threshold": float(settings["threshold"]),
                                            "iterations": int(settings["iterations"])}),
                    name="solve_cosmos", n_procs=1, mem_gb=round(max(0.5, (6 * len(members) + 20) * volume_gb), 2))
    reference = pe.Node(ReferenceSusceptibility(method=config["reference"]["method"]), name="reference_chi",
                        mem_gb=round(max(0.25, 4 * volume_gb), 2))
    if config["reference"].get("erosion_mm") is not None:
        reference.inputs.erosion_mm = float(config["reference"]["erosion_mm"])

    def bids_uri(scan):
        root = Path(scan.magnitude_files[0]).parents[3 if scan.entities.get("session") else 2]
        return f"bids:raw:{Path(scan.magnitude_files[0]).relative_to(root).as_posix()}"

    metadata = pe.Node(COSMOSMetadata(orientation_files=[bids_uri(s) for s in members], entities=entities),
                       name="cosmos_metadata", run_without_submitting=True)
    to_write = pe.Node(niu.Merge(2), name="collect_outputs", run_without_submitting=True)
    writer = pe.Node(WriteDerivatives(output_dir=str(output_dir)), name="write_derivatives", mem_gb=0.5, n_procs=1)
    # cheap, rewrites nothing unchanged, and restores outputs deleted since the last run
    writer.overwrite = True
    pick_chimap = pe.Node(niu.Select(index=[1]), name="select_chimap", run_without_submitting=True)

    workflow.connect([
        (inputnode, solve, [(reference_field, "reference_field"), (reference_mask, "reference_mask")]),
        (merged["fields"], solve, [("out", "aligned_fields")]),
        (merged["masks"], solve, [("out", "aligned_masks")]),
        (merged["directions"], solve, [("out", "b0_directions")]),
        (solve, reference, [("chi", "chi"), ("mask", "mask")]),
        # the reference orientation's brain mask and labels share the COSMOS grid (brain/csf references)
        (inputnode, reference, [("reference_brain_mask", "brain_mask"), ("reference_dseg", "labels"),
                                ("reference_dseg_tsv", "table")]),
        (merged["rotations"], metadata, [("out", "rotations")]),
        (merged["registrations"], metadata, [("out", "registrations")]),
        (solve, metadata, [("b0_directions", "b0_directions"), ("provenance", "solver")]),
        (reference, metadata, [("provenance", "reference")]),
        (solve, to_write, [("mask", "in1")]),
        (reference, to_write, [("chi", "in2")]),
        (to_write, writer, [("out", "in_files")]),
        (metadata, writer, [("specs", "specs")]),
        (writer, pick_chimap, [("out_files", "inlist")]),
        (reference, outputnode, [("chi", "chi")]),
        (solve, outputnode, [("mask", "qsm_mask"), ("b0_directions", "b0_directions")]),
        (merged["rotations"], outputnode, [("out", "rotations")]),
        (pick_chimap, outputnode, [("out", "chimap")]),
    ])
    return workflow


def connect_orientation_set(parent, cosmos_wf, scan_workflows) -> None:
    """Feed ``cosmos_wf`` from the scans' workflows (in set order) inside ``parent``: each scan's
    ``outputnode.magnitude``, ``qsm_mask`` and ``local_field``, so the per-scan nodes (mask,
    unwrapping, echo fit, background removal) are the same cached nodes as the scan's own Chimap."""
    for index, scan_wf in enumerate(scan_workflows):
        magnitude, mask, field = orientation_fields(index)
        parent.connect([(scan_wf, cosmos_wf, [
            ("outputnode.magnitude", f"inputnode.{magnitude}"),
            ("outputnode.qsm_mask", f"inputnode.{mask}"),
            ("outputnode.local_field", f"inputnode.{field}"),
        ])])
    parent.connect([(scan_workflows[0], cosmos_wf, [
        ("outputnode.brain_mask", "inputnode.reference_brain_mask"),
        ("outputnode.dseg", "inputnode.reference_dseg"),
        ("outputnode.dseg_tsv", "inputnode.reference_dseg_tsv"),
    ])])
