"""Find multi-echo GRE inputs in a BIDS dataset, and name and write qsmflow's derivatives.

Inputs are queried with pybids; every problem is reported as an :class:`InputError` whose
message names the offending file. Derivatives follow BIDS-Derivatives naming, keeping the
input's ``sub``, ``ses``, ``acq``, ``rec`` and ``run`` entities.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

#: Suffixes of the gradient-echo images qsmflow reconstructs.
GRE_SUFFIXES = ("MEGRE", "T2starw")
#: Entities that identify one scan (all echoes and parts of one acquisition).
SCAN_ENTITIES = ("subject", "session", "acquisition", "reconstruction", "run")
_ENTITY_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "reconstruction": "rec", "run": "run"}
_LABEL_PATTERN = re.compile(r"^[A-Za-z0-9]+$")


class InputError(ValueError):
    """A problem with the input dataset; the message names the file and the problem."""


@dataclass
class Scan:
    """One gradient-echo acquisition: all its echoes, magnitude and phase."""

    entities: dict
    suffix: str
    magnitude_files: list[str]
    phase_files: list[str]
    echo_times: list[float]
    field_strength: float | None
    metadata: dict = field(default_factory=dict)
    t1w_file: str | None = None  # the session's T1w (first by name), for registration

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def name(self) -> str:
        """BIDS-style prefix of the scan, e.g. ``sub-01_ses-1_run-2``."""
        return bids_prefix(self.entities)

    @property
    def node_name(self) -> str:
        """The scan as a valid nipype node name."""
        return re.sub(r"[^A-Za-z0-9]", "_", self.name)


def bids_prefix(entities: dict) -> str:
    """``sub-X[_ses-Y][_acq-Z][_rec-R][_run-N]`` from a pybids entity dict."""
    parts = [f"{_ENTITY_KEYS[name]}-{entities[name]}" for name in SCAN_ENTITIES if entities.get(name) is not None]
    return "_".join(parts)


def check_participant_labels(labels) -> list[str] | None:
    """Strip ``sub-`` prefixes and reject labels that are not BIDS labels (e.g. paths)."""
    if not labels:
        return None
    cleaned = []
    for label in labels:
        bare = label[4:] if label.startswith("sub-") else label
        if not _LABEL_PATTERN.match(bare):
            raise InputError(f"--participant-label {label!r}: not a BIDS label (letters and digits only)")
        cleaned.append(bare)
    return cleaned


def check_dataset(bids_dir: Path) -> None:
    """Fail early on a path that is not a BIDS dataset."""
    if not bids_dir.is_dir():
        raise InputError(f"{bids_dir}: BIDS directory does not exist")
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise InputError(f"{description}: missing; {bids_dir} is not a BIDS dataset")
    try:
        json.loads(description.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{description}: not valid JSON ({error})") from None


def check_output_dir(bids_dir: Path, output_dir: Path) -> None:
    """Refuse an output directory that would write into the input dataset.

    ``BIDS_DIR/derivatives/...`` is the BIDS convention and is allowed; anywhere else inside
    the input dataset (or the dataset itself) is refused.
    """
    bids_dir = bids_dir.resolve()
    output_dir = output_dir.resolve()
    if output_dir == bids_dir or bids_dir in output_dir.parents:
        relative = output_dir.relative_to(bids_dir)
        if not relative.parts or relative.parts[0] != "derivatives":
            raise InputError(
                f"{output_dir}: output directory is inside the input dataset {bids_dir}; "
                "use a directory outside it or under its derivatives/ folder"
            )
    check_writable_dir(output_dir, "output directory")


def check_writable_dir(path: Path, role: str = "directory") -> None:
    """Fail early when ``path`` cannot be created or written: the nearest existing ancestor
    must be a directory that allows writing (``access(2)``: permission bits for ordinary
    users, the immutable attribute and read-only mounts for everyone, root included)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{path}: cannot create the {role}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == Path(path) else f" ({probe} does not allow creating it)"
        raise InputError(f"{path}: {role} is not writable{where}")


def _echo_time(path: str, metadata: dict) -> float:
    if "EchoTime" not in metadata:
        raise InputError(f"{_sidecar(path)}: EchoTime is missing")
    value = metadata["EchoTime"]
    try:
        echo_time = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{_sidecar(path)}: EchoTime {value!r} is not a number") from None
    if not math.isfinite(echo_time) or echo_time <= 0:
        raise InputError(f"{_sidecar(path)}: EchoTime {value!r} must be a positive number of seconds")
    if echo_time > 1.0:
        raise InputError(f"{_sidecar(path)}: EchoTime {value!r} is not in seconds (BIDS requires seconds)")
    return echo_time


