"""A small builder for self-contained HTML report pages (participant, group and atlas reports).

A page is a title, a list of sections and a provenance footer. Sections hold paragraphs,
notes, key facts, figures and tables, and may nest. Everything is escaped; nothing is loaded
from the network (the CSS is inline, there is no JavaScript and no web font), so a page opens
offline, from a laptop copy of the derivatives or an archive. Figures are referenced by a path
relative to the page, so the page and its figures move together. Rendering is deterministic
(no timestamps): the same content gives the same bytes.

Example
-------
>>> page = ReportPage("sub-01", path=output_dir / "sub-01.html")
>>> section = page.section("sub-01_MEGRE")
>>> section.facts({"Field strength": "3 T", "Echo times": "4, 12, 20 ms"})
>>> section.figure(output_dir / "sub-01/figures/sub-01_desc-masks_MEGRE.png", "Brain mask (red) on the magnitude")
>>> section.table_from_tsv(output_dir / "sub-01/anat/sub-01_roistats.tsv", caption="ROI statistics")
>>> section.note("Segmentation was not run.")
>>> page.provenance(version=qsmflow.__version__, config=config)
>>> page.write()                     # atomic; returns the path

:meth:`ReportPage.write` refuses a page that references a figure which does not exist.
"""
from __future__ import annotations

import csv
import html
import math
import os
import re
from pathlib import Path

from ..bids import atomic_write_bytes

_STYLE = """
:root { --ink: #1d2330; --muted: #5b6473; --rule: #d8dce3; --accent: #1f5fa8; --note: #fff6d6; --note-rule: #e0b400; }
* { box-sizing: border-box; }
body { margin: 0; font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #ffffff; line-height: 1.45; font-size: 15px; }
header.page { background: #22304a; color: #ffffff; padding: 18px 32px; }
header.page h1 { margin: 0; font-size: 26px; font-weight: 600; }
header.page p { margin: 4px 0 0; color: #c9d3e4; }
nav.toc { padding: 10px 32px; border-bottom: 1px solid var(--rule); background: #f5f7fa; font-size: 14px; }
nav.toc a { margin-right: 18px; color: var(--accent); text-decoration: none; }
main { padding: 8px 32px 24px; max-width: 1400px; }
section { margin: 18px 0 28px; }
section > h2 { font-size: 21px; border-bottom: 2px solid var(--accent); padding-bottom: 4px; margin: 20px 0 10px; }
section section > h3 { font-size: 17px; margin: 18px 0 8px; color: #22304a; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { color: var(--muted); font-size: 14px; margin-top: 4px; max-width: 1200px; }
p { max-width: 1100px; }
.note { background: var(--note); border-left: 4px solid var(--note-rule); padding: 8px 12px; max-width: 1100px; }
.note.info { background: #eaf2fb; border-left-color: var(--accent); }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 3px 18px; margin: 8px 0 14px; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
table { border-collapse: collapse; margin: 8px 0 6px; font-size: 14px; }
caption { text-align: left; color: var(--muted); padding-bottom: 4px; caption-side: top; }
th, td { border-bottom: 1px solid var(--rule); padding: 3px 10px; text-align: left; }
th { background: #eef1f5; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
details > summary { cursor: pointer; color: var(--accent); margin: 4px 0; }
footer { border-top: 1px solid var(--rule); margin-top: 24px; padding: 12px 32px 30px; color: var(--muted); font-size: 13px; }
footer pre { background: #f5f7fa; padding: 8px; overflow-x: auto; font-size: 12px; color: var(--ink); }
"""

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def format_value(value, *, decimals: int = 4) -> str:
    """Text of a table cell: integers as integers, other numbers with ``decimals`` decimals.

    Integers are Python/numpy integers and strings of digits (as read from a TSV); floats and
    strings with a decimal point or exponent get ``decimals`` decimals, so a column keeps one
    format (``1125.0`` next to ``640.6``). Other strings (``n/a``, names) are kept; ``None`` and
    NaN become ``n/a``.
    """
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if not _NUMBER.match(text):
            return value
        if not any(mark in text for mark in ".eE"):
            return str(int(text))
        value = float(text)
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.{decimals}f}"


