"""Per-scan segmentation workflow: template registration, subject labels, reference, ROI statistics."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.bids import derivative_path
from qsmflow.interfaces.derivatives import WriteDerivatives
from qsmflow.interfaces.recon import ReferenceSusceptibility
from qsmflow.interfaces.segmentation import (
    Atlas,
    RegisterT1wToMagnitude,
    RegisterTemplate,
    ResampleToTemplate,
    RoiStatistics,
    SubjectLabels,
)

#: Fields of :func:`init_segmentation_wf`'s ``outputnode``.
OUTPUT_FIELDS = ("chi", "reference_provenance", "dseg", "dseg_tsv", "roistats", "template", "chimap_template",
                 "forward_transform", "inverse_transform", "out_files")


def segmentation_outputs(entities: dict, template_name: str) -> dict:
    """Derivative paths (relative to OUTPUT_DIR) the segmentation writes for a scan, by role;
    ``roistats`` is written last and marks the scan's segmentation done."""
    scan = {k: v for k, v in entities.items() if v is not None}
    return {
        "dseg": derivative_path(".", scan, "dseg"),
        "dseg_tsv": derivative_path(".", scan, "dseg", extension=".tsv"),
        "forward_transform": derivative_path(".", {**scan, "from": template_name, "to": "scanner", "mode": "image"},
                                             "xfm", extension=".h5"),
        "inverse_transform": derivative_path(".", {**scan, "from": "scanner", "to": template_name, "mode": "image"},
                                             "xfm", extension=".h5"),
        "chimap_template": derivative_path(".", {**scan, "space": template_name}, "Chimap"),
        "roistats": derivative_path(".", scan, "roistats", extension=".tsv"),
    }


def susceptibility_weight(segmentation: dict, *, built: bool) -> float:
    """The susceptibility channel's share of the registration metric: through a built atlas
    ``atlas.built_susceptibility_weight`` unless it is null, else ``registration.susceptibility_weight``
    (``segmentation`` is the config's ``segmentation`` section)."""
    chosen = segmentation["atlas"]["built_susceptibility_weight"] if built else None
    return float(segmentation["registration"]["susceptibility_weight"] if chosen is None else chosen)