def _sidecar(path: str) -> str:
    for extension in (".nii.gz", ".nii"):
        if path.endswith(extension):
            return path[: -len(extension)] + ".json"
    return path


def _check_image_header(path: str) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: cannot read NIfTI header ({error})") from None
    if len(image.shape) != 3:
        raise InputError(f"{path}: expected a 3-D image, found shape {tuple(image.shape)}")
    if min(image.shape) < 2:
        raise InputError(f"{path}: expected a 3-D volume, found shape {tuple(image.shape)}")
    return image


def _group_scan(layout, files: list, field_strength: float | None) -> Scan:
    first = files[0]
    entities = {name: first.entities.get(name) for name in SCAN_ENTITIES}
    suffix = first.entities["suffix"]
    by_part: dict[str, dict] = {"mag": {}, "phase": {}}
    for bids_file in files:
        part = bids_file.entities.get("part", "mag")
        if part not in by_part:
            continue  # real/imag parts are not used
        echo = int(bids_file.entities.get("echo", 1))
        if echo in by_part[part]:
            raise InputError(f"{bids_file.path}: duplicate echo {echo} ({by_part[part][echo].path})")
        by_part[part][echo] = bids_file
    name = bids_prefix(entities) + f"_{suffix}"
    if not by_part["phase"]:
        example = next(iter(by_part["mag"].values())).path
        raise InputError(f"{example}: magnitude without phase; scan {name} has no part-phase images")
    if not by_part["mag"]:
        example = next(iter(by_part["phase"].values())).path
        raise InputError(f"{example}: phase without magnitude; scan {name} has no part-mag images")
    if set(by_part["mag"]) != set(by_part["phase"]):
        missing_phase = sorted(set(by_part["mag"]) - set(by_part["phase"]))
        missing_mag = sorted(set(by_part["phase"]) - set(by_part["mag"]))
        if missing_phase:
            path = by_part["mag"][missing_phase[0]].path
            raise InputError(f"{path}: no matching phase image for echo {missing_phase[0]}")
        path = by_part["phase"][missing_mag[0]].path
        raise InputError(f"{path}: no matching magnitude image for echo {missing_mag[0]}")
    echoes = sorted(by_part["mag"])
    magnitude_files = [by_part["mag"][e].path for e in echoes]
    phase_files = [by_part["phase"][e].path for e in echoes]

    echo_times, strengths = [], set()
    for path in phase_files:
        metadata = layout.get_metadata(path)
        echo_times.append(_echo_time(path, metadata))
        if metadata.get("MagneticFieldStrength") is not None:
            try:
                strengths.add(float(metadata["MagneticFieldStrength"]))
            except (TypeError, ValueError):
                raise InputError(f"{_sidecar(path)}: MagneticFieldStrength is not a number") from None
    if any(b <= a for a, b in zip(echo_times, echo_times[1:])):
        raise InputError(f"{_sidecar(phase_files[0])}: echo times {echo_times} of scan {name} do not increase with echo number")
    if field_strength is None:
        if not strengths:
            raise InputError(
                f"{_sidecar(phase_files[0])}: MagneticFieldStrength is missing; set it with --set input.field_strength=3"
            )
        if len(strengths) > 1:
            raise InputError(f"{_sidecar(phase_files[0])}: echoes of scan {name} disagree on MagneticFieldStrength {sorted(strengths)}")
        field_strength = strengths.pop()

    reference = _check_image_header(magnitude_files[0])
    for path in magnitude_files[1:] + phase_files:
        image = _check_image_header(path)
        if image.shape != reference.shape:
            raise InputError(f"{path}: shape {image.shape} differs from {magnitude_files[0]} {reference.shape}")
        if not np.allclose(image.affine, reference.affine, atol=1e-4):
            raise InputError(f"{path}: affine differs from that of {magnitude_files[0]}")
    return Scan(
        entities=entities,
        suffix=suffix,
        magnitude_files=magnitude_files,
        phase_files=phase_files,
        echo_times=echo_times,
        field_strength=field_strength,
    )


