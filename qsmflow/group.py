"""Inputs of the group level: every scan's ROI table joined with participants' and sessions' data.

:func:`gather_group_table` reads the participant level's ``*_roistats.tsv`` files (one row per
ROI, columns :data:`qsmflow.segmentation.ROISTATS_COLUMNS`), the dataset's ``participants.tsv``
and each subject's ``sub-X/sub-X_sessions.tsv``, and returns one row per scan and ROI with the
age and covariates, plus a record of every reality of the cohort that affects the fits:
subjects without age (excluded), ages in ``participants.tsv`` that disagree with
``sessions.tsv`` (the session age is used), covariates missing for some subjects (those scans
excluded from the fits), and ROIs missing or empty in some scans. Nothing is dropped without
an entry in that record.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

#: Columns a ``_roistats.tsv`` must have for the group level.
REQUIRED_ROISTATS_COLUMNS = ("roi", "num_voxels", "mean")
_ENTITY = re.compile(r"([a-zA-Z]+)-([a-zA-Z0-9]+)")
_MISSING = {"", "n/a", "na", "nan", "none"}


class GroupInputError(ValueError):
    """An input table of the group level is unusable; the message names the file."""


def find_roistats(output_dir) -> list[Path]:
    """Every scan's ROI table in the derivatives dataset (``sub-*/[ses-*/]anat/*_roistats.tsv``)."""
    output_dir = Path(output_dir)
    return sorted(p for p in output_dir.glob("sub-*/**/*_roistats.tsv") if p.is_file())


def scan_entities(path) -> dict:
    """BIDS entities of a file name (``sub``, ``ses``, ``acq``, ``run`` ...) and its ``scan`` stem."""
    name = Path(path).name
    stem = name[: -len("_roistats.tsv")] if name.endswith("_roistats.tsv") else Path(name).stem
    entities = dict(_ENTITY.findall(stem))
    if "sub" not in entities:
        raise GroupInputError(f"{path}: file name has no sub-<label> entity")
    entities["scan"] = stem
    return entities


def read_tsv(path) -> list[dict]:
    """Rows of a TSV file as dicts (header = keys)."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError) as error:
        raise GroupInputError(f"{path}: cannot read ({error})") from None
    if not header:
        raise GroupInputError(f"{path}: empty file (no header row)")
    return rows


def read_roistats(path) -> list[dict]:
    """One scan's ROI rows; refuses a table without :data:`REQUIRED_ROISTATS_COLUMNS`."""
    rows = read_tsv(path)
    with Path(path).open(newline="") as handle:
        header = next(csv.reader(handle, delimiter="\t"), [])
    missing = [c for c in REQUIRED_ROISTATS_COLUMNS if c not in header]
    if missing:
        raise GroupInputError(f"{path}: ROI table lacks column(s) {', '.join(missing)} "
                              f"(has {', '.join(header) or 'none'}); expected the participant level's _roistats.tsv")
    return rows


def _number(value) -> float | None:
    if value is None or str(value).strip().lower() in _MISSING:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _strip_prefix(value: str, prefix: str) -> str:
    value = str(value).strip()
    return value[len(prefix) + 1:] if value.startswith(prefix + "-") else value