def init_segmentation_wf(config: dict, output_dir, *, entities: dict, source_file: str, with_t1w: bool = False,
                         age: float | None = None, name: str = "segmentation_wf"):
    """Segment one scan: register the atlas template to it, carry the labels, reference the
    susceptibility map, and measure every ROI.

    Workflow graph: atlas (built-in or the user's) → [T1w rigidly to the magnitude] → template
    registration (rigid, affine, SyN; with ``susceptibility_weight`` > 0 also the scan's chi
    against the atlas' susceptibility prior) → subject labels (RN/SN/DN refined by contrast, then
    GP's boundary) → reference (needs the labels for ``reference.method: csf``) → ROI statistics, Chimap in
    template space → write derivatives (ROI table last).

    Parameters
    ----------
    config : dict
        Validated configuration (sections ``segmentation``, ``roistats``, ``reference``).
    output_dir : path
        Root of the derivatives dataset.
    entities : dict
        The scan's BIDS entities (subject, session, acquisition, run ...).
    source_file : str
        A file of the scan, for the sidecars' ``Sources``.
    with_t1w : bool
        The session has a T1w (``inputnode.t1w``): it is rigidly registered to the magnitude and
        becomes the registration target.

    Inputs (``inputnode``)
    ----------------------
    chi
        Susceptibility map from the dipole inversion, not yet referenced (ppm).
    magnitude
        Magnitude (4-D, the first echo is used).
    brain_mask, qsm_mask
        Brain mask; where chi is valid.
    t1w
        The session's T1w (only with ``with_t1w``).

    Outputs (``outputnode``)
    ------------------------
    chi, reference_provenance
        Referenced susceptibility map and the reference's sidecar entry (for the Chimap).
    dseg, dseg_tsv, roistats
        Labels in the scan's grid, their table and the ROI statistics (work directory).
    template
        The template warped into the scan's grid (registration check).
    chimap_template
        The referenced Chimap in template space.
    forward_transform, inverse_transform
        template → scanner and scanner → template (ITK composite HDF5).
    out_files
        The derivatives written (ROI table last).
    """
    segmentation = config["segmentation"]
    registration = segmentation["registration"]
    atlas_config = segmentation["atlas"]
    template_name = atlas_config["name"] if atlas_config["template"] else "MNI152NLin2009aSym"
    built = atlas_config.get("built")
    if built:  # age-matched: the built atlas' cohort nearest the scan's age (qsmflow.atlas)
        from qsmflow.atlas import band_template_for_age

        if age is None:
            raise ValueError(f"segmentation.atlas.built: sub-{entities.get('subject')} has no age in participants.tsv "
                             "or sessions.tsv; an age-matched atlas needs each scan's age")
        cohort_files = band_template_for_age(built, age)
        template_name = cohort_files["name"]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["chi", "magnitude", "brain_mask", "qsm_mask", "t1w"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(OUTPUT_FIELDS)), name="outputnode")

    atlas = pe.Node(Atlas(), name="atlas", mem_gb=2.0, n_procs=1)
    if built:
        atlas.inputs.template = cohort_files["template"]
        atlas.inputs.labels = cohort_files["labels"]
        atlas.inputs.table = cohort_files["table"]
        atlas.inputs.name = cohort_files["name"]
    elif atlas_config["template"]:
        atlas.inputs.template = atlas_config["template"]
        atlas.inputs.labels = atlas_config["labels"]
        atlas.inputs.table = atlas_config["table"]
        atlas.inputs.name = atlas_config["name"]
    threads = int(registration["n_procs"])
    register = pe.Node(RegisterTemplate(template_name=template_name, preset=registration["preset"],
                                        stages=dict(registration["stages"]), seed=int(registration["seed"]),
                                        susceptibility_weight=susceptibility_weight(segmentation, built=bool(built)),
                                        susceptibility_stages=list(registration["susceptibility_stages"])),
                       name="register_template", mem_gb=3.0, n_procs=threads)
    if built:  # the cohort's Chimap as the channel's template, its labelled template's labels carried once
        if "chi" in cohort_files:
            register.inputs.template_chi = cohort_files["chi"]
        if "source_labels" in cohort_files and "label_transform" in cohort_files:
            register.inputs.source_labels = cohort_files["source_labels"]
            register.inputs.label_transforms = [cohort_files["label_transform"]]
    labels = pe.Node(SubjectLabels(refine=list(segmentation["refine"])), name="subject_labels", mem_gb=1.0, n_procs=1)
    reference = pe.Node(ReferenceSusceptibility(method=config["reference"]["method"]), name="reference_chi",
                        mem_gb=1.0, n_procs=1)
    if config["reference"]["erosion_mm"] is not None:
        reference.inputs.erosion_mm = float(config["reference"]["erosion_mm"])
    stats = pe.Node(RoiStatistics(erosion_mm=float(config["roistats"]["erosion_mm"]),
                                  inside_qsm_mask=bool(config["roistats"]["inside_qsm_mask"])),
                    name="roi_statistics", mem_gb=1.0, n_procs=1)
    to_template = pe.Node(ResampleToTemplate(), name="chimap_to_template", mem_gb=2.0, n_procs=1)

    outputs = segmentation_outputs(entities, template_name)
    scan = {k: v for k, v in entities.items() if v is not None}
    specs = [
        {"entities": scan, "suffix": "dseg", "metadata": {
            "Description": "ROI labels in the scan's grid: atlas template registered to the scan (ANTs SyN), "
                           "labels carried with genericLabel interpolation; see the .tsv for sources",
            "Atlas": template_name, "Sources": [source_file]}},
        {"entities": scan, "suffix": "dseg", "extension": ".tsv"},
        {"entities": {**scan, "from": template_name, "to": "scanner", "mode": "image"}, "suffix": "xfm",
         "extension": ".h5", "metadata": {"Description": f"{template_name} -> scanner (the scan's grid): ITK composite "
                                                         "transform (HDF5) written by antsRegistration: affine + SyN warp",
                                          "Sources": [source_file]}},
        {"entities": {**scan, "from": "scanner", "to": template_name, "mode": "image"}, "suffix": "xfm",
         "extension": ".h5", "metadata": {"Description": f"scanner -> {template_name}: inverse ITK composite transform (HDF5)",
                                          "Sources": [source_file]}},
        {"entities": {**scan, "space": template_name}, "suffix": "Chimap", "metadata": {
            "Units": "ppm", "Description": "Chimap resampled into template space (linear), 0 outside the QSM mask",
            "SkullStripped": True, "Sources": [source_file]}},
        {"entities": scan, "suffix": "roistats", "extension": ".tsv"},
    ]
    assert [str(derivative_path(".", s["entities"], s["suffix"], extension=s.get("extension", ".nii.gz")))
            for s in specs] == [str(p) for p in outputs.values()]
    merge = pe.Node(niu.Merge(len(specs)), name="collect_derivatives", run_without_submitting=True)
    writer = pe.Node(WriteDerivatives(output_dir=str(output_dir), specs=specs), name="write_segmentation",
                     mem_gb=0.5, n_procs=1)
    writer.overwrite = True
    # what the atlas, the registration and the label refinement did, in the dseg's sidecar
    provenance = pe.Node(niu.Merge(3), name="collect_segmentation_provenance", run_without_submitting=True)

    if with_t1w:
        t1w = pe.Node(RegisterT1wToMagnitude(seed=int(registration["seed"])), name="t1w_to_magnitude",
                      mem_gb=2.0, n_procs=threads)
        workflow.connect([
            (inputnode, t1w, [("t1w", "t1w"), ("magnitude", "magnitude"), ("brain_mask", "brain_mask")]),
            (t1w, register, [("t1w", "target")]),
        ])
    else:
        workflow.connect(inputnode, "magnitude", register, "target")
    workflow.connect([
        (inputnode, register, [("brain_mask", "brain_mask"),
                               *([("chi", "chi"), ("qsm_mask", "qsm_mask")] if registration["susceptibility_weight"] else [])]),
        (atlas, register, [("template", "template"), ("brain_mask", "template_brain_mask"), ("labels", "labels"),
                           ("table", "table")]),
        (register, labels, [("labels", "labels")]),
        (atlas, labels, [("table", "table")]),
        (inputnode, labels, [("chi", "chi"), ("qsm_mask", "qsm_mask")]),
        (inputnode, reference, [("chi", "chi"), ("qsm_mask", "mask"), ("brain_mask", "brain_mask")]),
        (labels, reference, [("dseg", "labels"), ("dseg_tsv", "table")]),
        (reference, stats, [("chi", "chi"), (("provenance", _reference_name), "reference")]),
        (labels, stats, [("dseg", "dseg"), ("dseg_tsv", "dseg_tsv")]),
        (inputnode, stats, [("qsm_mask", "qsm_mask")]),
        (reference, to_template, [("chi", "chi")]),
        (inputnode, to_template, [("qsm_mask", "qsm_mask")]),
        (register, to_template, [("inverse_transform", "inverse_transform")]),
        (atlas, to_template, [("template", "template")]),
        (labels, merge, [("dseg", "in1"), ("dseg_tsv", "in2")]),
        (register, merge, [("forward_transform", "in3"), ("inverse_transform", "in4")]),
        (to_template, merge, [("chi", "in5")]),
        (stats, merge, [("roistats", "in6")]),
        (merge, writer, [("out", "in_files")]),
        (atlas, provenance, [("provenance", "in1")]),
        (register, provenance, [("provenance", "in2")]),
        (labels, provenance, [("provenance", "in3")]),
        (provenance, writer, [(("out", _dseg_sidecar, len(specs)), "metadata")]),
        (reference, outputnode, [("chi", "chi"), ("provenance", "reference_provenance")]),
        (labels, outputnode, [("dseg", "dseg"), ("dseg_tsv", "dseg_tsv")]),
        (stats, outputnode, [("roistats", "roistats")]),
        (register, outputnode, [("warped_template", "template"), ("forward_transform", "forward_transform"),
                                ("inverse_transform", "inverse_transform")]),
        (to_template, outputnode, [("chi", "chimap_template")]),
        (writer, outputnode, [("out_files", "out_files")]),
    ])
    return workflow


def _dseg_sidecar(provenances: list, count: int) -> list:
    """Sidecar additions for the segmentation's derivatives: the atlas', registration's and label
    refinement's provenance on the dseg (the first), nothing on the others."""
    atlas, registration, labels = provenances
    return [{"AtlasProvenance": atlas, "Registration": registration, "LabelRefinement": labels}] + [{}] * (count - 1)


def _reference_name(provenance: dict) -> str:
    return provenance["ReferenceMethod"]