def collect_scans(bids_dir, participant_labels=None, field_strength: float | None = None):
    """Find every multi-echo GRE scan of the selected participants.

    Parameters
    ----------
    bids_dir : path
        Root of a BIDS raw dataset.
    participant_labels : list of str, optional
        Subjects to process (with or without ``sub-``); all when empty.
    field_strength : float, optional
        Overrides ``MagneticFieldStrength`` of the sidecars (tesla).

    Returns
    -------
    scans : list of Scan
        The valid scans, sorted by name.
    errors : list of (str, str)
        Scans that cannot be processed: (scan name, one-line reason naming the file).

    Raises
    ------
    InputError
        For problems of the whole dataset: not BIDS, no GRE scans, unknown participant.
    """
    from bids import BIDSLayout

    bids_dir = Path(bids_dir)
    check_dataset(bids_dir)
    labels = check_participant_labels(participant_labels)
    layout = BIDSLayout(str(bids_dir), validate=False)
    subjects = layout.get_subjects()
    if labels:
        unknown = sorted(set(labels) - set(subjects))
        if unknown:
            raise InputError(f"{bids_dir}: no participant {', '.join('sub-' + u for u in unknown)} in this dataset")
    query = dict(suffix=list(GRE_SUFFIXES), extension=[".nii", ".nii.gz"], datatype="anat")
    if labels:
        query["subject"] = labels
    files = layout.get(**query)
    if not files:
        which = f"participants {', '.join(labels)}" if labels else "any participant"
        raise InputError(f"{bids_dir}: no MEGRE or T2starw images found for {which}")
    groups: dict[tuple, list] = {}
    for bids_file in files:
        key = tuple(bids_file.entities.get(name) for name in SCAN_ENTITIES) + (bids_file.entities["suffix"],)
        groups.setdefault(key, []).append(bids_file)
    scans, errors = [], []
    for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
        entities = dict(zip(SCAN_ENTITIES, key))
        try:
            scans.append(_group_scan(layout, groups[key], field_strength))
        except InputError as error:
            errors.append((bids_prefix(entities) + f"_{key[-1]}", str(error)))
    from bids.layout import Query

    for scan in scans:
        t1w = layout.get(subject=scan.subject, session=scan.entities.get("session") or Query.NONE, suffix="T1w",
                         extension=[".nii", ".nii.gz"], datatype="anat", return_type="filename")
        scan.t1w_file = sorted(t1w)[0] if t1w else None
    return scans, errors


#: Entities qsmflow's derivatives may carry beyond BIDS's own: fMRIPrep's transform entities.
_TRANSFORM_ENTITIES = {"from": "from", "to": "to", "mode": "mode"}


def _entity_order() -> list[tuple[str, str]]:
    """(long name, key) of every BIDS entity in the order BIDS puts them in a file name, from the
    BIDS schema that pybids installs (``bidsschematools``), with fMRIPrep's ``from``/``to``/``mode``
    just before ``desc``."""
    from bidsschematools import schema

    loaded = schema.load_schema()
    order = [(name, loaded.objects.entities[name]["name"]) for name in loaded.rules.entities]
    describe = [name for name, _ in order].index("description")
    return order[:describe] + list(_TRANSFORM_ENTITIES.items()) + order[describe:]


_ENTITY_ORDER: list[tuple[str, str]] = []


def derivative_path(output_dir, entities: dict, suffix: str, *, extension: str = ".nii.gz", datatype: str = "anat",
                    **more_entities) -> Path:
    """Where a derivative goes, named as BIDS (and TemplateFlow, and fMRIPrep for transforms) name it.

    ``sub-X/[ses-Y/]<datatype>/sub-X[_ses-Y]..._<suffix><extension>`` for a subject's file;
    ``tpl-T/[cohort-K/]tpl-T[_cohort-K]..._<suffix><extension>`` for a template's (no datatype
    folder, as TemplateFlow). Entities are given by their pybids names or their keys
    (``{"subject": "01", "space": "MNI152NLin2009aSym", "desc": "brain"}``, or as keyword
    arguments: ``desc="brain"``) and written in the order of the BIDS schema; ``None`` values are
    left out. fMRIPrep's ``from``, ``to`` and ``mode`` name transforms
    (``sub-01_from-MNI152NLin2009aSym_to-scanner_mode-image_xfm.h5``).

    Raises ``ValueError`` for an entity BIDS does not know or a value that is not a BIDS label.
    """
    if not _ENTITY_ORDER:
        _ENTITY_ORDER.extend(_entity_order())
    by_key = {key: name for name, key in _ENTITY_ORDER}
    names = {name for name, _ in _ENTITY_ORDER}
    values: dict[str, str] = {}
    for given, value in {**entities, **more_entities}.items():
        name = given if given in names else by_key.get(given)
        if name is None:
            raise ValueError(f"derivative entity {given!r} is not a BIDS entity")
        if value is None:
            continue
        value = str(value)
        if not _LABEL_PATTERN.match(value):
            raise ValueError(f"derivative entity {given}={value!r}: not a BIDS label (letters and digits only)")
        values[name] = value
    if not re.fullmatch(r"[A-Za-z0-9]+", suffix):
        raise ValueError(f"derivative suffix {suffix!r}: letters and digits only")
    name = "_".join(f"{key}-{values[entity]}" for entity, key in _ENTITY_ORDER if entity in values)
    filename = f"{name}_{suffix}{extension}"
    if "subject" in values:
        directory = Path(output_dir) / f"sub-{values['subject']}"
        if "session" in values:
            directory = directory / f"ses-{values['session']}"
        return directory / datatype / filename
    if "template" in values:
        directory = Path(output_dir) / f"tpl-{values['template']}"
        if "cohort" in values:
            directory = directory / f"cohort-{values['cohort']}"
        return directory / filename
    raise ValueError(f"derivative {filename}: needs a subject or a template entity")


