"""qsmflow command line (BIDS-App convention).

    qsmflow BIDS_DIR OUTPUT_DIR participant [options]
    qsmflow demo OUTPUT_DIR [options]
    qsmflow status WORK_DIR OUTPUT_DIR
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
import time
from pathlib import Path

from . import __version__

LOGGER = logging.getLogger("qsmflow")


class UsageError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


def _config_options(parser: argparse.ArgumentParser) -> None:
    from .config import preset_names

    parser.add_argument("--config", metavar="FILE|PRESET",
                        help=f"YAML file or preset: {', '.join(preset_names())} (default: default); "
                             "'qsmflow config PRESET' prints one")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override a configuration key, e.g. --set inversion.method=tv --set inversion.tv.regularization=2e-4")


def _common_options(parser: argparse.ArgumentParser, work_dir_default: str = "OUTPUT_DIR/.work") -> None:
    _config_options(parser)
    parser.add_argument("--work-dir", type=Path,
                        help=f"nipype cache; rerunning with the same one resumes (default: {work_dir_default})")
    parser.add_argument("--nprocs", type=int, help="parallel processes for MultiProc (default: the CPUs this process may use)")
    parser.add_argument("--plugin", help="MultiProc (default), Linear, SLURMArray (one SLURM array task per participant), or one job per node: SLURM, SLURMGraph, SGE, PBS")
    parser.add_argument("--plugin-args", type=Path, metavar="FILE",
                        help="YAML file of plugin arguments (e.g. sbatch_args), merged into execution.plugin_args")
    parser.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                        help="progress display: a bar on a terminal, log lines otherwise (default: auto)")
    parser.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsmflow",
        description="Quantitative susceptibility mapping from a BIDS dataset of multi-echo GRE scans.",
        epilog="Also: 'qsmflow demo OUTPUT_DIR' runs the pipeline on a simulated cohort; "
           "'qsmflow status WORK_DIR OUTPUT_DIR' tells where a cohort run stands; "
           "'qsmflow config [PRESET|FILE] [--set KEY=VALUE ...]' prints the effective configuration.",
    )
    parser.add_argument("--version", action="version", version=f"qsmflow {__version__}")
    parser.add_argument("bids_dir", type=Path, help="root of the BIDS dataset (never written to)")
    parser.add_argument("output_dir", type=Path, help="root of the BIDS derivatives dataset to write")
    from .levels import LEVELS

    parser.add_argument("analysis_level", choices=list(LEVELS),
                        help="processing level: participant (per scan), then group / atlas (across participants)")
    parser.add_argument("--participant-label", nargs="+", default=[], metavar="LABEL",
                        help="subjects to process, with or without 'sub-' (default: all)")
    _common_options(parser)
    return parser


def build_demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsmflow demo", description="Simulate a small cohort and reconstruct it.",
        epilog="Writes OUTPUT_DIR/bids (the simulated BIDS dataset with its ground truth in bids/derivatives/), "
               "OUTPUT_DIR/derivatives/qsmflow (the reconstruction), OUTPUT_DIR/work (the cache) and "
               "OUTPUT_DIR/demo_accuracy.tsv (ROI means against the truth); about 60 MB per simulated scan (0.9 GB for the default cohort).")
    parser.add_argument("output_dir", type=Path, help="directory for the simulated dataset and the derivatives")
    parser.add_argument("--subjects", type=int, default=12,
                        help="number of simulated subjects, ages 1-80, three of them scanned twice (default: 12)")
    _common_options(parser, work_dir_default="OUTPUT_DIR/work")
    return parser


def build_config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsmflow config",
        description="Print the effective configuration (a preset or file merged with the defaults and --set, "
                    "validated) as YAML; a file of it can be given to --config.")
    parser.add_argument("config", nargs="?", metavar="PRESET|FILE", help="preset name or YAML file (default: default)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override a configuration key, e.g. --set inversion.tv.regularization=2e-4")
    return parser


def main_config(argv) -> int:
    """``qsmflow config``: print the merged, validated configuration; exit 2 naming a bad key."""
    from .config import ConfigError, config_yaml, load_config

    args = build_config_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"qsmflow: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(config_yaml(config))
    return 0


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsmflow status",
                                     description="Report which units of work (scans, fits, templates) of a run are done, "
                                                 "failed (and why), running or pending.")
    parser.add_argument("work_dir", type=Path, help="the run's --work-dir (default of a run: OUTPUT_DIR/.work)")
    parser.add_argument("output_dir", type=Path, nargs="?",
                        help="the derivatives dataset (optional: the run recorded where it writes)")
    return parser


def _setup_logging(debug: bool) -> None:
    """qsmflow's own messages on standard error; nipype's only with --debug (else in a log file
    of the work directory, see :class:`_NipypeLogFile`), since failures are summarised."""
    from .progress import BarAwareHandler

    logger = logging.getLogger("qsmflow")
    for handler in [h for h in logger.handlers if getattr(h, "_qsmflow", False)]:
        logger.removeHandler(handler)
    handler = BarAwareHandler(sys.stderr)
    handler._qsmflow = True
    handler.setFormatter(logging.Formatter("%(asctime)s qsmflow %(levelname)s: %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    for chatty in ("bids", "bidsschematools"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if debug else logging.WARNING)
    # nipype adds its own stdout handler on import unless "nipype" has one already.
    nipype_logger = logging.getLogger("nipype")
    nipype_logger.propagate = False
    if debug:
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in nipype_logger.handlers):
            nipype_logger.addHandler(logging.StreamHandler(sys.stderr))
    else:
        for handler in list(nipype_logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                nipype_logger.removeHandler(handler)
        if not any(isinstance(h, logging.NullHandler) for h in nipype_logger.handlers):
            nipype_logger.addHandler(logging.NullHandler())


class _NipypeLogFile:
    """Context: copy nipype's log records of one run to ``WORK_DIR/logs/nipype-<time>.log``."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / "logs" / f"nipype-{time.strftime('%Y%m%d-%H%M%S')}.log"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logging.getLogger("nipype").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("nipype").removeHandler(self.handler)
        self.handler.close()
        return False


