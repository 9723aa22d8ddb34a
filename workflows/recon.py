"""Per-scan QSM reconstruction workflow."""
from __future__ import annotations

import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.config import method_parameters
from qsmflow.interfaces.derivatives import WriteScanDerivatives
from qsmflow.bids import derivative_path
from qsmflow.recon.inversion import TOTAL_FIELD_INVERSIONS
from qsmflow.workunits import declare_unit
from qsmflow.workflows.segmentation import init_segmentation_wf, segmentation_outputs
from qsmflow.interfaces.recon import (
    BrainMask,
    EdgeWeight,
    FitField,
    InvertDipole,
    LoadEchoes,
    R2Star,
    ReferenceSusceptibility,
    RemoveBackground,
    UnwrapPhase,
)

#: Peak memory of each node as a multiple of one float32 copy of the 3-D volume (per echo for the
#: stages that hold every echo), from peak RSS measured on 180x216x180 by tests/benchmarks/cohort.py.
_MEMORY_PER_VOLUME = {"load": 6, "mask": 6, "unwrap": 14, "echoes": 10, "r2star": 7, "background": 40, "inversion": 40, "reference": 4}


def _memory_gb(stage: str, voxels: int, echoes: int) -> float:
    per_echo = stage in {"load", "mask", "unwrap", "echoes", "r2star"}
    volumes = _MEMORY_PER_VOLUME[stage] * (echoes if per_echo else 1)
    return round(max(0.25, volumes * voxels * 4 / 1024**3), 2)


