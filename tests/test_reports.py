"""Reports: figure geometry (orientation, aspect, slices), the HTML builder, the subject report
and its nipype workflow."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qsmflow import simulate
from qsmflow.reports import figures
from qsmflow.reports.html import ReportPage, format_value, read_tsv
from qsmflow.reports.subject import ScanReportFiles, write_subject_report

SHAPE = (48, 56, 48)
VOXEL = (3.0, 3.0, 3.0)


# ---------------------------------------------------------------------------------------------
# figure geometry

def test_display_plane_puts_the_subjects_right_where_the_convention_says():
    volume = np.zeros((10, 12, 8), np.float32)
    volume[8, 9, 6] = 1  # right (x index high in RAS), anterior, superior
    ras = figures.to_ras(volume, np.diag([2.0, 2.0, 2.0, 1.0]))[0]
    width = ras.shape[0]

    radiological = figures.display_plane(ras, "axial", 6, "radiological")
    neurological = figures.display_plane(ras, "axial", 6, "neurological")
    (row, column), = np.argwhere(radiological)
    assert column < width / 2, "radiological: the subject's right on the viewer's left"
    assert row < ras.shape[1] / 2, "axial: anterior at the top"
    assert np.argwhere(neurological)[0][1] > width / 2
    (row, column), = np.argwhere(figures.display_plane(ras, "coronal", 9, "radiological"))
    assert row < ras.shape[2] / 2 and column < width / 2, "coronal: superior at the top, right on the left"
    (row, column), = np.argwhere(figures.display_plane(ras, "sagittal", 8))
    assert column < ras.shape[1] / 2 and row < ras.shape[2] / 2, "sagittal: anterior on the left, superior at the top"

    # The same anatomy stored left-to-right with a flipped affine displays identically.
    flipped_affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    flipped_affine[0, 3] = 2.0 * (volume.shape[0] - 1)
    flipped = figures.to_ras(volume[::-1], flipped_affine)[0]
    assert np.array_equal(figures.display_plane(flipped, "axial", 6, "radiological"), radiological)


def _black_panels(png: Path) -> list[tuple[int, int]]:
    """(height, width) in pixels of the black panels of a figure, largest first."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3]
    black = np.all(pixels < 0.1, axis=-1)
    components, count = ndimage.label(black)
    sizes = []
    for box in ndimage.find_objects(components):
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        if height > 20 and width > 20:
            sizes.append((height, width))
    return sorted(sizes, reverse=True)


def test_panels_are_drawn_to_scale_for_anisotropic_voxels(tmp_path):
    # A 30 mm cube sampled with 1 x 1.5 x 3 mm voxels: every view must show a square.
    shape, voxel = (30, 20, 10), (1.0, 1.5, 3.0)
    volume = np.zeros(shape, np.float32)
    inside = np.ones(shape, bool)
    out = figures.plot_slices(tmp_path / "cube.png", np.diag(voxel + (1.0,)), [figures.ImageLayer(volume, vmin=0, vmax=1)],
                              slice_mask=inside, count=1, margin_voxels=0)
    panels = _black_panels(out)
    assert len(panels) == 3
    for height, width in panels:
        assert abs(height - width) <= 2, f"panel {width} x {height} px is stretched"


def test_slice_indices_centre_on_the_mask_and_stay_inside():
    mask = np.zeros((30, 30, 30), bool)
    mask[10:21, 5:25, 5:25] = True
    assert figures.slice_indices(mask, 0, 3) == [12, 15, 18]
    assert figures.slice_indices(mask, 0, 1) == [15]
    with pytest.raises(ValueError, match="empty"):
        figures.slice_indices(np.zeros((4, 4, 4), bool), 0, 3)


def test_labels_sharing_a_name_share_a_colour():
    colours = figures.label_colours([101, 201, 102, 202, 7], {101: "putamen", 201: "putamen", 102: "pallidum", 202: "pallidum"})
    assert colours[101] == colours[201] and colours[102] == colours[202]
    assert len({colours[101], colours[102], colours[7]}) == 3


