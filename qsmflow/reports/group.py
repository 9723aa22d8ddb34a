"""Group-level figures (trajectories, centiles, z-score QQ plot) and the group HTML report.

Figures use matplotlib's object API (no pyplot), so they are safe in nipype workers, and are
written atomically and reproducibly (no timestamps in the files).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from ..bids import atomic_write_bytes
from .html import ReportPage

MODEL_COLOURS = {"exponential": "#c0392b", "poisson": "#1f5fa8", "linear": "#7f8c8d", "quadratic": "#8e44ad",
                 "cubic": "#27ae60"}
KIND_TITLES = {"deep_grey": "deep grey matter", "white_matter": "white matter", "other": "other"}


def _save(figure, out_file, dpi: int) -> Path:
    out_file = Path(out_file)
    buffer = io.BytesIO()
    image_format = out_file.suffix.lower()[1:] or "png"
    figure.savefig(buffer, format=image_format, dpi=dpi,
                   metadata={"Date": None} if image_format == "svg" else {"Software": None})
    atomic_write_bytes(out_file, buffer.getvalue())
    return out_file


def _finite(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def draw_trajectory(axes, roi: str, analysis: dict, scans: list[dict], *, show_band: bool = True,
                    show_centiles: bool = True, show_all_models: bool = True, point_size: float = 14.0,
                    compact: bool = False, units: str = "ppm") -> None:
    """Scans against age (a subject's sessions joined), fitted curves, band and centiles, on ``axes``."""
    ages = np.asarray(analysis.get("ages", []), dtype=np.float64)
    by_subject: dict = {}
    for scan in scans:
        by_subject.setdefault(scan["participant_id"], []).append((scan["age"], scan["value"]))
    for points in by_subject.values():
        if len(points) > 1:
            points.sort()
            axes.plot([p[0] for p in points], [p[1] for p in points], color="#9aa3b0", linewidth=0.8, zorder=1)
    if scans:
        axes.scatter([s["age"] for s in scans], [s["value"] for s in scans], s=point_size, color="#22304a",
                     alpha=0.75, linewidths=0, zorder=3, label="scans")
    normative = analysis.get("normative") or {}
    if show_centiles and normative.get("centile_curves"):
        for centile, curve in zip(normative["centiles"], normative["centile_curves"]):
            style = "-" if centile == 50 else "--"
            axes.plot(ages, curve, style, color="#e08a00", linewidth=0.9 if centile != 50 else 1.1, zorder=2,
                      label=None if centile != 2.5 else "centiles 2.5/25/50/75/97.5")
    preferred = analysis.get("preferred_aicc")
    primary = next((m for m in analysis.get("order", []) if m in analysis.get("models", {})), preferred)
    for name, fit in analysis.get("models", {}).items():
        if not show_all_models and name not in (primary, preferred):
            continue
        colour = MODEL_COLOURS.get(name, "#333333")
        main = name in (primary, preferred)
        if show_band and main:
            low, high = _finite(fit["band_low"]), _finite(fit["band_high"])
            if np.any(np.isfinite(low)):
                axes.fill_between(ages, low, high, color=colour, alpha=0.18, linewidth=0, zorder=1)
        label = name + (" (AICc)" if name == preferred else "")
        axes.plot(ages, fit["curve"], color=colour, linewidth=2.0 if main else 0.9, alpha=1.0 if main else 0.7,
                  zorder=4, label=label)
    title = roi
    if primary in analysis.get("models", {}):
        fit = analysis["models"][primary]
        nonlinear = fit.get("nonlinear")
        if nonlinear and not compact:
            value = fit["parameters"][nonlinear]
            interval = fit["intervals"][nonlinear]
            title += f" — {primary}: {nonlinear} = {value:.3g} [{_interval_text(interval)}]"
    axes.set_title(title, fontsize=9 if compact else 11)
    axes.set_xlabel("age (years)", fontsize=8 if compact else 10)
    axes.set_ylabel(f"susceptibility ({units})", fontsize=8 if compact else 10)
    axes.tick_params(labelsize=7 if compact else 9)
    axes.grid(True, color="#e6e9ee", linewidth=0.6)
    if not compact:
        axes.legend(fontsize=8, frameon=False, loc="best")


def _interval_text(interval: dict) -> str:
    low = "open" if interval["open"] in ("low", "both") or interval["low"] is None else f"{interval['low']:.3g}"
    high = "open" if interval["open"] in ("high", "both") or interval["high"] is None else f"{interval['high']:.3g}"
    return f"{low}, {high}"


def plot_roi_trajectory(out_file, roi: str, analysis: dict, scans: list[dict], *, dpi: int = 110, **options) -> Path:
    """One ROI's trajectory figure (see :func:`draw_trajectory`)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.0), facecolor="white")
    axes = figure.add_subplot(1, 1, 1)
    draw_trajectory(axes, roi, analysis, scans, **options)
    figure.tight_layout()
    return _save(figure, out_file, dpi)


def plot_roi_grid(out_file, items: list[tuple], *, dpi: int = 110, columns: int = 4, **options) -> Path:
    """All ROIs on one grid; ``items`` are (roi, analysis, scans) tuples."""
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(len(items) / columns))
    figure = Figure(figsize=(3.6 * columns, 2.9 * rows), facecolor="white")
    for position, (roi, analysis, scans) in enumerate(items, start=1):
        axes = figure.add_subplot(rows, columns, position)
        draw_trajectory(axes, roi, analysis, scans, compact=True, show_all_models=False, **options)
    from matplotlib.lines import Line2D

    used = sorted({m for _, analysis, _ in items for m in (analysis.get("models") or {})})
    handles = [Line2D([], [], color=MODEL_COLOURS.get(m, "#333333"), linewidth=2, label=m) for m in used]
    handles.append(Line2D([], [], color="#e08a00", linestyle="--", label="centiles 2.5/25/50/75/97.5"))
    handles.append(Line2D([], [], color="#22304a", marker="o", linestyle="none", markersize=4, label="scans"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(figure, out_file, dpi)


def plot_zscore_qq(out_file, zscores: dict, *, dpi: int = 110, title: str = "Held-out z-scores against N(0, 1)") -> Path:
    """Normal QQ plot of z-scores; ``zscores`` maps a label (ROI) to its z values."""
    from matplotlib.figure import Figure
    from scipy import stats

    figure = Figure(figsize=(5.5, 5.5), facecolor="white")
    axes = figure.add_subplot(1, 1, 1)
    limit = 3.0
    for label, values in zscores.items():
        values = np.sort(_finite(values)[np.isfinite(_finite(values))])
        if values.size < 2:
            continue
        theoretical = stats.norm.ppf((np.arange(1, values.size + 1) - 0.5) / values.size)
        axes.plot(theoretical, values, "o", markersize=3, alpha=0.7, label=label)
        limit = max(limit, float(np.max(np.abs(values))) + 0.3)
    axes.plot([-limit, limit], [-limit, limit], color="#333333", linewidth=1)
    axes.set_xlim(-limit, limit)
    axes.set_ylim(-limit, limit)
    axes.set_xlabel("standard normal quantile")
    axes.set_ylabel("z-score")
    axes.set_title(title, fontsize=11)
    axes.grid(True, color="#e6e9ee", linewidth=0.6)
    axes.legend(fontsize=7, frameon=False, ncol=2)
    figure.tight_layout()
    return _save(figure, out_file, dpi)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_group_report(path, *, trajectories: list[dict], notes: dict, roi_figures: dict, grid_figure, qq_figure,
                       tables: dict, settings: dict, version: str, config: dict | None = None) -> Path:
    """The group HTML page: cohort facts and problems, the trajectory table, figures, links.

    Parameters
    ----------
    path : path of the page (``group/index.html``)
    trajectories : rows of ``trajectories.tsv`` (dicts)
    notes : cohort record of :func:`qsmflow.group.gather_group_table` plus skipped fits
    roi_figures : ROI -> figure path
    grid_figure, qq_figure : paths
    tables : label -> path of the TSV/JSON files to link
    settings : analysis settings shown as facts
    """
    path = Path(path)
    page = ReportPage("qsmflow group report", path=path,
                      subtitle=f"{notes.get('subjects', 0)} subjects, {notes.get('scans', 0)} scans")
    cohort = page.section("Cohort")
    cohort.facts({
        "Subjects": notes.get("subjects", 0), "Scans": notes.get("scans", 0),
        "Covariates": ", ".join(notes.get("covariates", [])) or "none",
        "Value analysed": settings.get("value", "mean") + " susceptibility per ROI (ppm)",
        "Variance model": settings.get("variance", ""),
    })
    links = "; ".join(f"{label}: {Path(p).name}" for label, p in tables.items())
    cohort.paragraph(f"Tables (in this folder): {links}.")
    problems = _problem_lines(notes, trajectories)
    if problems:
        for line in problems:
            cohort.note(line)
    else:
        cohort.note("Every scan had an age, every covariate and every ROI; every fit converged inside its grid.",
                    kind="info")
    summary = page.section("Trajectories")
    summary.paragraph(
        "Each ROI is fitted with its candidate models by maximum likelihood; the nonlinear parameter (b, B) is "
        "profiled on a grid and its 95 % interval is the profile-likelihood interval with the small-sample cut. "
        "'open' marks a side the data do not bound. p: parametric-bootstrap likelihood-ratio test of any age effect "
        "(exact F test for polynomials with independent errors); q: Benjamini-Hochberg across ROIs.")
    summary.figure(grid_figure, "All ROIs: scans (a subject's sessions joined), primary and AICc-preferred curves with "
                                "95 % subject-bootstrap bands, normative centiles (orange).")
    rows = []
    for row in trajectories:
        if row.get("status") != "fitted":
            rows.append({"ROI": row["roi"], "model": row["model"], "status": row.get("reason", row.get("status")),
                         "nonlinear parameter [95 % CI]": "", "derived [95 % CI]": "", "R²": "", "ΔAICc": "",
                         "ΔBIC": "", "p": "", "q": ""})
            continue
        nonlinear = row.get("nonlinear") or ""
        text = ""
        if nonlinear:
            text = (f"{nonlinear} = {_fmt(row.get(nonlinear))} "
                    f"[{_interval_text({'low': row.get(nonlinear + '_ci_low'), 'high': row.get(nonlinear + '_ci_high'), 'open': row.get(nonlinear + '_ci_open', '')})}]")
        derived = ""
        for key in ("age90", "extremum_age"):
            if row.get(key) is not None:
                derived = f"{key} = {_fmt(row.get(key))}"
                bounds = {"low": row.get(key + "_ci_low"), "high": row.get(key + "_ci_high"),
                          "open": row.get(key + "_ci_open") or ""}
                if bounds["open"] or bounds["low"] is not None or bounds["high"] is not None:
                    derived += f" [{_interval_text(bounds)}]"
        rows.append({"ROI": row["roi"], "model": row["model"] + (" *" if row.get("preferred_aicc") else ""),
                     "status": "fitted" + (" (at bound)" if row.get("at_bound") else ""),
                     "nonlinear parameter [95 % CI]": text, "derived [95 % CI]": derived,
                     "R²": row.get("r2"), "ΔAICc": row.get("delta_aicc"), "ΔBIC": row.get("delta_bic"),
                     "p": row.get("p_age"), "q": row.get("q_age")})
    summary.table(rows, caption="* = preferred by AICc. Ages in years, b in 1/year.",
                  decimals={"R²": 3, "ΔAICc": 1, "ΔBIC": 1, "p": 3, "q": 3})
    for roi, figure in roi_figures.items():
        summary.section(roi).figure(figure, f"{roi}: scans, all fitted models, bands of the primary and preferred model, "
                                            "normative centiles.")
    normative = page.section("Normative z-scores")
    normative.paragraph("Per scan: z against the centile curves of the preferred model with log sigma linear in age; "
                        "held-out z from a model fitted without the scan's subject (zscores.tsv).")
    normative.figure(qq_figure, "Held-out z-scores of every ROI against the standard normal.")
    page.provenance(version=version, config=config, extra={k: v for k, v in settings.items() if k != "variance"})
    return page.write()


def _problem_lines(notes: dict, trajectories: list[dict]) -> list[str]:
    lines = []
    if notes.get("subjects_without_age"):
        lines.append(f"Excluded, no age in sessions.tsv or participants.tsv: {', '.join(notes['subjects_without_age'])}.")
    for record in notes.get("age_disagreements", []):
        lines.append(f"{record['participant_id']}: participants.tsv age {record['participants_age']:g} differs from "
                     f"sessions.tsv ages {', '.join(f'{a:g}' for a in record['sessions_ages'])}; the session ages are used.")
    for record in notes.get("missing_covariates", []):
        lines.append(f"{record['scan']}: missing {', '.join(record['columns'])}; excluded from the fits.")
    if notes.get("covariates_absent"):
        lines.append(f"Covariates configured but absent from participants.tsv/sessions.tsv: "
                     f"{', '.join(notes['covariates_absent'])} (not used).")
    for roi, scans in notes.get("roi_missing", {}).items():
        lines.append(f"ROI {roi} missing in {len(scans)} scan(s): {', '.join(scans)}.")
    for roi, scans in notes.get("roi_empty", {}).items():
        lines.append(f"ROI {roi} empty (no voxels) in {len(scans)} scan(s): {', '.join(scans)}; excluded.")
    for record in notes.get("hemispheres_incomplete", []):
        lines.append(f"{record['scan']}: {record['roi']} has only {', '.join(record['present']) or 'no side'}.")
    for row in trajectories:
        if row.get("status") != "fitted":
            lines.append(f"{row['roi']} {row['model']}: not fitted — {row.get('reason', '')}.")
        elif row.get("at_bound"):
            lines.append(f"{row['roi']} {row['model']}: {row['at_bound']}.")
        if row.get("warnings"):
            lines.append(f"{row['roi']} {row['model']}: {row['warnings']}.")
    return lines


def recovered_parameters(trajectories_path, truths: dict) -> list[dict]:
    """Fitted parameters of each ROI's generating model beside the generating values.

    Parameters
    ----------
    trajectories_path : path of ``group/trajectories.tsv``
    truths : ROI -> ``{"model": name, <parameter>: value}`` (e.g. qsmflow.simulate.TRUE_TRAJECTORIES)

    Returns
    -------
    One dict per ROI and parameter: ``roi``, ``model``, ``parameter``, ``true``, ``estimate``,
    ``ci_low``, ``ci_high``, ``ci_open``, ``covered`` (None where the model was not fitted).
    """
    from ..group import read_tsv

    rows = {(r["roi"], r["model"]): r for r in read_tsv(trajectories_path)}
    out = []
    for roi, truth in sorted(truths.items()):
        row = rows.get((roi, truth["model"]))
        for parameter, true_value in truth.items():
            if parameter == "model":
                continue
            entry = {"roi": roi, "model": truth["model"], "parameter": parameter, "true": true_value, "estimate": None,
                     "ci_low": None, "ci_high": None, "ci_open": "", "covered": None}
            if row is not None and row.get("status") == "fitted" and row.get(parameter) not in (None, "n/a"):
                number = lambda key: None if row.get(key) in (None, "", "n/a") else float(row[key])  # noqa: E731
                entry.update(estimate=number(parameter), ci_low=number(f"{parameter}_ci_low"),
                             ci_high=number(f"{parameter}_ci_high"), ci_open=row.get(f"{parameter}_ci_open", ""))
                low_ok = entry["ci_open"] in ("low", "both") or (entry["ci_low"] is not None and entry["ci_low"] <= true_value)
                high_ok = entry["ci_open"] in ("high", "both") or (entry["ci_high"] is not None and true_value <= entry["ci_high"])
                entry["covered"] = bool(low_ok and high_ok)
            out.append(entry)
    return out


def recovered_parameters_text(rows: list[dict]) -> str:
    """:func:`recovered_parameters` as an aligned text table (the demo prints it)."""
    lines = [f"{'ROI':<5}{'model':<13}{'param':<7}{'true':>10}{'fitted':>11}  95 % interval"]
    for r in rows:
        if r["estimate"] is None:
            lines.append(f"{r['roi']:<5}{r['model']:<13}{r['parameter']:<7}{r['true']:>10.4g}{'not fitted':>11}")
            continue
        low = "open" if r["ci_open"] in ("low", "both") or r["ci_low"] is None else f"{r['ci_low']:.4g}"
        high = "open" if r["ci_open"] in ("high", "both") or r["ci_high"] is None else f"{r['ci_high']:.4g}"
        lines.append(f"{r['roi']:<5}{r['model']:<13}{r['parameter']:<7}{r['true']:>10.4g}{r['estimate']:>11.4g}"
                     f"  [{low}, {high}]{'' if r['covered'] else '  (truth outside)'}")
    return "\n".join(lines) + "\n"
