"""Progress of a workflow run, driven by nipype's status callback.

On a terminal, :class:`RunProgress` draws one progress bar: nodes done of the total, the
subjects done, failed and running (with each running subject's nodes done of its total),
elapsed time and an estimate of the time left. Anywhere else (a log file, a cluster job's
output) it writes one plain log line per finished or failed node, with the counts.

nipype calls the callback with ``(node, status)``, status being ``'start'``, ``'end'`` or
``'exception'``. Plugins differ in what they report: MultiProc reports nodes reused from the
cache, and nodes run in the main process, with ``'end'`` only; a node that crashes inside
the main process is reported as ``'exception'`` and then ``'end'``; nodes downstream of a
crash are never reported. So the total is counted from the workflow's graph before the run,
every node is counted once, on its first ``'end'`` or ``'exception'``, and a node that failed
stays failed.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field

LOGGER = logging.getLogger("qsmflow")

#: Progress display modes: ``auto`` draws a bar when the stream is a terminal, else log lines.
MODES = ("auto", "bar", "log", "off")


@dataclass
class _Group:
    """Counts of one subject's (or scan's) nodes."""

    total: int = 0
    done: int = 0
    failed: int = 0
    started: int = 0

    @property
    def finished(self) -> bool:
        return self.done == self.total

    @property
    def active(self) -> bool:
        return not self.failed and bool(self.started or self.done) and not self.finished


@dataclass
class _Counts:
    done: set = field(default_factory=set)
    failed: set = field(default_factory=set)
    started: dict = field(default_factory=dict)


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class RunProgress:
    """nipype status callback that reports nodes done of the total, per subject (or per unit).

    Parameters
    ----------
    units : list of qsmflow.workunits.WorkUnit
        The run's units of work with their nodes (dotted names relative to the top workflow).
        Nodes are grouped by the unit's subject (``sub-01``) or, for units of the whole cohort
        (a group fit, a template), by the unit itself.
    top_name : str
        Name of the top workflow, which nipype puts in front of the names it reports.
    mode : {'auto', 'bar', 'log', 'off'}
        ``auto`` draws a bar when ``stream`` is a terminal and writes log lines otherwise.
    stream : file, optional
        Where the bar goes (default: standard error). Log lines go through the ``qsmflow`` logger.
    """

    def __init__(self, units, *, top_name: str, mode: str = "auto", stream=None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if _is_terminal(self.stream) else "log"
        self.mode = mode
        self.top_prefix = top_name + "."
        self.nodes = {name: (unit.owner, unit.name) for unit in units for name in unit.nodes}
        self.noun = "subjects" if all(unit.subject for unit in units) else "units"
        self.total = len(self.nodes)
        self.subjects: dict[str, _Group] = {}
        for subject, _scan in self.nodes.values():
            self.subjects.setdefault(subject, _Group()).total += 1
        self.counts = _Counts()
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            columns = _terminal_columns(self.stream)
            self._bar = tqdm(
                total=self.total, file=self.stream, desc="qsmflow", unit="node", dynamic_ncols=columns > 0,
                ncols=None if columns > 0 else 120, smoothing=0.1, mininterval=0.2,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} nodes [{elapsed}<{remaining}]{postfix}",
            )
            self._refresh_postfix()

    # -- nipype callback --------------------------------------------------------------------
    def __call__(self, node, status) -> None:
        name = getattr(node, "fullname", None) or str(node)
        if name.startswith(self.top_prefix):
            name = name[len(self.top_prefix):]
        with self._lock:
            if name not in self.nodes:
                return  # e.g. a MapNode's sub-nodes: the MapNode itself is counted
            if status == "start":
                self._start(name)
            elif status == "end":
                self._finish(name, failed=False)
            elif status == "exception":
                self._finish(name, failed=True)

    def _start(self, name: str) -> None:
        if name in self.counts.started or name in self.counts.done or name in self.counts.failed:
            return
        self.counts.started[name] = time.monotonic()
        self.subjects[self.nodes[name][0]].started += 1
        if self._bar is not None:
            self._refresh_postfix()
            self._bar.refresh()

    def _finish(self, name: str, *, failed: bool) -> None:
        if name in self.counts.failed or (name in self.counts.done and not failed):
            return
        subject, scan = self.nodes[name]
        group = self.subjects[subject]
        if name in self.counts.done:  # reported 'end' before 'exception': it failed after all
            self.counts.done.discard(name)
            group.done -= 1
            self._advance(-1)
        (self.counts.failed if failed else self.counts.done).add(name)
        if failed:
            group.failed += 1
        else:
            group.done += 1
        self._advance(1)
        started = self.counts.started.get(name)
        seconds = None if started is None else time.monotonic() - started
        self._report(name, subject, scan, group, failed=failed, seconds=seconds)

    # -- display ----------------------------------------------------------------------------
    def _advance(self, step: int) -> None:
        if self._bar is not None:
            self._refresh_postfix()
            self._bar.update(step)

    def _report(self, name, subject, scan, group: _Group, *, failed: bool, seconds) -> None:
        node = name.rsplit(".", 1)[-1]
        finished = len(self.counts.done) + len(self.counts.failed)
        if self._bar is not None:
            if failed:
                self._bar.write(f"qsmflow: {scan}: step {node} FAILED (reason in the summary at the end)", file=self.stream)
            elif group.finished:
                self._bar.write(f"qsmflow: {subject} done "
                                f"({self.subjects_finished()} of {len(self.subjects)} {self.noun})", file=self.stream)
            return
        if self.mode != "log":
            return
        width = len(str(self.total))
        counts = f"[{finished:>{width}}/{self.total} nodes]"
        subject_label = subject
        if failed:
            LOGGER.error("%s %s: %s FAILED (%s: %d/%d done, %d failed)", counts, scan, node, subject_label,
                         group.done, group.total, group.failed)
        else:
            timing = f" in {seconds:.1f} s" if seconds is not None else ""
            LOGGER.info("%s %s: %s done%s (%s: %d/%d)", counts, scan, node, timing, subject_label, group.done, group.total)
            if group.finished:
                LOGGER.info("%s %s: all %d nodes done (%d of %d %s done)", counts, subject_label, group.total,
                            self.subjects_finished(), len(self.subjects), self.noun)

    def _refresh_postfix(self) -> None:
        running = [(s, g) for s, g in self.subjects.items() if g.active]
        failed = sum(1 for g in self.subjects.values() if g.failed)
        text = f"{self.noun} {self.subjects_finished()}/{len(self.subjects)} done"
        if failed:
            text += f", {failed} failed"
        if running:
            shown = ", ".join(f"{label} {g.done}/{g.total}" for label, g in running[:3])
            more = f" +{len(running) - 3}" if len(running) > 3 else ""
            text += f"; running {shown}{more}"
        self._bar.set_postfix_str(text, refresh=False)

    # -- queries and end ----------------------------------------------------------------------
    def subjects_finished(self) -> int:
        return sum(1 for g in self.subjects.values() if g.finished)

    @property
    def done(self) -> int:
        return len(self.counts.done)

    @property
    def failed(self) -> int:
        return len(self.counts.failed)

    @property
    def not_run(self) -> int:
        """Nodes never reported: downstream of a failure (or the run was stopped)."""
        return self.total - self.done - self.failed

    def summary(self) -> str:
        """One line: nodes done, failed and not run; subjects complete; elapsed time."""
        parts = [f"{self.done} of {self.total} nodes done"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.not_run:
            parts.append(f"{self.not_run} not run")
        return (f"{', '.join(parts)}; {self.subjects_finished()} of {len(self.subjects)} {self.noun} complete; "
                f"elapsed {_format_seconds(time.monotonic() - self.started_at)}")

    def close(self) -> None:
        """Stop the bar (leaving it on screen) and log the summary line."""
        if self._bar is not None:
            self._refresh_postfix()
            self._bar.refresh()
            self._bar.close()
            self._bar = None
        if self.mode != "off":
            LOGGER.info("%s", self.summary())


def _terminal_columns(stream) -> int:
    """Width of the terminal behind ``stream``; 0 when unknown (e.g. a pseudo-terminal of size 0)."""
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class BarAwareHandler(logging.StreamHandler):
    """A stream handler that prints above an active tqdm bar instead of through it."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            message = self.format(record)
            if getattr(tqdm, "_instances", None):
                tqdm.write(message, file=self.stream)
            else:
                self.stream.write(message + self.terminator)
                self.flush()
        except Exception:  # logging must never raise
            self.handleError(record)