def read_tsv(path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a BIDS TSV file (tab separated, first row the column names)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.reader(stream, delimiter="\t"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read table ({error.strerror})") from None
    if not rows:
        raise ValueError(f"{path}: empty table (no header row)")
    header, body = rows[0], [row for row in rows[1:] if row]
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {number} has {len(row)} columns, the header {len(header)}")
    return header, body


def _anchor(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "section"


class Section:
    """Content of one section; build it with the methods below, in display order."""

    def __init__(self, page: "ReportPage", title: str, anchor: str, level: int):
        self.page, self.title, self.anchor, self.level = page, title, anchor, level
        self._parts: list = []

    def paragraph(self, text: str) -> "Section":
        """A paragraph of plain text (escaped)."""
        self._parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def note(self, text: str, *, kind: str = "warning") -> "Section":
        """A highlighted box: ``kind="warning"`` (yellow) for what is missing or doubtful,
        ``"info"`` (blue) for explanations."""
        if kind not in {"warning", "info"}:
            raise ValueError(f"note kind must be 'warning' or 'info', got {kind!r}")
        self._parts.append(f'<p class="note {kind}">{html.escape(text)}</p>')
        return self

    def facts(self, facts, *, collapsed: str | None = None) -> "Section":
        """Key facts as a two-column list; ``facts`` is a dict or (name, value) pairs.

        With ``collapsed`` (a summary line) the list is folded away until the reader opens it.
        """
        pairs = list(facts.items()) if isinstance(facts, dict) else list(facts)
        items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in pairs)
        listing = f'<dl class="facts">{items}</dl>'
        if collapsed:
            listing = f"<details><summary>{html.escape(collapsed)}</summary>{listing}</details>"
        self._parts.append(listing)
        return self

    def figure(self, path, caption: str, *, alt: str | None = None) -> "Section":
        """An image file (PNG/SVG) referenced by its path relative to the page."""
        path = Path(path)
        self.page.figures.append(path)
        source = Path(os.path.relpath(path.resolve(), self.page.path.parent.resolve())).as_posix()
        self._parts.append(
            f'<figure><img src="{html.escape(source)}" alt="{html.escape(alt or caption)}" loading="lazy">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        return self

    def table(self, rows, *, header=None, caption: str | None = None, decimals=4) -> "Section":
        """A table from lists of cells (with ``header``) or from dicts (header = their keys).

        Numbers are formatted by :func:`format_value` and right-aligned; ``decimals`` is one
        number for all columns or a dict column name -> decimals (others get 4).
        """
        rows = list(rows)
        if rows and isinstance(rows[0], dict):
            header = list(header or rows[0].keys())
            rows = [[row.get(column) for column in header] for row in rows]
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in header) if header else ""
        per_column = [decimals.get(c, 4) if isinstance(decimals, dict) else decimals for c in (header or [])]
        body = []
        for row in rows:
            cells = []
            for position, value in enumerate(row):
                text = format_value(value, decimals=per_column[position] if position < len(per_column) else 4)
                numeric = not isinstance(value, str) or bool(_NUMBER.match(value.strip()))
                cells.append(f'<td class="number">{html.escape(text)}</td>' if numeric and text != "n/a" else f"<td>{html.escape(text)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        caption_html = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        head_html = f"<thead><tr>{head}</tr></thead>" if head else ""
        self._parts.append(f"<table>{caption_html}{head_html}<tbody>{''.join(body)}</tbody></table>")
        return self

    def table_from_tsv(self, path, *, caption: str | None = None, columns=None, decimals=4) -> "Section":
        """A table read from a TSV file; ``columns`` selects and orders columns (missing ones are skipped)."""
        header, rows = read_tsv(path)
        if columns:
            keep = [header.index(c) for c in columns if c in header]
            header, rows = [header[i] for i in keep], [[row[i] for i in keep] for row in rows]
        return self.table(rows, header=header, caption=caption, decimals=decimals)

    def section(self, title: str, *, anchor: str | None = None) -> "Section":
        """A nested section (one heading level down)."""
        child = Section(self.page, title, anchor or f"{self.anchor}-{_anchor(title)}", self.level + 1)
        self._parts.append(child)
        return child

    def render(self) -> str:
        tag = f"h{min(self.level + 1, 6)}"
        inner = "".join(part.render() if isinstance(part, Section) else part for part in self._parts)
        return f'<section id="{html.escape(self.anchor)}"><{tag}>{html.escape(self.title)}</{tag}>{inner}</section>'


class ReportPage:
    """One HTML page written at ``path``.

    Parameters
    ----------
    title : str
        Page title (header and ``<title>``).
    path : path
        Where the page will be written; figure references are relative to its folder.
    subtitle : str, optional
        A line under the title.
    """

    def __init__(self, title: str, *, path, subtitle: str | None = None):
        self.title, self.subtitle, self.path = title, subtitle, Path(path)
        self.sections: list[Section] = []
        self.figures: list[Path] = []
        self._footer = ""

    def section(self, title: str, *, anchor: str | None = None) -> Section:
        """A top-level section; it appears in the page's table of contents."""
        section = Section(self, title, anchor or _anchor(title), 1)
        self.sections.append(section)
        return section

    def provenance(self, *, version: str, config: dict | None = None, extra: dict | None = None) -> "ReportPage":
        """The footer: qsmflow version, optional facts (``extra``) and the configuration as YAML."""
        import json

        import yaml

        lines = [f"<p>Generated by qsmflow {html.escape(str(version))}.</p>"]
        if extra:
            lines.append("<p>" + "; ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in extra.items()) + "</p>")
        if config is not None:
            # through JSON: plain dicts and lists (nipype hands over traited containers)
            plain = json.loads(json.dumps(config, default=str))
            text = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, allow_unicode=True)
            lines.append(f"<details><summary>Configuration used</summary><pre>{html.escape(text)}</pre></details>")
        self._footer = "".join(lines)
        return self

    def render(self) -> str:
        """The page as an HTML string."""
        toc = "".join(f'<a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a>' for s in self.sections)
        subtitle = f"<p>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>\n<body>"
            f'<header class="page"><h1>{html.escape(self.title)}</h1>{subtitle}</header>'
            + (f'<nav class="toc">{toc}</nav>' if len(self.sections) > 1 else "")
            + "<main>" + "\n".join(s.render() for s in self.sections) + "</main>"
            + f"<footer>{self._footer}</footer></body></html>\n"
        )

    def write(self) -> Path:
        """Write the page atomically; every referenced figure must exist."""
        missing = [str(p) for p in self.figures if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path}: the page references figures that do not exist: {', '.join(missing)}")
        atomic_write_bytes(self.path, self.render().encode("utf-8"))
        return self.path