def sidecar_path(path) -> Path:
    """The JSON sidecar of a data file (``x.nii.gz`` → ``x.json``)."""
    path = Path(path)
    for extension in (".nii.gz", ".nii", ".tsv", ".h5", ".mat", ".txt", ".json"):
        if path.name.endswith(extension):
            return path.with_name(path.name[: -len(extension)] + ".json")
    return path.with_name(path.name + ".json")


def reproducible_nifti_bytes(path) -> bytes:
    """The image at ``path`` as ``.nii.gz`` bytes that depend only on its content (no gzip time)."""
    import gzip

    image = nib.load(str(path))
    image = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless the file already holds exactly it; True if written."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def write_derivative(output_dir, source_file, entities: dict, suffix: str, *, extension: str | None = None,
                     datatype: str = "anat", metadata: dict | None = None) -> Path:
    """Write one derivative (and its JSON sidecar) into the derivatives dataset ``output_dir``.

    The one writer of every level: the file goes to :func:`derivative_path`; a NIfTI source is
    stored as reproducible ``.nii.gz`` (bit-identical for identical content), any other file is
    copied byte for byte; ``metadata``, when given, becomes the JSON sidecar, written before the
    data file. Each file is written through a temporary file and a rename, and left untouched
    when its content is unchanged.

    Returns the path written.
    """
    source = Path(source_file)
    if extension is None:
        extension = ".nii.gz" if source.name.endswith((".nii", ".nii.gz")) else "".join(source.suffixes[-1:])
    target = derivative_path(output_dir, entities, suffix, extension=extension, datatype=datatype)
    if metadata is not None:
        write_if_changed(sidecar_path(target), json_bytes(metadata))
    data = reproducible_nifti_bytes(source) if extension == ".nii.gz" else source.read_bytes()
    write_if_changed(target, data)
    return target


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so that a reader
    never sees a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def json_bytes(content: dict) -> bytes:
    """``content`` as indented, key-sorted JSON (numpy scalars and paths allowed)."""
    return (json.dumps(content, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def atomic_write_json(path: Path, content: dict) -> None:
    atomic_write_bytes(path, json_bytes(content))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


#: Outputs outside the BIDS-Derivatives specification, listed in the derivatives' ``.bidsignore``
#: so that the BIDS validator passes over them: the group and atlas levels' tables, figures and
#: templates (laid out as TemplateFlow), the HTML reports and their figures, and fMRIPrep-style
#: transforms (``_xfm``, not yet in BIDS). Folders without a trailing slash: bids-validator-deno 2
#: ignored ``sub-*/figures/``, ``group/`` and ``atlas/`` written so (tests/test_reports.py).
BIDS_IGNORED = ("group", "atlas", "sub-*.html", "sub-*/figures", "*_xfm.*", "logs",
                "*_roistats.tsv")  # per-scan ROI tables (segmentation), not a BIDS suffix


def write_dataset_description(output_dir, bids_dir=None) -> Path:
    """Write (or refresh) the derivative dataset's ``dataset_description.json``."""
    from . import __version__

    description = {
        "Name": "qsmflow derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmflow", "Version": __version__, "CodeURL": "https://pypi.org/project/qsmflow/"}],
    }
    if bids_dir is not None:
        raw = Path(bids_dir).resolve().as_uri()
        description["SourceDatasets"] = [{"URL": raw}]
        # the sidecars' "Sources" are bids:raw:<path> URIs, resolved through this link
        description["DatasetLinks"] = {"raw": raw}
    path = Path(output_dir) / "dataset_description.json"
    atomic_write_json(path, description)
    write_if_changed(Path(output_dir) / ".bidsignore", "".join(f"{pattern}\n" for pattern in BIDS_IGNORED).encode())
    return path


