"""Atlas-level workflow: age-band templates, a template of templates, parcellation, figures."""
from __future__ import annotations

import re
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.interfaces.atlas import (
    AtlasFigures,
    AtlasReport,
    BandROIStatistics,
    ComposeTransforms,
    InitialTemplate,
    MakeHybrid,
    Parcellate,
    RegisterToTemplate,
    ResampleToTemplate,
    TemplateSharpness,
    UpdateTemplate,
    WriteTemplateDescription,
)
from qsmflow.interfaces.derivatives import WriteDerivatives
from qsmflow.workunits import declare_unit

_TEMPLATE_FIELDS = ("hybrid", "chi", "intensity", "brain_mask")


def _utility(interface, name: str):
    """A bookkeeping node (Merge, Select): run in the scheduler's process, not sent to a worker,
    so that the many list nodes of the template iterations add no round trip through the pool
    (nipype's ``run_without_submitting``; cached as any node)."""
    return pe.Node(interface, name=name, run_without_submitting=True)


def safe_name(text: str) -> str:
    """A nipype node name made of ``text``."""
    return re.sub(r"[^A-Za-z0-9]", "_", str(text))


def scan_label(name: str) -> str:
    """A BIDS label (letters and digits) for a scan name such as ``sub-01_ses-2``."""
    return re.sub(r"[^A-Za-z0-9]", "", name.replace("sub-", "sub").replace("ses-", "ses"))


def init_template_wf(inputs, atlas: dict, *, threads: int = 1, mem_gb: float = 1.0, name: str = "template_wf"):
    """Group-wise template construction, one cached node per registration.

    Parameters
    ----------
    inputs : list of str
        Names of the inputs (scans, or band labels for the template of templates).
    atlas : dict
        The ``atlas`` configuration section (iterations, registration, gradient step, ...).

    Inputs
    ------
    hybrid_<k>, chi_<k>, intensity_<k>, brain_mask_<k>
        Images of input k (its own grid).

    Outputs
    -------
    hybrid, chi, intensity, brain_mask
        The template (hybrid sharpened; chi in ppm, averaged without normalisation).
    transform_<k>
        Input k's transforms to the template as one displacement field (template grid).
    sharpness
        TSV: each registered input's correlation with the template inside its brain mask.

    Nodes: ``initial`` (unregistered average) → per iteration i: ``register_<i>_<k>`` per input
    (parallel), ``update_<i>`` (average, shape update, sharpen) → ``compose_<k>`` (last
    registration after the last shape update) → ``sharpness``. A node's inputs are only its
    inputs' images and the previous template, so the nodes of another template never rerun.
    """
    workflow = pe.Workflow(name=name)
    count = len(inputs)
    fields = [f"{field}_{k}" for k in range(count) for field in _TEMPLATE_FIELDS]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=list(_TEMPLATE_FIELDS) + [f"transform_{k}" for k in range(count)] + ["sharpness"]), name="outputnode")

    def merge(node_name, field):
        node = _utility(niu.Merge(count), name=node_name)
        workflow.connect([(inputnode, node, [(f"{field}_{k}", f"in{k + 1}") for k in range(count)])])
        return node

    hybrids = merge("merge_hybrids", "hybrid")
    masks = merge("merge_masks", "brain_mask")
    initial = pe.Node(InitialTemplate(resolution_mm=atlas["resolution_mm"]), name="initial", mem_gb=mem_gb)
    workflow.connect([(hybrids, initial, [("out", "hybrids")]), (masks, initial, [("out", "masks")])])

    registration = atlas["registration"]
    template_source, template_field, mask_source = initial, "template", None
    for iteration in range(int(atlas["iterations"])):
        transform = registration["initial_transform"] if iteration == 0 else registration["transform"]
        update = pe.Node(UpdateTemplate(gradient_step=atlas["gradient_step"], blending_weight=atlas["blending_weight"]),
                         name=f"update_{iteration}", mem_gb=mem_gb)
        merges = {key: _utility(niu.Merge(count), name=f"merge_{key}_{iteration}")
                  for key in ("hybrid", "chi", "intensity", "brain_mask", "field", "forward")}
        registrations = []
        for k in range(count):
            register = pe.Node(RegisterToTemplate(transform=transform, stages=registration["stages"], threads=threads),
                               name=f"register_{iteration}_{safe_name(inputs[k])}", n_procs=threads, mem_gb=mem_gb)
            workflow.connect([
                (template_source, register, [(template_field, "template")]),
                (inputnode, register, [(f"{field}_{k}", field) for field in _TEMPLATE_FIELDS]),
            ])
            if mask_source is not None:
                workflow.connect(mask_source, "brain_mask", register, "template_mask")
            for key in ("hybrid", "chi", "intensity", "brain_mask", "field", "forward"):
                workflow.connect(register, key, merges[key], f"in{k + 1}")
            registrations.append(register)
        workflow.connect([
            (merges["hybrid"], update, [("out", "hybrids")]),
            (merges["chi"], update, [("out", "chis")]),
            (merges["intensity"], update, [("out", "intensities")]),
            (merges["brain_mask"], update, [("out", "masks")]),
            (merges["field"], update, [("out", "fields")]),
        ])
        template_source, template_field, mask_source = update, "hybrid", update

    composed = _utility(niu.Merge(count), name="merge_composed")
    for k, register in enumerate(registrations):
        chain = _utility(niu.Merge(2), name=f"chain_{safe_name(inputs[k])}")
        compose = pe.Node(ComposeTransforms(), name=f"compose_{safe_name(inputs[k])}", mem_gb=mem_gb)
        workflow.connect([
            (update, chain, [("update", "in1")]),
            (register, chain, [("forward", "in2")]),
            (chain, compose, [("out", "transforms")]),
            (update, compose, [("hybrid", "reference")]),
            (compose, outputnode, [("transform", f"transform_{k}")]),
            (compose, composed, [("transform", f"in{k + 1}")]),
        ])
    sharpness = pe.Node(TemplateSharpness(names=list(inputs)), name="sharpness", mem_gb=mem_gb)
    workflow.connect([
        (update, sharpness, [("hybrid", "template"), ("brain_mask", "template_mask")]),
        (hybrids, sharpness, [("out", "subjects")]),
        (composed, sharpness, [("out", "transforms")]),
        (update, outputnode, [(field, field) for field in _TEMPLATE_FIELDS]),
        (sharpness, outputnode, [("table", "sharpness")]),
    ])
    return workflow