def init_scan_qsm_wf(scan, config: dict, output_dir, *, shape, name: str = "scan_qsm_wf"):
    """Reconstruct one multi-echo GRE scan into a susceptibility map.

    Workflow graph: load echoes → brain mask → unwrap → echo fit (field, Hz) → background
    removal (local field, ppm) → dipole inversion → reference → write derivatives; R2* from
    the magnitude when there are several echoes.

    Parameters
    ----------
    scan : qsmflow.bids.Scan
        Input files, echo times and field strength of the scan.
    config : dict
        Validated configuration (:func:`qsmflow.config.load_config`).
    output_dir : path
        Root of the derivatives dataset.
    shape : tuple of int
        Image shape, to declare each node's memory.

    Inputs
    ------
    (none: the scan's files are fixed when the graph is built)

    Outputs (``outputnode``)
    -------------------------
    chi
        Referenced susceptibility map (ppm) in the work directory.
    magnitude
        4-D magnitude, all echoes (float32).
    brain_mask, qsm_mask
        Brain mask from the magnitude; where the local field and chi are valid.
    total_field, local_field
        Total field (Hz) and local field (ppm of B0).
    r2star
        R2* map (1/s); undefined for a single echo or when disabled.
    chimap
        Path of the written ``_Chimap.nii.gz`` derivative.
    dseg, dseg_tsv, roistats, template, chimap_template, forward_transform, inverse_transform
        With ``segmentation.enabled``: the outputs of
        :func:`qsmflow.workflows.segmentation.init_segmentation_wf` (nested as
        ``segmentation_wf``, which also references chi: a CSF reference needs the labels).

    The workflow is declared as the scan's unit of work (:mod:`qsmflow.workunits`), done when
    its Chimap is written.
    """
    from pathlib import Path

    entities = {k: v for k, v in scan.entities.items() if v is not None}
    segment = config["segmentation"]["enabled"]
    if config["reference"]["method"] == "csf" and not segment:
        from qsmflow.config import ConfigError

        raise ConfigError("reference.method: 'csf' needs the atlas labels; set segmentation.enabled: true "
                          "or choose brain, mean or none")
    outputs = [str(derivative_path(".", entities, "Chimap"))]
    if segment:  # the scan is done when its ROI table (written last) is
        outputs.append(str(segmentation_outputs(entities, "template")["roistats"]))
    workflow = declare_unit(
        pe.Workflow(name=name), kind="scan", name=f"{scan.name}_{scan.suffix}", subject=scan.subject,
        outputs=outputs,
    )
    voxels = int(np.prod(shape))
    echoes = len(scan.echo_times)
    multi_echo = echoes > 1
    b0_direction = config["input"]["b0_direction"]

    def node(interface, stage, node_name=None):
        return pe.Node(interface, name=node_name or stage, mem_gb=_memory_gb(stage, voxels, echoes), n_procs=1)

    load = node(LoadEchoes(
        magnitude_files=scan.magnitude_files,
        phase_files=scan.phase_files,
        phase_units=config["input"]["phase_units"],
        phase_sign=config["input"]["phase_sign"],
    ), "load", "load_echoes")

    mask = node(BrainMask(method=config["mask"]["method"], parameters=method_parameters(config, "mask") if config["mask"]["method"] != "file" else {}), "mask", "brain_mask")
    if config["mask"]["method"] == "file":
        fill = {key: (value or "") for key, value in scan.entities.items()}
        mask.inputs.mask_file = config["mask"]["file"].format(
            subject=fill["subject"], session=fill["session"], acquisition=fill["acquisition"], run=fill["run"],
        )

    unwrap = node(UnwrapPhase(
        method=config["unwrap"]["method"], parameters=method_parameters(config, "unwrap"), echo_times=scan.echo_times,
    ), "unwrap", "unwrap_phase")
    fit = node(FitField(
        method=config["echoes"]["method"], parameters=method_parameters(config, "echoes"), echo_times=scan.echo_times,
        outlier_factor=config["echoes"]["outlier_factor"],
        edge_outlier_factor=config["echoes"].get("edge_outlier_factor"), edge_mm=config["echoes"].get("edge_mm", 6.0),
        outlier_min_cluster=config["echoes"]["outlier_min_cluster"],
    ), "echoes", "fit_field")
    inversion = node(InvertDipole(
        method=config["inversion"]["method"], parameters=method_parameters(config, "inversion"),
    ), "inversion", "invert_dipole")
    # A total-field inversion (TFI) needs no background removal: it takes the total field and its
    # mask, and provides the QSM mask and the tissue field itself.
    single_step = config["inversion"]["method"] in TOTAL_FIELD_INVERSIONS
    if single_step:
        background = None
        qsm_source = inversion
        inversion.inputs.field_strength = scan.field_strength
        workflow.connect([(fit, inversion, [("field_hz", "field_hz"), ("mask", "mask")])])
    else:
        background = node(RemoveBackground(
            method=config["background"]["method"], parameters=method_parameters(config, "background"),
            field_strength=scan.field_strength,
        ), "background", "remove_background")
        qsm_source = background
        workflow.connect([
            (fit, background, [("field_hz", "field_hz"), ("mask", "mask")]),
            (background, inversion, [("local_field", "local_field"), ("mask", "mask")]),
        ])
    if b0_direction:
        inversion.inputs.b0_direction = [float(v) for v in b0_direction]
        if background is not None:
            background.inputs.b0_direction = [float(v) for v in b0_direction]
    if segment:
        # The reference may need the atlas labels (csf): it happens inside the segmentation.
        age = None
        if config["segmentation"]["atlas"].get("built"):
            from pathlib import Path

            from qsmflow.workflows.atlas import scan_ages

            bids_root = Path(scan.magnitude_files[0]).parents[3 if scan.entities.get("session") else 2]
            ages, _ = scan_ages(bids_root, {"scan": {"subject": scan.subject, "session": scan.entities.get("session")}})
            age = ages.get("scan")
        reference = init_segmentation_wf(
            config, output_dir, entities=entities, source_file=scan.magnitude_files[0],
            with_t1w=bool(config["segmentation"]["use_t1w"] and scan.t1w_file), age=age, name="segmentation_wf")
        if config["segmentation"]["use_t1w"] and scan.t1w_file:
            reference.get_node("inputnode").inputs.t1w = scan.t1w_file
        reference_in, reference_out = "inputnode.", "outputnode."
        reference_provenance = "outputnode.reference_provenance"
    else:
        reference = node(ReferenceSusceptibility(method=config["reference"]["method"]), "reference", "reference_chi")
        if config["reference"]["erosion_mm"] is not None:
            reference.inputs.erosion_mm = float(config["reference"]["erosion_mm"])
        reference_in = reference_out = ""
        reference_provenance = "provenance"

    root = Path(scan.magnitude_files[0]).parents[3 if scan.entities.get("session") else 2]
    writer = pe.Node(WriteScanDerivatives(
        output_dir=str(output_dir),
        entities=entities,
        magnitude=scan.magnitude_files[0],
        source_files=[str(Path(p).relative_to(root)) for p in scan.magnitude_files + scan.phase_files],
        scan_metadata={
            "EchoTime": scan.echo_times,
            "MagneticFieldStrength": scan.field_strength,
            "SkullStripped": False,
        },
    ), name="write_derivatives", mem_gb=0.5, n_procs=1)
    # The writer is cheap, rewrites nothing unchanged, and must restore outputs deleted since the
    # last run, so it always runs; every computing node before it is cached.
    writer.overwrite = True

    outputnode = pe.Node(niu.IdentityInterface(fields=[
        "chi", "magnitude", "brain_mask", "qsm_mask", "total_field", "local_field", "r2star", "chimap",
        "dseg", "dseg_tsv", "roistats", "template", "chimap_template", "forward_transform", "inverse_transform",
    ]), name="outputnode")
    with_r2star = multi_echo and config["r2star"]["enabled"]
    provenance = pe.Node(niu.Merge(8 if with_r2star else 7), name="collect_provenance", run_without_submitting=True)

    workflow.connect([
        (load, mask, [("magnitude", "magnitude")]),
        (load, unwrap, [("phase", "phase"), ("magnitude", "magnitude")]),
        (mask, unwrap, [("mask", "mask")]),
        (unwrap, fit, [("unwrapped", "unwrapped")]),
        (load, fit, [("magnitude", "magnitude")]),
        (mask, fit, [("mask", "mask")]),
        (inversion, reference, [("chi", reference_in + "chi")]),
        (qsm_source, reference, [("mask", reference_in + ("qsm_mask" if segment else "mask"))]),
        (mask, reference, [("mask", reference_in + "brain_mask")]),
        (reference, writer, [(reference_out + "chi", "chi")]),
        (mask, writer, [("mask", "brain_mask")]),
        (qsm_source, writer, [("mask", "qsm_mask"), ("local_field", "local_field")]),
        (fit, writer, [("field_hz", "total_field")]),
        (load, provenance, [("provenance", "in1")]),
        (mask, provenance, [("provenance", "in2")]),
        (unwrap, provenance, [("provenance", "in3")]),
        (fit, provenance, [("provenance", "in4")]),
        (inversion, provenance, [("provenance", "in6")]),
        (reference, provenance, [(reference_provenance, "in7")]),
        (provenance, writer, [("out", "provenance")]),
        (reference, outputnode, [(reference_out + "chi", "chi")]),
        (load, outputnode, [("magnitude", "magnitude")]),
        (mask, outputnode, [("mask", "brain_mask")]),
        (qsm_source, outputnode, [("mask", "qsm_mask"), ("local_field", "local_field")]),
        (fit, outputnode, [("field_hz", "total_field")]),
        (writer, outputnode, [("chimap", "chimap")]),
    ])
    if segment:
        workflow.connect([
            (load, reference, [("magnitude", "inputnode.magnitude")]),
            (reference, outputnode, [(f"outputnode.{field}", field) for field in (
                "dseg", "dseg_tsv", "roistats", "template", "chimap_template", "forward_transform", "inverse_transform")]),
        ])
    if single_step:
        provenance.inputs.in5 = {"Description": "none: the total field inversion estimates background and tissue "
                                                "sources together"}
    else:
        workflow.connect([(background, provenance, [("provenance", "in5")])])
    # Noise weights from the echo fit and MEDI edge weights from the magnitude, for the methods that take them.
    if config["background"].get("noise_weight") and not single_step:
        workflow.connect([(fit, background, [("field_weight", "weight")])])
    if config["inversion"].get("noise_weight"):
        workflow.connect([(fit, inversion, [("field_weight", "data_weight")])])
    if config["inversion"].get("edge_weight"):
        edges = node(EdgeWeight(), "mask", "edge_weight")
        workflow.connect([
            (load, edges, [("magnitude", "magnitude")]),
            (fit if single_step else background, edges, [("mask", "mask")]),
            (edges, inversion, [("gradient_weight", "gradient_weight")]),
        ])
    if with_r2star:
        r2star = node(R2Star(method=config["r2star"]["method"], echo_times=scan.echo_times), "r2star", "r2star_map")
        workflow.connect([
            (load, r2star, [("magnitude", "magnitude")]),
            (mask, r2star, [("mask", "mask")]),
            (r2star, writer, [("r2star", "r2star")]),
            (r2star, provenance, [("provenance", "in8")]),
            (r2star, outputnode, [("r2star", "r2star")]),
        ])
    return workflow