#: How :func:`orientation_sets` groups a session's scans into COSMOS orientation sets.
ORIENTATION_RULES = ("run", "acq", "files")


def orientation_sets(scans, rule: str = "run", files=()) -> list[list[Scan]]:
    """Group scans of the same head in different orientations into COSMOS sets.

    Parameters
    ----------
    scans : list of Scan
        Validated scans (:func:`collect_scans`).
    rule : {"run", "acq", "files"}
        ``run``: scans of one session and suffix whose entities differ only in ``run`` form a
        set; ``acq``: those that differ only in ``acquisition`` (each acquisition label one
        orientation); ``files``: the sets listed in ``files``.
    files : list of lists of str
        With ``rule="files"``: each set as a list of its scans, each named by any of its image
        files (path, absolute or relative to the dataset, or file name) or its name
        (``sub-01_run-2_MEGRE``). The first scan of a set is its reference orientation.

    Returns
    -------
    list of sets, each a list of two or more scans, the reference orientation (the lowest run
    or acquisition label, or the first listed) first. Scans in no set are not returned; they
    get their single-orientation Chimap only.

    Raises
    ------
    InputError
        An unknown rule; a listed set of one scan (COSMOS needs two or more orientations), a
        listed file that is no scan's, a scan listed in two sets, or a set spanning subjects,
        sessions or suffixes.
    """
    if rule not in ORIENTATION_RULES:
        raise InputError(f"cosmos.group_by {rule!r}: expected one of {', '.join(ORIENTATION_RULES)}")
    if rule == "files":
        return _listed_orientation_sets(scans, files)
    varying = {"run": "run", "acq": "acquisition"}[rule]
    groups: dict[tuple, list[Scan]] = {}
    for scan in scans:
        key = tuple(scan.entities.get(name) for name in SCAN_ENTITIES if name != varying) + (scan.suffix,)
        groups.setdefault(key, []).append(scan)

    def order(scan):
        value = scan.entities.get(varying)
        text = "" if value is None else str(value)
        return (0, int(text), text) if text.isdigit() else (1, 0, text)

    return [sorted(members, key=order) for _, members in sorted(groups.items(), key=lambda item: str(item[0]))
            if len(members) > 1]


def _listed_orientation_sets(scans, files) -> list[list[Scan]]:
    if not files:
        raise InputError("cosmos.group_by 'files' needs cosmos.files: a list of sets, each a list of scan files")
    sets, used = [], {}
    for listed in files:
        if isinstance(listed, str) or not hasattr(listed, "__iter__"):
            raise InputError(f"cosmos.files entry {listed!r}: each set must be a list of scan files")
        members = []
        for item in listed:
            matches = [scan for scan in scans if _names_scan(scan, str(item))]
            if not matches:
                raise InputError(f"cosmos.files: {item} is not a file of any selected GRE scan")
            scan = matches[0]
            if scan.name + scan.suffix in used:
                raise InputError(f"cosmos.files: {item} ({scan.name}_{scan.suffix}) is listed in two orientation sets")
            used[scan.name + scan.suffix] = item
            members.append(scan)
        names = ", ".join(f"{s.name}_{s.suffix}" for s in members)
        if len(members) < 2:
            raise InputError(f"cosmos.files: the orientation set [{names}] has one scan; COSMOS needs two or more "
                             "orientations of the same head (three or more recommended)")
        if len({(s.subject, s.entities.get("session"), s.suffix) for s in members}) > 1:
            raise InputError(f"cosmos.files: the orientation set [{names}] spans subjects, sessions or suffixes")
        sets.append(members)
    return sets


def _names_scan(scan: Scan, item: str) -> bool:
    if item in (f"{scan.name}_{scan.suffix}", scan.name):
        return True
    candidate = Path(item)
    for path in scan.magnitude_files + scan.phase_files:
        if candidate.name == item and Path(path).name == item:
            return True
        if candidate.is_absolute() and Path(path).resolve() == candidate.resolve():
            return True
        if not candidate.is_absolute() and Path(path).as_posix().endswith("/" + candidate.as_posix()):
            return True
    return False


def orientation_set_entities(members) -> dict:
    """Entities of a COSMOS output: those all members share (the varying ones dropped), with
    ``reconstruction`` set to ``cosmos``."""
    shared = {}
    for name in SCAN_ENTITIES:
        values = {scan.entities.get(name) for scan in members}
        if len(values) == 1 and None not in values:
            shared[name] = values.pop()
    shared["reconstruction"] = "cosmos"
    return shared