def template_entities(name: str, resolution: str, cohort: str | None = None, **extra) -> dict:
    entities = {"template": name, "cohort": cohort, "res": resolution}
    entities.update(extra)
    return entities


def init_atlas_wf(scans, bands, atlas: dict, output_dir, *, label_atlas: dict | None = None, config: dict | None = None,
                  threads: int = 1, name: str = "atlas_wf"):
    """Longitudinal QSM atlas: a template per age band, then a template of the band templates.

    Parameters
    ----------
    scans : dict
        Scan name -> dict with ``chi``, ``magnitude``, ``brain_mask`` (paths) and ``age``.
    bands : list of qsmflow.atlas.AgeBand
        The scans of each band (:func:`qsmflow.atlas.age_bands`).
    atlas : dict
        The ``atlas`` configuration section.
    output_dir : path
        Derivatives dataset; everything is written under ``atlas/tpl-<name>/``.
    label_atlas : dict, optional
        ``template``, ``labels``, ``table`` files of the labelled template to parcellate with
        (default: the segmentation's default offline MNI atlas).
    config : dict, optional
        Whole configuration, shown in the report.

    Returns
    -------
    nipype Workflow with units: one ``band`` unit per age band (``atlas-cohort-<k>``: its
    scans' hybrids, its template nodes, its parcellation and outputs) and one ``atlas`` unit
    (the template of templates, every scan's composed transform to the atlas, the atlas
    parcellation, per-band ROI statistics in atlas space, figures, report; done when
    ``template_description.json`` exists).
    """
    from qsmflow.interfaces.segmentation import Atlas as LabelledTemplate

    output_dir = Path(output_dir)
    atlas_dir = output_dir / "atlas"
    tpl = atlas["name"]
    resolution = f"{atlas['resolution_mm']:g}".replace(".", "p") if atlas["resolution_mm"] else "native"
    workflow = pe.Workflow(name=name)
    mem_gb = float(atlas["mem_gb"])

    labelled = pe.Node(LabelledTemplate(), name="labelled_template", mem_gb=2.0)
    if label_atlas:
        labelled.inputs.template = str(label_atlas["template"])
        labelled.inputs.labels = str(label_atlas["labels"])
        labelled.inputs.table = str(label_atlas["table"])
        labelled.inputs.name = str(label_atlas.get("name", "custom"))
    read_labels = pe.Node(niu.Function(input_names=["table"], output_names=["names", "nuclei"],
                                       function=_label_names), name="label_names")
    workflow.connect(labelled, "table", read_labels, "table")
    for created in (labelled, read_labels):
        declare_unit(created, kind="labels", name="labelled-template")

    parcellation_settings = atlas["parcellation"]
    step_two = init_template_wf([f"cohort{b.label}" for b in bands], {**atlas, "iterations": atlas["step_two_iterations"]},
                                threads=threads, mem_gb=mem_gb, name="atlas_template_wf")
    declare_unit(step_two, kind="atlas", name="atlas",
                 outputs=[f"atlas/tpl-{tpl}/template_description.json"])

    band_outputs = {}
    for band_index, band in enumerate(bands):
        cohort = band.label
        band_wf = pe.Workflow(name=f"cohort_{cohort}_wf")
        members = list(band.scans)
        template_wf = init_template_wf(members, atlas, threads=threads, mem_gb=mem_gb, name="template_wf")
        for k, scan in enumerate(members):
            hybrid = pe.Node(MakeHybrid(chi=str(scans[scan]["chi"]), magnitude=str(scans[scan]["magnitude"]),
                                        brain_mask=str(scans[scan]["brain_mask"]), chi_weight=atlas["hybrid"]["chi_weight"]),
                             name=f"hybrid_{safe_name(scan)}", mem_gb=mem_gb)
            band_wf.connect(hybrid, "hybrid", template_wf, f"inputnode.hybrid_{k}")
            band_wf.connect(hybrid, "chi", template_wf, f"inputnode.chi_{k}")
            band_wf.connect(hybrid, "intensity", template_wf, f"inputnode.intensity_{k}")
            band_wf.connect(hybrid, "brain_mask", template_wf, f"inputnode.brain_mask_{k}")
        parcellate = pe.Node(Parcellate(stages=parcellation_settings["stages"], min_contrast=parcellation_settings["min_contrast"],
                                        threads=threads), name="parcellate", n_procs=threads, mem_gb=mem_gb)
        band_wf.connect([(template_wf, parcellate, [("outputnode.intensity", "hybrid"), ("outputnode.chi", "chi"),
                                                    ("outputnode.brain_mask", "brain_mask")])])
        workflow.connect([
            (labelled, band_wf, [("template", "parcellate.template"), ("labels", "parcellate.template_labels"),
                                 ("brain_mask", "parcellate.template_mask")]),
            (labelled, band_wf, [("table", "parcellate.table")]),
            (read_labels, band_wf, [("nuclei", "parcellate.nucleus_labels")]),
        ])

        entities = template_entities(tpl, resolution, cohort)
        band_meta = {"Cohort": cohort, "AgeRange": [band.low, band.high], "MeanAge": round(band.mean_age, 3),
                     "Scans": members}
        specs, sources = [], []
        for k, scan in enumerate(members):
            specs.append({"entities": {**entities, "from": scan_label(scan), "mode": "image"}, "suffix": "xfm",
                          "extension": ".nii.gz", "metadata": {
                              "Description": f"{scan} to cohort {cohort}: displacement field (mm, ITK/LPS) on the "
                                             "template grid, one resampling", "FromScan": scan}})
            sources.append(("template_wf", f"outputnode.transform_{k}"))
        for field, suffix, extra, meta in (
                ("outputnode.sharpness", "sharpness", {"desc": "registration"}, None),
                ("outputnode.hybrid", "T2starw", {"desc": "hybrid"}, {"Description": "hybrid registration image: normalised magnitude - w chi", "ChiWeight": atlas["hybrid"]["chi_weight"]}),
                ("outputnode.intensity", "T2starw", {}, {"Description": "first-echo magnitude, each scan normalised to its brain median, averaged"}),
                ("outputnode.brain_mask", "mask", {"desc": "brain"}, {"Type": "Brain"}),
                ("parcellate.dseg_tsv", "dseg", {}, None),
                ("parcellate.dseg", "dseg", {}, {"Description": "whole-brain parcellation; nuclei redrawn from the chi contrast (see dseg.tsv)"}),
                ("outputnode.chi", "Chimap", {}, {"Units": "ppm", "Description": "mean susceptibility of the cohort (no intensity normalisation)"})):
            spec = {"entities": {**entities, **extra}, "suffix": suffix,
                    "extension": ".tsv" if field.endswith(("tsv", "sharpness")) else ".nii.gz"}
            if meta is not None:
                spec["metadata"] = {**band_meta, **meta}
            specs.append(spec)
            sources.append(("parcellate", field.split(".", 1)[1]) if field.startswith("parcellate") else ("template_wf", field))
        specs.append({"entities": {**entities, "from": "labelled", "mode": "image"}, "suffix": "xfm", "extension": ".nii.gz",
                      "metadata": {"Description": f"cohort {cohort} template to the labelled template (desc-labelled_dseg "
                                                  "of the atlas): displacement field (mm, ITK/LPS) on the template grid; "
                                                  "with a scan's transform to this template, carries the labels to the "
                                                  "scan in one resampling"}})
        sources.append(("parcellate", "transform"))
        gather = _utility(niu.Merge(len(sources)), name="gather_outputs")
        for index, (node_name, field) in enumerate(sources, start=1):
            source = parcellate if node_name == "parcellate" else template_wf
            band_wf.connect(source, field, gather, f"in{index}")
        write = pe.Node(WriteDerivatives(output_dir=str(atlas_dir), specs=specs), name="write_outputs")
        write.overwrite = True
        band_wf.connect(gather, "out", write, "in_files")
        chimap = f"atlas/tpl-{tpl}/cohort-{cohort}/tpl-{tpl}_cohort-{cohort}_res-{resolution}_Chimap.nii.gz"
        declare_unit(band_wf, kind="band", name=f"atlas-cohort-{cohort}", outputs=[chimap])
        for field in _TEMPLATE_FIELDS:
            workflow.connect(band_wf, f"template_wf.outputnode.{field}", step_two, f"inputnode.{field}_{band_index}")
        band_outputs[cohort] = (band_wf, members)

    _connect_step_two_outputs(workflow, step_two, bands, band_outputs, labelled, read_labels, atlas, atlas_dir, tpl,
                              resolution, threads, mem_gb, config)
    return workflow