def _load_config(args):
    from .config import load_config

    overrides = list(args.overrides)
    if args.nprocs is not None:
        if args.nprocs < 1:
            raise UsageError(f"--nprocs {args.nprocs}: must be at least 1")
        overrides.append(f"execution.nprocs={args.nprocs}")
    if args.plugin:
        overrides.append(f"execution.plugin={args.plugin}")
    config = load_config(args.config, overrides)
    if args.plugin_args:
        from .config import load_yaml

        if not args.plugin_args.is_file():
            raise UsageError(f"{args.plugin_args}: plugin arguments file not found")
        extra = load_yaml(args.plugin_args.read_text()) or {}
        if not isinstance(extra, dict):
            raise UsageError(f"{args.plugin_args}: expected a mapping of plugin arguments")
        config["execution"]["plugin_args"] = {**config["execution"]["plugin_args"], **extra}
    return config


_FORK_HOOK = {"installed": False, "forking_pid": None}


def _children_die_with_their_parent() -> None:
    """Make every process forked from now on (MultiProc's workers) die when the process that
    forked it dies, e.g. of ``kill -9``: otherwise the workers finish their node as orphans,
    wait forever for more, and may write into the cache while a rerun recomputes the same
    node. Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere nothing changes."""
    if _FORK_HOOK["installed"] or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG in <linux/prctl.h>

    def remember_parent():
        _FORK_HOOK["forking_pid"] = os.getpid()

    def in_child():
        prctl(set_parent_death_signal, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != _FORK_HOOK["forking_pid"]:  # the parent died before prctl took effect
            os._exit(1)

    os.register_at_fork(before=remember_parent, after_in_child=in_child)
    _FORK_HOOK["installed"] = True


def _remove_stale_temporaries(output_dir: Path, units) -> int:
    """Delete temporary files that an interrupted writer of these units left behind.

    Derivatives are written as ``.<final name>.<random>.tmp`` and renamed; a kill between the
    two leaves the temporary file (never a partial file under the final name). The folders
    searched are those of the units' outputs and, for a subject's or session's datatype
    folder (``anat/``), its sibling datatype folders (``fmap/``): only this run writes there.
    """
    directories = set()
    for unit in units:
        for output in unit.outputs:
            folder = (output_dir / output).parent
            directories.add(folder)
            if folder.parent.name.startswith(("sub-", "ses-")) and folder.parent.is_dir():
                directories.update(p for p in folder.parent.iterdir() if p.is_dir() and not p.name.startswith(("sub-", "ses-")))
    removed = 0
    pattern = re.compile(r"^\..+\.tmp$")
    for directory in sorted(directories):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if pattern.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _one_line(failure) -> str:
    """A failure's reason as one line, without the type for qsmflow's own ValueErrors."""
    reason = failure.reason
    if reason.startswith("ValueError: ") or reason.startswith("InputError: "):
        reason = reason.split(": ", 1)[1]
    return reason


def run_participant(bids_dir: Path, output_dir: Path, *, participant_labels=(), config: dict, work_dir: Path | None = None,
                    debug: bool = False, progress: str = "auto") -> int:
    """Reconstruct the selected participants; return the process exit code (see :func:`run_level`)."""
    return run_level("participant", bids_dir, output_dir, participant_labels=participant_labels, config=config,
                     work_dir=work_dir, debug=debug, progress=progress)


def run_level(level: str, bids_dir: Path, output_dir: Path, *, participant_labels=(), config: dict,
              work_dir: Path | None = None, debug: bool = False, progress: str = "auto") -> int:
    """Run one analysis level (:data:`qsmflow.levels.LEVELS`); return the process exit code.

    Units of work whose inputs fail the checks are reported and skipped; the others run. The
    run ends with a table of what failed (subject, unit, step, reason, crash file) and, as the
    last line, one line naming the first problem; the exit code is then 1.
    """
    from .bids import check_dataset, check_output_dir, check_writable_dir, write_dataset_description
    from .execution import Failure, format_failures, plugin_settings, run_workflow
    from .levels import level_builder
    from .progress import RunProgress
    from .resources import available_cpus
    from .status import end_run_record, record_units, start_run_record

    bids_dir, output_dir = Path(bids_dir).absolute(), Path(output_dir).absolute()
    plugin, plugin_args = plugin_settings(config)
    check_dataset(bids_dir)
    check_output_dir(bids_dir, output_dir)
    plan = level_builder(level)(bids_dir, output_dir, config, participant_labels)
    noun = plan.noun
    for problem in plan.problems:
        LOGGER.error("skipping %s: %s", problem.unit, problem.reason)
    refused = [Failure(subject=p.subject or "-", unit=p.unit, node="(input check)", reason=p.reason, crash_file="-")
               for p in plan.problems]
    if plan.workflow is None:
        if not refused:
            raise UsageError(f"{bids_dir}: nothing to do at the {level} level")
        if len(refused) > 1:
            print(format_failures(refused, noun), file=sys.stderr)
            raise UsageError(f"none of the {len(refused)} {noun}s can be processed (table above); first: {refused[0].reason}")
        raise UsageError(refused[0].reason)
    plan.collect()
    work_dir = Path(work_dir or output_dir / ".work").absolute()
    check_writable_dir(work_dir, "work directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_dataset_description(output_dir, bids_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{error.filename or output_dir}: cannot write ({error.strerror or error})") from None
    counted = plan.counted
    participants = len({u.subject for u in plan.units if u.subject})
    LOGGER.info("%d %s(s)%s; preset %s; work directory %s", len(counted), noun,
                f" of {participants} participant(s)" if participants else "", config["preset"], work_dir)
    removed = _remove_stale_temporaries(output_dir, plan.units)
    if removed:
        LOGGER.info("removed %d temporary file(s) left by an interrupted run", removed)

    workflow = plan.workflow
    record_units(work_dir, output_dir, workflow.name, plan.units, plan.problems, level=level)

    restore_environment = []
    if plugin == "MultiProc":
        # nipype polls its workers every 2 s by default, which dominates short nodes. A
        # scheduler plugin polls squeue/qstat instead, so it keeps nipype's default.
        plugin_args.setdefault("poll_sleep_duration", 0.1)
        workflow.config["execution"]["poll_sleep_duration"] = plugin_args["poll_sleep_duration"]
        _children_die_with_their_parent()
        # Nodes declare one process each but scipy.fft would use every core in each of them;
        # with N nodes at once, give each node its share of the cores (unless set by the user).
        if plugin_args.get("n_procs", 1) > 1 and "QSMFLOW_FFT_WORKERS" not in os.environ:
            fft_threads = str(max(1, available_cpus() // int(plugin_args["n_procs"])))
            os.environ["QSMFLOW_FFT_WORKERS"] = fft_threads
            restore_environment.append("QSMFLOW_FFT_WORKERS")
    if plugin.endswith("Graph") and progress != "off":
        LOGGER.info("%s submits the whole graph at once and reports no progress; use 'qsmflow status %s %s'",
                    plugin, work_dir, output_dir)
        progress = "off"
    tracker = RunProgress(plan.units, top_name=workflow.name, mode=progress)
    run_record = start_run_record(work_dir, ["qsmflow"] + sys.argv[1:])
    exit_code = 130
    try:
        with _NipypeLogFile(work_dir) as nipype_log:
            # MultiProc calls gc.collect() before every submission; with pybids and nipype
            # loaded a full collection takes ~0.15 s. Objects alive now (modules, the graph)
            # are left out of collections during the run, which then take milliseconds.
            gc.freeze()
            try:
                failures = run_workflow(workflow, work_dir, plugin=plugin, plugin_args=plugin_args, debug=debug,
                                        status_callback=None if progress == "off" else tracker, units=plan.units)
            finally:
                gc.unfreeze()
                tracker.close()
        failures = sorted(failures, key=lambda f: (f.unit, f.node)) + refused
        failed_units = {f.unit for f in failures}
        total = len(counted) + len(refused)
        done = total - len({u.name for u in counted if u.name in failed_units} | {f.unit for f in refused})
        if failures and plan.after_failures is not None:
            try:
                for path in plan.after_failures(failures) or ():
                    LOGGER.info("wrote %s from the units that finished", path)
            except Exception as error:  # the run's own failures below matter more; say this one too
                LOGGER.error("could not write the outputs of the units that finished: %s", error)
        if failures:
            lines = [f"{done} of {total} {noun}(s) finished; {total - done} failed "
                     f"(tracebacks in the crash files; nipype's log: {nipype_log.path}):",
                     format_failures(failures, noun)]
            first = failures[0]
            if len(failures) == 1:
                lines.append(f"qsmflow: error: {_one_line(first)} ({noun} {first.unit}, step {first.node})")
            else:
                lines.append(f"qsmflow: error: {len(failed_units)} of {total} {noun}s failed (table above); "
                             f"first: {_one_line(first)} ({noun} {first.unit}, step {first.node})")
            print("\n".join(lines), file=sys.stderr)
            exit_code = 1
        else:
            LOGGER.info("all %d %s(s) finished; derivatives in %s", len(counted), noun, output_dir)
            exit_code = 0
        return exit_code
    except Exception:
        exit_code = 1
        raise
    finally:
        end_run_record(run_record, exit_code)
        for name in restore_environment:
            os.environ.pop(name, None)


#: The demo's acquisition grid: heads made from the MNI template at 3 mm
#: (:func:`qsmflow.simulate.template_acquisition`), so that a lifespan cohort goes through the
#: participant and group levels in minutes on a laptop.
DEMO_GRID = {"shape": (60, 72, 60), "voxel_size": (3.0, 3.0, 3.0)}


def run_demo(output_dir: Path, *, subjects: int, config: dict, work_dir: Path | None = None, debug: bool = False,
             progress: str = "auto") -> int:
    """Simulate a cohort in ``output_dir/bids``, reconstruct it, and score it against the truth."""
    from . import simulate
    from .reports.accuracy import demo_accuracy_table

    output_dir = Path(output_dir).absolute()
    bids_dir = output_dir / "bids"
    derivatives = output_dir / "derivatives" / "qsmflow"
    if not (bids_dir / "dataset_description.json").exists():
        LOGGER.info("simulating %d subjects made from the MNI template in %s (%s voxels of %g mm)", subjects, bids_dir,
                    "x".join(map(str, DEMO_GRID["shape"])), DEMO_GRID["voxel_size"][0])
        simulate.write_bids_dataset(bids_dir, simulate.lifespan_demo_cohort(subjects), anatomy="template", **DEMO_GRID)
    if not config["segmentation"]["enabled"]:  # the group level needs every scan's ROI table
        LOGGER.info("demo: segmentation enabled (ROI tables for the group level)")
        config = {**config, "segmentation": {**config["segmentation"], "enabled": True}}
    if config["segmentation"]["registration"]["preset"] == "default":
        # the default SyN schedule takes minutes per scan on 2 cores; the demo is meant to finish in minutes
        LOGGER.info("demo: registration with the fast preset (segmentation.registration.preset=fast)")
        segmentation = config["segmentation"]
        config = {**config, "segmentation": {**segmentation, "registration": {**segmentation["registration"], "preset": "fast"}}}
    code = run_participant(bids_dir, derivatives, config=config, work_dir=work_dir or output_dir / "work", debug=debug,
                           progress=progress)
    table = demo_accuracy_table(bids_dir, derivatives)
    (output_dir / "demo_accuracy.tsv").write_text(table)
    print(table, end="")
    pages = sorted(derivatives.glob("sub-*.html"))
    if pages:
        print(f"participant reports: {len(pages)} ({pages[0]} ...)")
    return _demo_group(bids_dir, derivatives, output_dir, code, config=config, work_dir=work_dir or output_dir / "work",
                       debug=debug, progress=progress)


def _demo_group(bids_dir: Path, derivatives: Path, output_dir: Path, code: int, **options) -> int:
    """The demo's group level: lifespan trajectories against the simulation's truth."""
    from . import simulate
    from .group import find_roistats
    from .reports.group import recovered_parameters, recovered_parameters_text

    if not find_roistats(derivatives):
        LOGGER.warning("group level not run: the participant level wrote no _roistats.tsv")
        return code
    group_code = run_level("group", bids_dir, derivatives, **options)
    trajectories = derivatives / "group" / "trajectories.tsv"
    if trajectories.is_file():
        text = recovered_parameters_text(recovered_parameters(trajectories, simulate.TRUE_TRAJECTORIES))
        (output_dir / "demo_trajectories.txt").write_text(text)
        print(text, end="")
    report = derivatives / "group" / "index.html"
    if report.is_file():
        print(f"group report: {report}")
    return code or group_code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "config":
        return main_config(argv[1:])
    command = argv[0] if argv and argv[0] in ("demo", "status") else None
    if command == "status":
        from .status import main_status

        args = build_status_parser().parse_args(argv[1:])
        return main_status(args.work_dir, args.output_dir)
    demo = command == "demo"
    parser = build_demo_parser() if demo else build_parser()
    args = parser.parse_args(argv[1:] if demo else argv)
    _setup_logging(args.debug)
    try:
        config = _load_config(args)
        if demo:
            return run_demo(args.output_dir, subjects=args.subjects, config=config, work_dir=args.work_dir, debug=args.debug,
                            progress=args.progress)
        if args.analysis_level == "participant" and config["execution"]["plugin"] == "SLURMArray":
            from .slurm_array import run_array  # one SLURM array task per participant, then the group job

            return run_array(args.bids_dir, args.output_dir, config=config, work_dir=args.work_dir,
                             participant_labels=args.participant_label)
        return run_level(args.analysis_level, args.bids_dir, args.output_dir, participant_labels=args.participant_label,
                         config=config, work_dir=args.work_dir, debug=args.debug, progress=args.progress)
    except KeyboardInterrupt:
        print("qsmflow: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:
        from .bids import InputError
        from .config import ConfigError

        if args.debug:
            raise
        if isinstance(error, (InputError, ConfigError, UsageError)):
            print(f"qsmflow: error: {error}", file=sys.stderr)
            return 2 if isinstance(error, ConfigError) else 1
        print(f"qsmflow: error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