def test_figures_reject_bad_requests(tmp_path):
    volume = np.ones((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        figures.plot_chimap(tmp_path / "chi.jpg", volume, np.eye(4))
    with pytest.raises(ValueError, match="no non-zero label"):
        figures.plot_labels(tmp_path / "labels.png", volume, np.zeros((8, 8, 8)), np.eye(4), {})
    with pytest.raises(ValueError, match="orientation"):
        figures.plot_chimap(tmp_path / "chi.png", volume, np.eye(4), orientation="sideways")


# ---------------------------------------------------------------------------------------------
# HTML builder

def test_format_value_and_escaping(tmp_path):
    assert format_value("0.123456") == "0.1235"
    assert format_value(12.0) == "12.0000" and format_value("607") == "607" and format_value("1125.000000", decimals=1) == "1125.0"
    assert format_value(np.int64(7)) == "7"
    assert format_value("n/a") == "n/a" and format_value(float("nan")) == "n/a"
    assert format_value("1188.25", decimals=1) == "1188.2"
    page = ReportPage("<script>alert(1)</script>", path=tmp_path / "page.html")
    page.section("a & b").table([{"name": "<b>", "mean": 0.5}])
    text = page.render()
    assert "<script>alert" not in text and "&lt;script&gt;" in text and "&lt;b&gt;" in text
    page.section("figures").figure(tmp_path / "missing.png", "a figure that was never drawn")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        page.write()
    assert not (tmp_path / "page.html").exists()


# ---------------------------------------------------------------------------------------------
# subject report from simulated arrays

def _write_scan(root: Path, prefix: str, phantom, *, segmentation: bool) -> ScanReportFiles:
    anat = root / "sub-01" / prefix.split("_")[1] / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    affine = np.diag(VOXEL + (1.0,))
    affine[:3, 3] = -np.asarray(SHAPE) * np.asarray(VOXEL) / 2

    def save(suffix, data):
        path = anat / f"{prefix}_{suffix}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
        return str(path)

    magnitude, _ = simulate.simulate_multi_echo(phantom, echo_times=(0.004, 0.012), seed=1)
    qsm_mask = ndimage.binary_erosion(phantom.brain_mask, iterations=1)
    chi = np.where(qsm_mask, phantom.chi, 0).astype(np.float32)
    scan = ScanReportFiles(
        name=f"{prefix}_MEGRE", magnitude=save("magnitude", magnitude), brain_mask=save("desc-brain_mask", phantom.brain_mask.astype(np.uint8)),
        qsm_mask=save("desc-qsm_mask", qsm_mask.astype(np.uint8)), chimap=save("Chimap", chi),
    )
    (anat / f"{prefix}_Chimap.json").write_text(json.dumps({
        "MagneticFieldStrength": 3.0, "EchoTime": [0.004, 0.012],
        "PhaseInput": {"PhaseUnits": "integer", "PhaseUnitsDetected": True,
                       "PhaseRescaling": "scanner integers -4096..4095 mapped linearly onto [-pi, pi) radians"},
        "DipoleInversion": {"Function": "qsmflow.recon.inversion.tv", "Description": "Total variation, ADMM.",
                            "Parameters": {"iterations": 250}, "References": ["Bilgic B et al. Magn Reson Med 2014;72:1444-1459."]},
        "SusceptibilityReference": {"Reference": "mean over the brain mask"},
    }))
    if segmentation:
        right = (affine[0, 0] * np.arange(SHAPE[0]) + affine[0, 3] > 0)[:, None, None]
        labels = np.where(phantom.labels > 0, 2 * phantom.labels - right, 0).astype(np.int16)
        table, stats = ["index\tname\themisphere"], ["name\themisphere\tvoxels\tvolume_mm3\tmean\tstd\treference"]
        for roi in simulate.ROI_LABELS:
            for hemisphere, index in (("left", 2 * roi.index), ("right", 2 * roi.index - 1)):
                where = labels == index
                if where.any():
                    table.append(f"{index}\t{roi.abbreviation}\t{hemisphere}")
                    stats.append(f"{roi.abbreviation}\t{hemisphere}\t{where.sum()}\t{where.sum() * 27.0:.1f}"
                                 f"\t{chi[where].mean():.6f}\t{chi[where].std():.6f}\tbrain")
        (anat / f"{prefix}_dseg.tsv").write_text("\n".join(table) + "\n")
        (anat / f"{prefix}_roistats.tsv").write_text("\n".join(stats) + "\n")
        scan.dseg, scan.dseg_tsv, scan.roistats = save("dseg", labels), str(anat / f"{prefix}_dseg.tsv"), str(anat / f"{prefix}_roistats.tsv")
        # a template "registered" one voxel off, as a registration check would show it
        scan.template = save("space-template_T1w", ndimage.shift(phantom.m0 * phantom.brain_mask, (1, 0, 0), order=1))
    return scan


class _Resources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.links, self.cells = [], [], []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if "href" in attrs:
            self.links.append(attrs["href"])
        self._in_cell = tag == "td"

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)
            self._in_cell = False


@pytest.fixture(scope="module")
def subject_scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("derivatives")
    phantom = simulate.brain_phantom(SHAPE, VOXEL, seed=3)
    scans = [_write_scan(root, "sub-01_ses-1", phantom, segmentation=True),
             _write_scan(root, "sub-01_ses-2", phantom, segmentation=False)]
    return root, scans


def test_subject_report_references_only_local_files_and_shows_the_roi_table(subject_scans):
    root, scans = subject_scans
    page = write_subject_report(root, "01", scans, config={"reference": {"method": "mean"}})
    assert page == root / "sub-01.html"
    text = page.read_text()
    parser = _Resources()
    parser.feed(text)

    assert "http://" not in text and "https://" not in text
    assert len(parser.sources) == 6  # 4 figures with segmentation, 2 without
    for source in parser.sources:
        assert not Path(source).is_absolute() and (page.parent / source).is_file(), source
        assert (page.parent / source).parent == root / "sub-01" / "figures"
        assert (page.parent / source).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(link.startswith("#") for link in parser.links)

    header, rows = read_tsv(scans[0].roistats)
    assert "ROI statistics (sub-01_ses-1_roistats.tsv); χ in ppm; reference: brain." in text
    for row in rows:
        for column, value in zip(header, row):
            if column == "reference":
                continue
            expected = format_value(value, decimals=1 if column == "volume_mm3" else 4)
            assert expected in parser.cells, f"{column} {value} missing from the ROI table"

    sections = text.split('<section id="sub-01_ses-2_MEGRE">')
    assert len(sections) == 2
    assert "Segmentation was not run" in sections[1] and "Segmentation was not run" not in sections[0]
    assert "3 T" in text and "4, 12 ms (2 echoes)" in text
    assert "integer (detected); scanner integers -4096..4095" in text and "mean over the brain mask" in text
    assert "radiological convention" in text
    assert "qsmflow.recon.inversion.tv(iterations=250)" in text and "Bilgic B et al. Magn Reson Med 2014" in text


def test_subject_report_is_reproducible_and_fails_clearly_on_a_missing_file(subject_scans, tmp_path):
    root, scans = subject_scans
    first = write_subject_report(root, "01", scans[:1])
    figure_bytes = {p.name: p.read_bytes() for p in (root / "sub-01" / "figures").iterdir()}
    page_bytes = first.read_bytes()
    write_subject_report(root, "01", scans[:1])
    assert first.read_bytes() == page_bytes
    assert {p.name: p.read_bytes() for p in (root / "sub-01" / "figures").iterdir()} == figure_bytes

    broken = ScanReportFiles(**{**scans[1].__dict__, "chimap": str(tmp_path / "absent_Chimap.nii.gz")})
    with pytest.raises(ValueError, match="absent_Chimap.nii.gz"):
        write_subject_report(tmp_path, "01", [broken])
    assert not (tmp_path / "sub-01.html").exists()


def test_subject_report_workflow_joins_scans_and_declares_the_subject_unit(subject_scans, tmp_path):
    from nipype.pipeline import engine as pe

    from qsmflow.workflows.reports import init_subject_report_wf, scan_input
    from qsmflow.workunits import collect_units

    _, scans = subject_scans
    output_dir = tmp_path / "out"
    report_wf = init_subject_report_wf("01", [s.name for s in scans], output_dir, {"inversion": {"method": "tv"}}, segmentation=True)
    for index, scan in enumerate(scans):
        for field in ("magnitude", "brain_mask", "qsm_mask", "chimap", "dseg", "dseg_tsv", "roistats", "template"):
            setattr(report_wf.inputs.inputnode, scan_input(field, index), getattr(scan, field) or "")
    top = pe.Workflow(name="top", base_dir=str(tmp_path / "work"))
    top.config["execution"]["crashdump_dir"] = str(tmp_path / "crashes")
    top.add_nodes([report_wf])
    units = collect_units(top)
    assert [(u.kind, u.name, u.outputs) for u in units] == [("subject", "sub-01", ["sub-01.html"])]
    top.run(plugin="Linear")
    page = output_dir / "sub-01.html"
    assert page.is_file() and "Segmentation was not run" in page.read_text()
    assert len(list((output_dir / "sub-01" / "figures").glob("*.png"))) == 6

    # A rerun with unchanged inputs reuses the cached rendering and restores a deleted page;
    # new ROI statistics (same path, new content) rerun the rendering.
    rendered = next((tmp_path / "work").rglob("subject_report/report/sub-01.html"))
    rendered_time = rendered.stat().st_mtime_ns
    page.unlink()
    top.run(plugin="Linear")
    assert page.is_file() and rendered.stat().st_mtime_ns == rendered_time
    roistats = Path(scans[0].roistats)
    original = roistats.read_text()
    try:
        roistats.write_text(original.replace("\tbrain\n", "\tCSF of the lateral ventricles\n"))
        top.run(plugin="Linear")
    finally:
        roistats.write_text(original)
    assert "CSF of the lateral ventricles" in page.read_text()


def test_subject_reports_join_every_scan_of_each_subject_in_the_participant_workflow(tmp_path):
    from qsmflow.bids import collect_scans
    from qsmflow.config import load_config
    from qsmflow.workflows.base import init_participant_wf, subject_workflow_name
    from qsmflow.workunits import collect_units

    bids = simulate.write_bids_dataset(tmp_path / "bids", [{"label": "01", "age": 30, "sessions": ["1", "2"]},
                                                           {"label": "02", "age": 60, "sessions": ["1"]}],
                                       shape=(24, 28, 24), voxel_size=(6.0, 6.0, 6.0), echo_times=(0.004, 0.012))
    scans, errors = collect_scans(bids)
    assert not errors and len(scans) == 3

    def subject_graph(config):
        workflow = init_participant_wf(scans, config, tmp_path / "out")
        subjects = {label: workflow.get_node(subject_workflow_name(label)) for label in ("01", "02")}
        return workflow, subjects, {label: wf.get_node("subject_report_wf") for label, wf in subjects.items()}

    workflow, subjects, reports = subject_graph(load_config(None))
    assert reports["01"].get_node("subject_report").inputs.scan_names == ["sub-01_ses-1_MEGRE", "sub-01_ses-2_MEGRE"]
    assert "execution" not in reports["01"].get_node("subject_report").inputs.config
    joined = {edge[0].name for edge in subjects["01"]._graph.in_edges(reports["01"])}
    assert joined == {"sub_01_ses_1_MEGRE_wf", "sub_01_ses_2_MEGRE_wf"}
    units = {unit.name: unit for unit in collect_units(workflow)}
    assert units["sub-01"].kind == "subject" and units["sub-01"].outputs == ["sub-01.html"]
    assert units["sub-02"].outputs == ["sub-02.html"]
    assert any(node.endswith("subject_report_wf.subject_report") for node in units["sub-01"].nodes)

    # with segmentation the scan workflows' outputnodes also give labels, table, ROI values, template
    _, subjects, reports = subject_graph(load_config(None, ["segmentation.enabled=true"]))
    fields = {(source.split(".")[-1], target.split(".")[-1]) for edge in subjects["02"]._graph.in_edges(reports["02"], data=True)
              for source, target in edge[2]["connect"]}
    assert {("dseg", "dseg_0"), ("dseg_tsv", "dseg_tsv_0"), ("roistats", "roistats_0"), ("template", "template_0"),
            ("chimap", "chimap_0")} <= fields

    _, _, reports = subject_graph(load_config(None, ["report.enabled=false"]))
    assert reports == {"01": None, "02": None}


def test_report_files_pass_the_bids_validator(tmp_path):
    """The validator (bids-validator-deno 2) honours a .bidsignore folder pattern only without a
    trailing slash: with ``sub-*/figures/`` it reported every report folder as NOT_INCLUDED."""
    from conftest import bids_validator_errors
    from qsmflow.bids import write_dataset_description

    out = tmp_path / "derivatives"
    for folder in ("sub-01/figures", "sub-02/figures", "group/figures", "atlas/tpl-Test"):
        (out / folder).mkdir(parents=True)
        (out / folder / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for subject in ("01", "02"):
        (out / f"sub-{subject}.html").write_text("<!DOCTYPE html><html></html>\n")
    write_dataset_description(out)
    assert bids_validator_errors(out) == []


def test_a_subject_with_failed_scans_still_gets_a_page_that_says_so(tmp_path, capfd):
    """One scan's failure stops its subject's report in the workflow (the report joins every
    scan), and a scan refused at the input check is not in the workflow. The run then writes the
    page from the scans that finished and lists the others; the subject's unit stays failed for
    ``qsmflow status``."""
    from qsmflow.cli import main
    from qsmflow.status import cohort_status

    bids = simulate.write_bids_dataset(tmp_path / "bids", [{"label": "01", "age": 30, "sessions": ["1", "2", "3"]}],
                                       shape=(32, 36, 32), voxel_size=(5.0, 5.0, 5.0), echo_times=(0.004, 0.012))
    anat = bids / "sub-01" / "ses-{}" / "anat" / "sub-01_ses-{}_echo-{}_part-{}_MEGRE.nii.gz"
    for echo in (1, 2):  # ses-2: a blank magnitude passes the input check and fails in the brain mask
        path = Path(str(anat).format(2, 2, echo, "mag"))
        nib.save(nib.Nifti1Image(np.zeros((32, 36, 32), np.float32), nib.load(str(path)).affine), str(path))
    refused = Path(str(anat).format(3, 3, 2, "phase"))  # ses-3: refused before the run
    nib.save(nib.Nifti1Image(np.zeros((32, 36, 30), np.float32), nib.load(str(refused)).affine), str(refused))
    output, work = tmp_path / "out", tmp_path / "work"
    code = main([str(bids), str(output), "participant", "--work-dir", str(work), "--progress", "off",
                 "--plugin", "Linear", "--set", "segmentation.enabled=false", "--set", "reference.method=mean"])
    err = capfd.readouterr().err
    assert code == 1, err
    assert (output / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_Chimap.nii.gz").is_file()
    assert not (output / "sub-01" / "ses-2").exists()
    page = (output / "sub-01.html").read_text()
    assert "Scans that failed" in page and "3 scans, 2 failed" in page
    for scan in ("sub-01_ses-1_MEGRE", "sub-01_ses-2_MEGRE", "sub-01_ses-3_MEGRE", "(input check)", str(refused)):
        assert scan in page, scan
    assert list((output / "sub-01" / "figures").iterdir())
    states = {status.name: status.state for status in cohort_status(work, output)}
    assert states["sub-01_ses-1_MEGRE"] == "done" and states["sub-01"] != "done", states