def _label_names(table):
    """Label value -> name, and nucleus abbreviation -> label values, from a dseg table."""
    import csv

    from qsmflow.atlas import DEEP_NUCLEI

    names, nuclei = {}, {}
    with open(table, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            abbreviation = row.get("abbreviation") or row["name"]
            hemisphere = row.get("hemisphere") or "bilateral"
            names[str(row["index"])] = abbreviation + {"left": "_L", "right": "_R"}.get(hemisphere, "")
            if abbreviation in DEEP_NUCLEI:
                nuclei.setdefault(abbreviation, []).append(int(row["index"]))
    return names, nuclei


def _connect_step_two_outputs(workflow, step_two, bands, band_outputs, labelled, read_labels, atlas, atlas_dir, tpl,
                              resolution, threads, mem_gb, config):
    unit = {"kind": "atlas", "name": "atlas"}
    nodes = []

    def node(interface, node_name, **kwargs):
        if isinstance(interface, (niu.Merge, niu.Select)):
            created = _utility(interface, node_name)
        else:
            created = pe.Node(interface, name=node_name, mem_gb=kwargs.pop("mem_gb", mem_gb), **kwargs)
        nodes.append(created)
        return created

    settings = atlas["parcellation"]
    parcellate = node(Parcellate(stages=settings["stages"], min_contrast=settings["min_contrast"], threads=threads),
                      "parcellate_atlas", n_procs=threads)
    workflow.connect([
        (step_two, parcellate, [("outputnode.intensity", "hybrid"), ("outputnode.chi", "chi"),
                                ("outputnode.brain_mask", "brain_mask")]),
        (labelled, parcellate, [("template", "template"), ("labels", "template_labels"), ("brain_mask", "template_mask")]),
        (labelled, parcellate, [("table", "table")]),
        (read_labels, parcellate, [("nuclei", "nucleus_labels")]),
    ])
    entities = template_entities(tpl, resolution)
    specs, sources = [], []
    band_chis = node(niu.Merge(len(bands)), "merge_band_chis")
    roistats = node(niu.Merge(len(bands)), "merge_roistats")
    sharpness = node(niu.Merge(len(bands) + 1), "merge_sharpness")
    description = {"Name": f"qsmflow longitudinal QSM atlas {tpl}", "Authors": ["qsmflow"],
                   "ReferencesAndLinks": ["Avants BB et al. NeuroImage 2010;49:2457-2466",
                                          "Zhang Y et al. NeuroImage 2018;171:176-189"],
                   "res": {resolution: {"zooms": [atlas["resolution_mm"]] * 3 if atlas["resolution_mm"] else "input grid"}},
                   "cohort": {}, "Parameters": _json_safe(atlas)}
    for index, band in enumerate(bands):
        band_wf, members = band_outputs[band.label]
        description["cohort"][band.label] = {"age": [band.low, band.high], "mean_age": round(band.mean_age, 3),
                                             "scans": members, "ages": band.ages, "units": "years"}
        cohort_label = f"cohort{band.label}"
        resample = node(ResampleToTemplate(), f"band_{band.label}_to_atlas")
        chain = node(niu.Merge(4), f"band_{band.label}_images")
        workflow.connect([
            (band_wf, chain, [("template_wf.outputnode.chi", "in1"), ("template_wf.outputnode.intensity", "in2"),
                              ("template_wf.outputnode.hybrid", "in3"), ("template_wf.outputnode.brain_mask", "in4")]),
            (chain, resample, [("out", "in_files")]),
            (step_two, resample, [("outputnode.hybrid", "reference"), (f"outputnode.transform_{index}", "transforms")]),
        ])
        pick_chi = node(niu.Select(index=0), f"band_{band.label}_chi")
        workflow.connect(resample, "out_files", pick_chi, "inlist")
        workflow.connect(pick_chi, "out", band_chis, f"in{index + 1}")
        stats = node(BandROIStatistics(band=band.as_dict()), f"roistats_{band.label}")
        workflow.connect([(pick_chi, stats, [("out", "chi")]), (parcellate, stats, [("dseg", "dseg")]),
                          (read_labels, stats, [("names", "label_names")])])
        workflow.connect(stats, "roistats", roistats, f"in{index + 1}")
        workflow.connect(band_wf, "template_wf.outputnode.sharpness", sharpness, f"in{index + 1}")
        for position, (suffix, extra) in enumerate((("Chimap", {}), ("T2starw", {}), ("T2starw", {"desc": "hybrid"}),
                                                    ("mask", {"desc": "brain"}))):
            pick = node(niu.Select(index=position), f"band_{band.label}_{position}")
            workflow.connect(resample, "out_files", pick, "inlist")
            specs.append({"entities": {**template_entities(tpl, resolution, band.label), "space": tpl, **extra},
                          "suffix": suffix, "metadata": {"Description": f"cohort {band.label} template in the atlas space"}})
            sources.append((pick, "out"))
        specs.append({"entities": {**entities, "from": cohort_label, "mode": "image"}, "suffix": "xfm",
                      "extension": ".nii.gz", "metadata": {"Description": f"cohort {band.label} template to the atlas: "
                                                           "displacement field (mm, ITK/LPS), one resampling"}})
        sources.append((step_two, f"outputnode.transform_{index}"))
        specs.append({"entities": {**template_entities(tpl, resolution, band.label), "desc": "atlas"}, "suffix": "roistats",
                      "extension": ".tsv"})
        sources.append((stats, "roistats"))
        for k, scan in enumerate(members):
            chain = node(niu.Merge(2), f"atlas_chain_{safe_name(scan)}")
            compose = node(ComposeTransforms(), f"compose_{safe_name(scan)}_to_atlas")
            workflow.connect([
                (step_two, chain, [(f"outputnode.transform_{index}", "in1")]),
                (band_wf, chain, [(f"template_wf.outputnode.transform_{k}", "in2")]),
                (chain, compose, [("out", "transforms")]),
                (step_two, compose, [("outputnode.hybrid", "reference")]),
            ])
            specs.append({"entities": {**entities, "from": scan_label(scan), "mode": "image"}, "suffix": "xfm",
                          "extension": ".nii.gz", "metadata": {
                              "Description": f"{scan} to the atlas through cohort {band.label}: displacement field "
                                             "(mm, ITK/LPS) on the atlas grid, one resampling", "FromScan": scan}})
            sources.append((compose, "transform"))
    workflow.connect(step_two, "outputnode.sharpness", sharpness, f"in{len(bands) + 1}")

    figures = node(AtlasFigures(band_labels=[f"cohort-{b.label}\n{b.low:g}-{b.high:g} y (n={len(b.scans)})" for b in bands],
                                window=float(atlas["figures"]["window"])),
                   "figures")
    workflow.connect([(band_chis, figures, [("out", "band_chis")]),
                      (step_two, figures, [("outputnode.chi", "atlas_chi"), ("outputnode.brain_mask", "atlas_mask")]),
                      (parcellate, figures, [("dseg", "atlas_dseg")]),
                      (read_labels, figures, [("names", "label_names")])])
    for field, suffix, extra, extension, meta in (
            ("outputnode.hybrid", "T2starw", {"desc": "hybrid"}, ".nii.gz", {"ChiWeight": atlas["hybrid"]["chi_weight"]}),
            ("outputnode.intensity", "T2starw", {}, ".nii.gz", {}),
            ("outputnode.brain_mask", "mask", {"desc": "brain"}, ".nii.gz", {"Type": "Brain"}),
            ("outputnode.sharpness", "sharpness", {"desc": "registration"}, ".tsv", None)):
        specs.append({"entities": {**entities, **extra}, "suffix": suffix, "extension": extension,
                      **({"metadata": {"Description": "template of the cohort templates", **meta}} if meta is not None else {})})
        sources.append((step_two, field))
    for field, extension in (("labels", ".nii.gz"), ("table", ".tsv")):
        specs.append({"entities": {**entities, "res": None, "desc": "labelled"}, "suffix": "dseg", "extension": extension,
                      **({"metadata": {"Description": "the labelled template's labels on its own grid (the source of "
                                                      "every parcellation; cohort-<k>/..._from-labelled_xfm maps to it)"}}
                         if extension == ".nii.gz" else {})})
        sources.append((labelled, field))
    for field, suffix, extension in (("dseg_tsv", "dseg", ".tsv"), ("dseg", "dseg", ".nii.gz")):
        specs.append({"entities": dict(entities), "suffix": suffix, "extension": extension,
                      **({"metadata": {"Description": "whole-brain parcellation of the atlas"}} if extension == ".nii.gz" else {})})
        sources.append((parcellate, field))
    for field, desc in (("montage", "montage"), ("parcellation", "parcellation")):
        specs.append({"entities": {**entities, "desc": desc}, "suffix": "Chimap", "extension": ".png"})
        sources.append((figures, field))
    specs.append({"entities": dict(entities), "suffix": "Chimap", "metadata": {
        "Units": "ppm", "Description": "longitudinal QSM atlas: mean of the cohort templates' chi (equal weights)"}})
    sources.append((step_two, "outputnode.chi"))

    gather = node(niu.Merge(len(sources)), "gather_atlas_outputs")
    for index, (source, field) in enumerate(sources, start=1):
        workflow.connect(source, field, gather, f"in{index}")
    write = node(WriteDerivatives(output_dir=str(atlas_dir), specs=specs), "write_atlas_outputs")
    write.overwrite = True
    workflow.connect(gather, "out", write, "in_files")

    report = node(AtlasReport(atlas_dir=str(atlas_dir), name=tpl, description=description,
                              config=_json_safe(config or {})), "report")
    report.overwrite = True
    workflow.connect([(figures, report, [("montage", "montage"), ("parcellation", "parcellation")]),
                      (roistats, report, [("out", "roistats")]), (sharpness, report, [("out", "correlations")])])
    describe = node(WriteTemplateDescription(atlas_dir=str(atlas_dir), name=tpl, description=description),
                    "template_description")
    describe.overwrite = True
    workflow.connect([(write, describe, [("out_files", "ready")])])
    for created in nodes:
        declare_unit(created, **unit, outputs=[f"atlas/tpl-{tpl}/template_description.json"])


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def find_participant_outputs(output_dir) -> tuple[dict, list]:
    """Every scan's Chimap, first-echo magnitude and brain mask in the derivatives dataset.

    Returns ``({scan name: {"chi", "magnitude", "brain_mask", "subject", "session"}}, problems)``
    with one ``(scan, subject, reason)`` per scan whose magnitude or mask is missing. Scan names
    are the files' BIDS stems (``sub-01_ses-2``); maps in a template space are not inputs.
    """
    output_dir = Path(output_dir)
    found, problems = {}, []
    for chimap in sorted(output_dir.glob("sub-*/**/anat/*_Chimap.nii.gz")):
        stem = chimap.name[: -len("_Chimap.nii.gz")]
        if "_space-" in f"_{stem}" or "_rec-" in f"_{stem}":
            continue
        subject = stem.split("_")[0].removeprefix("sub-")
        session = next((part.removeprefix("ses-") for part in stem.split("_") if part.startswith("ses-")), None)
        mask = chimap.with_name(f"{stem}_desc-brain_mask.nii.gz")
        magnitude = chimap.parent.parent / "fmap" / f"{stem}_magnitude.nii.gz"
        missing = [str(p) for p in (mask, magnitude) if not p.is_file()]
        if missing:
            problems.append((stem, subject, f"{missing[0]} does not exist (the atlas needs the participant level's "
                                            "Chimap, brain mask and first-echo magnitude)"))
            continue
        found[stem] = {"chi": str(chimap), "magnitude": str(magnitude), "brain_mask": str(mask), "subject": subject,
                       "session": session}
    return found, problems


def scan_ages(bids_dir, scans: dict) -> tuple[dict, list]:
    """Age of every scan: ``sessions.tsv`` (the session's age) first, else ``participants.tsv``.

    Returns ``({scan: age}, [(scan, subject, reason) for scans without an age])``.
    """
    from qsmflow.group import _number, read_participants, read_sessions

    participants, _ = read_participants(bids_dir)
    ages, problems = {}, []
    for name, scan in scans.items():
        subject, session = scan["subject"], scan["session"]
        age = None
        if session:
            sessions, _ = read_sessions(bids_dir, subject)
            age = _number(sessions.get(session, {}).get("age"))
        if age is None:
            age = _number(participants.get(subject, {}).get("age"))
        if age is None:
            problems.append((name, subject, f"{Path(bids_dir) / 'participants.tsv'}: no age for sub-{subject}"
                                            + (f" (nor in sub-{subject}_sessions.tsv for ses-{session})" if session else "")))
            continue
        ages[name] = age
    return ages, problems


def atlas_level(bids_dir, output_dir, config: dict, participant_labels=()):
    """The ``atlas`` level (:data:`qsmflow.levels.LEVELS`): find the participant outputs and ages,
    split them into age bands, build :func:`init_atlas_wf`.

    A scan without its magnitude, mask or age is refused (a problem naming the file) and left
    out; a band with fewer than ``atlas.min_scans`` scans stops the level with a message.
    """
    from qsmflow.atlas import age_bands
    from qsmflow.levels import LevelPlan, Problem
    from qsmflow.resources import thread_count

    atlas = config["atlas"]
    scans, missing = find_participant_outputs(output_dir)
    labels = {str(label).removeprefix("sub-") for label in participant_labels or ()}
    if labels:
        scans = {name: scan for name, scan in scans.items() if scan["subject"] in labels}
    ages, no_age = scan_ages(bids_dir, scans)
    problems = [Problem(unit=name, subject=subject, reason=reason) for name, subject, reason in missing + no_age]
    if not ages:
        problems.append(Problem(unit="atlas", subject=None, reason=(
            f"{output_dir}: no scan with a Chimap, magnitude, brain mask and age; run the participant level first")))
        return LevelPlan(workflow=None, problems=problems, noun="template")
    try:
        bands = age_bands(ages, edges=atlas["bands"]["edges"] if atlas["bands"]["quantiles"] is None else None,
                          quantiles=atlas["bands"]["quantiles"], min_scans=int(atlas["min_scans"]))
    except ValueError as error:
        return LevelPlan(workflow=None, problems=problems + [Problem(unit="atlas", subject=None, reason=str(error))],
                         noun="template")
    parcellation = atlas["parcellation"]
    label_atlas = None
    if parcellation["template"]:
        label_atlas = {key: parcellation[key] for key in ("template", "labels", "table")}
    inputs = {name: {**scans[name], "age": ages[name]} for name in ages}
    workflow = init_atlas_wf(inputs, bands, atlas, output_dir, label_atlas=label_atlas, config=config,
                             threads=thread_count(1))
    return LevelPlan(workflow=workflow, problems=problems, noun="template")