def read_participants(bids_dir) -> tuple[dict, Path | None]:
    """``participants.tsv`` as {label: row}; empty if the file does not exist."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return {}, None
    rows = read_tsv(path)
    if rows and "participant_id" not in rows[0]:
        raise GroupInputError(f"{path}: no participant_id column")
    return {_strip_prefix(r["participant_id"], "sub"): r for r in rows}, path


def read_sessions(bids_dir, subject: str) -> tuple[dict, Path | None]:
    """``sub-X/sub-X_sessions.tsv`` as {session label: row}; empty if absent."""
    path = Path(bids_dir) / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if not path.is_file():
        return {}, None
    rows = read_tsv(path)
    if rows and "session_id" not in rows[0]:
        raise GroupInputError(f"{path}: no session_id column")
    return {_strip_prefix(r["session_id"], "ses"): r for r in rows}, path


def _roi_kind(roi: str, overrides: dict) -> str:
    from .segmentation import ROIS

    if roi in overrides:
        return str(overrides[roi])
    base = roi.rsplit("_", 1)[0] if roi.endswith(("_L", "_R")) else roi
    if base in overrides:
        return str(overrides[base])
    return ROIS[base][1] if base in ROIS else "other"


def gather_group_table(roistats_files, bids_dir, *, value: str = "mean", age_column: str = "age",
                       covariates=("sex",), combine_hemispheres: bool = True, age_tolerance: float = 1.0,
                       roi_kinds: dict | None = None, exclude_kinds=("csf",)) -> tuple[list[dict], dict]:
    """Join every scan's ROI rows with age and covariates.

    Parameters
    ----------
    roistats_files : list of paths
        The scans' ``_roistats.tsv`` (see :func:`find_roistats`).
    bids_dir : path
        Raw dataset with ``participants.tsv`` and ``sub-X/sub-X_sessions.tsv``.
    value : str
        Column of the ROI tables to analyse (``mean`` or ``median``, ppm).
    age_column : str
        Column holding the age in years, in ``sessions.tsv`` (used first) or ``participants.tsv``.
    covariates : sequence of str
        Columns (``sessions.tsv`` first, then ``participants.tsv``) added as covariates.
    combine_hemispheres : bool
        Replace ``<ROI>_L`` and ``<ROI>_R`` by ``<ROI>``, their voxel-weighted mean.
    age_tolerance : float
        Years; ``participants.tsv`` age differing from every ``sessions.tsv`` age of that subject
        by more than this is reported.
    roi_kinds : dict, optional
        ROI -> kind (``deep_grey``, ``white_matter``, ``other``) overrides.
    exclude_kinds : sequence of str
        Kinds not fitted (the CSF reference region).

    Returns
    -------
    rows : list of dict
        One per scan and ROI: ``participant_id``, ``session_id``, ``scan``, ``roi``, ``kind``,
        ``value``, ``num_voxels``, ``age``, ``age_source``, the covariates, and ``included``
        (False for scans excluded from the fits, with ``exclusion`` saying why).
    notes : dict
        ``subjects_without_age``, ``age_disagreements``, ``missing_covariates``,
        ``covariates_absent``, ``roi_missing``, ``roi_empty``, ``hemispheres_incomplete``,
        ``scans``, ``subjects``, ``files``.
    """
    roi_kinds = dict(roi_kinds or {})
    participants, participants_path = read_participants(bids_dir)
    notes = {"subjects_without_age": [], "age_disagreements": [], "missing_covariates": [], "covariates_absent": [],
             "roi_missing": {}, "roi_empty": {}, "hemispheres_incomplete": [], "age_sources": {},
             "participants_file": str(participants_path) if participants_path else None, "files": []}
    sessions_cache: dict = {}
    scan_rows: list[tuple[dict, list[dict]]] = []
    for path in sorted(map(Path, roistats_files)):
        entities = scan_entities(path)
        rows = read_roistats(path)
        if value not in rows[0] if rows else True:
            raise GroupInputError(f"{path}: no {value!r} column to analyse (group.value)")
        scan_rows.append((entities, rows))
        notes["files"].append(str(path))
    if not scan_rows:
        raise GroupInputError("no _roistats.tsv found: run the participant level (with segmentation) first")

    present_columns = set()
    for row in participants.values():
        present_columns.update(row)
    for subject in {e["sub"] for e, _ in scan_rows}:
        sessions_cache[subject] = read_sessions(bids_dir, subject)[0]
        for row in sessions_cache[subject].values():
            present_columns.update(row)
    usable_covariates = [c for c in covariates if c in present_columns]
    notes["covariates_absent"] = [c for c in covariates if c not in present_columns]

    out: list[dict] = []
    without_age: set = set()
    for entities, rows in scan_rows:
        subject, session = entities["sub"], entities.get("ses")
        participant = participants.get(subject, {})
        session_row = sessions_cache[subject].get(session, {}) if session else {}
        age_session = _number(session_row.get(age_column))
        age_participant = _number(participant.get(age_column))
        if age_session is not None:
            age, source = age_session, "sessions.tsv"
        elif age_participant is not None:
            age, source = age_participant, "participants.tsv"
        else:
            age, source = None, "none"
            without_age.add(subject)
        notes["age_sources"][entities["scan"]] = source
        values = {}
        missing = []
        for column in usable_covariates:
            raw = session_row.get(column, participant.get(column))
            if raw is None or str(raw).strip().lower() in _MISSING:
                missing.append(column)
            values[column] = raw
        if missing:
            notes["missing_covariates"].append({"scan": entities["scan"], "columns": missing})
        exclusion = ("no age" if age is None else "") or (f"missing {', '.join(missing)}" if missing else "")
        by_roi = {}
        for row in rows:
            number = _number(row.get(value))
            voxels = _number(row.get("num_voxels")) or 0.0
            by_roi[row["roi"]] = (number, voxels)
        if combine_hemispheres:
            combined = {}
            for roi, (number, voxels) in by_roi.items():
                base = roi[:-2] if roi.endswith(("_L", "_R")) else roi
                combined.setdefault(base, []).append((roi, number, voxels))
            by_roi = {}
            for base, parts in combined.items():
                good = [(n, v) for _, n, v in parts if n is not None and v > 0]
                if len(parts) > 1 and len(good) < len(parts):
                    notes["hemispheres_incomplete"].append({"scan": entities["scan"], "roi": base,
                                                            "present": [r for r, n, v in parts if n is not None and v > 0]})
                weight = sum(v for _, v in good)
                by_roi[base] = (sum(n * v for n, v in good) / weight if weight > 0 else None, weight)
        for roi, (number, voxels) in sorted(by_roi.items()):
            kind = _roi_kind(roi, roi_kinds)
            if kind in exclude_kinds:
                continue
            if number is None or voxels <= 0:
                notes["roi_empty"].setdefault(roi, []).append(entities["scan"])
            out.append({
                "participant_id": f"sub-{subject}", "session_id": f"ses-{session}" if session else "n/a",
                "scan": entities["scan"], "roi": roi, "kind": kind,
                "value": number, "num_voxels": voxels, "age": age, "age_source": source,
                **{c: values[c] for c in usable_covariates},
                "included": bool(not exclusion and number is not None and voxels > 0),
                "exclusion": exclusion or ("ROI empty or missing" if number is None or voxels <= 0 else ""),
            })
        if age_participant is not None and sessions_cache[subject]:
            session_ages = [a for a in (_number(r.get(age_column)) for r in sessions_cache[subject].values()) if a is not None]
            if session_ages and min(abs(age_participant - a) for a in session_ages) > age_tolerance:
                record = {"participant_id": f"sub-{subject}", "participants_age": age_participant,
                          "sessions_ages": session_ages, "used": "sessions.tsv"}
                if record not in notes["age_disagreements"]:
                    notes["age_disagreements"].append(record)
    notes["subjects_without_age"] = sorted(f"sub-{s}" for s in without_age)
    all_scans = sorted({r["scan"] for r in out})
    for roi in sorted({r["roi"] for r in out}):
        have = {r["scan"] for r in out if r["roi"] == roi}
        lacking = [s for s in all_scans if s not in have]
        if lacking:
            notes["roi_missing"][roi] = lacking
    notes["scans"] = len(all_scans)
    notes["subjects"] = len({r["participant_id"] for r in out})
    notes["covariates"] = usable_covariates
    return out, notes


def read_group_table(path) -> list[dict]:
    """Rows of ``group/roistats.tsv`` with numbers parsed (``value``, ``age``, ``num_voxels``)."""
    rows = read_tsv(path)
    for row in rows:
        for column in ("value", "age", "num_voxels"):
            row[column] = _number(row.get(column))
        row["included"] = str(row.get("included")) == "True"
    return rows


# ---------------------------------------------------------------------------------------------
# tables of results


def _safe_name(name: str) -> str:
    return "effect_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def trajectory_rows(analyses: dict) -> list[dict]:
    """Rows of ``trajectories.tsv``: one per ROI and candidate model (fitted or skipped).

    ``analyses`` maps ROI -> ``{"kind": ..., "analysis": qsmflow.stats.trajectories.analyse_roi(...)}``
    (or ``{"kind": ..., "skipped": reason}``). Adds ``q_age``, the Benjamini-Hochberg adjusted
    p-value across ROIs, computed separately for each model.
    """
    from .stats.inference import benjamini_hochberg

    rows = []
    for roi, entry in sorted(analyses.items()):
        analysis = entry.get("analysis")
        if analysis is None:
            for model in entry.get("models", []):
                rows.append({"roi": roi, "kind": entry["kind"], "model": model, "status": "skipped",
                             "reason": entry.get("skipped", "")})
            continue
        for model in analysis["order"]:
            base = {"roi": roi, "kind": entry["kind"], "model": model, "n_subjects": analysis["n_subjects"],
                    "n_scans": analysis["n_scans"], "variance": analysis["variance"]}
            if model in analysis["skipped"]:
                rows.append({**base, "status": "skipped", "reason": analysis["skipped"][model]})
                continue
            fit = analysis["models"][model]
            row = {**base, "status": "fitted", "reason": "", "formula": fit["formula"], "nonlinear": fit["nonlinear"] or ""}
            for name, value in fit["parameters"].items():
                key = name if name in ("a", "b", "c", "A", "B", "C", "b0", "b1", "b2", "b3") else _safe_name(name)
                row[key] = value
                interval = fit["intervals"].get(name)
                if interval:
                    row[f"{key}_ci_low"], row[f"{key}_ci_high"], row[f"{key}_ci_open"] = (
                        interval["low"], interval["high"], interval["open"])
            for name, value in fit["derived"].items():
                row[name] = value
                interval = fit["derived_intervals"].get(name)
                if interval:
                    row[f"{name}_ci_low"], row[f"{name}_ci_high"], row[f"{name}_ci_open"] = (
                        interval["low"], interval["high"], interval["open"])
            row.update({
                "sigma": fit["sigma"], "random_intercept_sd": fit["random_intercept_sd"], "log_sigma_slope": fit["gamma"],
                "loglik": fit["loglik"], "n_parameters": fit["n_parameters"], "r2": fit["r2"],
                "aicc": fit["aicc"], "bic": fit["bic"], "delta_aicc": fit.get("delta_aicc"), "delta_bic": fit.get("delta_bic"),
                "preferred_aicc": model == analysis["preferred_aicc"], "preferred_bic": model == analysis["preferred_bic"],
                "p_age": fit["p_age"], "p_method": fit["p_method"], "test_replicates": fit["test_replicates"],
                "at_bound": "; ".join(fit["at_bound"]), "warnings": "; ".join(fit["warnings"]),
            })
            rows.append(row)
    for model in sorted({r["model"] for r in rows}):
        chosen = [r for r in rows if r["model"] == model and r["status"] == "fitted"]
        for row, q in zip(chosen, benjamini_hochberg([r["p_age"] for r in chosen])):
            row["q_age"] = float(q)
    return rows


#: Descriptions (and units) of the columns of ``trajectories.tsv`` for its JSON sidecar.
TRAJECTORY_COLUMNS = {
    "roi": {"Description": "region of interest (hemispheres combined unless group.combine_hemispheres is false)"},
    "kind": {"Description": "ROI kind: deep_grey, white_matter or other; selects the candidate models"},
    "model": {"Description": "trajectory model: exponential a*(1-exp(-b*age))+c, poisson A*age*exp(-age/B)+C, "
                             "linear, quadratic, cubic (polynomials b0+b1*age+...)"},
    "status": {"Description": "fitted or skipped"},
    "reason": {"Description": "why a model was not fitted (too few scans or subjects, failure)"},
    "n_subjects": {"Description": "subjects used"}, "n_scans": {"Description": "scans used"},
    "variance": {"Description": "residual model: ML; subject random intercept if any subject has several scans"},
    "formula": {"Description": "mean curve"},
    "nonlinear": {"Description": "the parameter profiled on a grid (b or B)"},
    "a": {"Description": "exponential: plateau rise", "Units": "ppm"},
    "b": {"Description": "exponential: rate", "Units": "1/year"},
    "c": {"Description": "exponential: value at age 0 (average covariates)", "Units": "ppm"},
    "A": {"Description": "poisson: amplitude", "Units": "ppm/year"},
    "B": {"Description": "poisson: age of the extremum", "Units": "year"},
    "C": {"Description": "poisson: value at age 0 (average covariates)", "Units": "ppm"},
    "b0": {"Description": "polynomial intercept", "Units": "ppm"},
    "b1": {"Description": "polynomial linear coefficient", "Units": "ppm/year"},
    "b2": {"Description": "polynomial quadratic coefficient", "Units": "ppm/year^2"},
    "b3": {"Description": "polynomial cubic coefficient", "Units": "ppm/year^3"},
    "effect_*": {"Description": "additive covariate effect against the first level (centred coding)", "Units": "ppm"},
    "*_ci_low": {"Description": "lower end of the 95 % profile-likelihood interval (small-sample cut); "
                                "n/a when open"},
    "*_ci_high": {"Description": "upper end of the 95 % profile-likelihood interval; n/a when open"},
    "*_ci_open": {"Description": "low, high or both: the interval reaches the end of the parameter's grid on "
                                 "that side (the data do not bound it)"},
    "age90": {"Description": "exponential: age at 90 % of the plateau, ln(10)/b", "Units": "year"},
    "extremum_age": {"Description": "age of the curve's minimum or maximum (poisson: B)", "Units": "year"},
    "extremum_kind": {"Description": "minimum or maximum"},
    "sigma": {"Description": "residual SD (ML; at the mean age if heteroscedastic)", "Units": "ppm"},
    "random_intercept_sd": {"Description": "SD of the subject random intercept (0 without)", "Units": "ppm"},
    "log_sigma_slope": {"Description": "slope of log sigma in age (0 unless heteroscedastic)", "Units": "1/year"},
    "loglik": {"Description": "maximised log-likelihood (ML, comparable across models)"},
    "n_parameters": {"Description": "parameters counted in AICc/BIC: mean (incl. b/B and covariates) and variance"},
    "r2": {"Description": "1 - residual / total sum of squares of the fixed-effect curve"},
    "aicc": {"Description": "AICc = -2 loglik + 2k + 2k(k+1)/(n-k-1), n = scans"},
    "bic": {"Description": "BIC = -2 loglik + k ln n"},
    "delta_aicc": {"Description": "AICc minus the ROI's lowest"}, "delta_bic": {"Description": "BIC minus the ROI's lowest"},
    "preferred_aicc": {"Description": "lowest AICc of the ROI"}, "preferred_bic": {"Description": "lowest BIC of the ROI"},
    "p_age": {"Description": "p-value of 'no age effect' (parametric-bootstrap likelihood ratio; exact F for "
                             "polynomials with independent errors)"},
    "p_method": {"Description": "test used"}, "test_replicates": {"Description": "bootstrap replicates of the test"},
    "q_age": {"Description": "Benjamini-Hochberg adjusted p across ROIs, per model"},
    "at_bound": {"Description": "estimates at the end of their grid (not identified)"},
    "warnings": {"Description": "fit warnings"},
}


_LEADING = ("roi", "kind", "model", "status", "reason", "n_subjects", "n_scans", "formula", "nonlinear")
_PARAMETERS = ("a", "b", "c", "A", "B", "C", "b0", "b1", "b2", "b3", "age90", "extremum_age")
_TRAILING = ("sigma", "random_intercept_sd", "log_sigma_slope", "loglik", "n_parameters", "r2", "aicc", "bic",
             "delta_aicc", "delta_bic", "preferred_aicc", "preferred_bic", "p_age", "q_age", "p_method",
             "test_replicates", "at_bound", "warnings", "variance")


def trajectory_columns(rows: list[dict]) -> list[str]:
    """Column order of ``trajectories.tsv``: identity, parameters with intervals, derived
    quantities, covariate effects, fit statistics."""
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    ordered = [c for c in _LEADING if c in present]
    for name in _PARAMETERS + tuple(sorted(c for c in present if c.startswith("effect_") and "_ci_" not in c)):
        for column in (name, f"{name}_ci_low", f"{name}_ci_high", f"{name}_ci_open"):
            if column in present:
                ordered.append(column)
        if name == "extremum_age" and "extremum_kind" in present:
            ordered.append("extremum_kind")
    ordered += [c for c in _TRAILING if c in present]
    return ordered + sorted(present - set(ordered))


def zscore_rows(analyses: dict, table: list[dict]) -> list[dict]:
    """Rows of ``zscores.tsv``: per scan and ROI, the normative z-score and centile (in-sample
    and held-out, i.e. from a model fitted without the scan's subject)."""
    rows = []
    for roi, entry in sorted(analyses.items()):
        analysis = entry.get("analysis")
        normative = analysis.get("normative") if analysis else None
        if not normative or "z" not in normative:
            continue
        scans = [r for r in table if r["roi"] == roi and r["included"]]
        for scan, z, centile, z_out, centile_out in zip(scans, normative["z"], normative["centile"],
                                                         normative["z_heldout"], normative["centile_heldout"]):
            rows.append({"participant_id": scan["participant_id"], "session_id": scan["session_id"], "scan": scan["scan"],
                         "roi": roi, "age": scan["age"], "value": scan["value"], "model": normative["model"],
                         "z": z, "centile": centile, "z_heldout": z_out, "centile_heldout": centile_out})
    return rows


def write_rows(path, rows: list[dict], columns=None) -> Path:
    """Write dict rows as TSV; columns = union of keys in first-seen order; ``n/a`` for missing."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    path = Path(path)

    def text(value):
        if value is None or (isinstance(value, float) and value != value):
            return "n/a"
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([text(row.get(c)) for c in columns])
    return path
