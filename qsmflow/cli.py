"""qsmflow command line (BIDS-App convention).

    qsmflow BIDS_DIR OUTPUT_DIR participant [options]
    qsmflow demo OUTPUT_DIR [options]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__

LOGGER = logging.getLogger("qsmflow")


class UsageError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE|PRESET", help="YAML file or preset name (default: default)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override a configuration key, e.g. --set inversion.method=tv")
    parser.add_argument("--work-dir", type=Path, help="nipype cache; rerunning with the same one resumes (default: OUTPUT_DIR/.work)")
    parser.add_argument("--nprocs", type=int, help="parallel processes for MultiProc (default: all cores)")
    parser.add_argument("--plugin", help="nipype plugin: MultiProc (default), Linear, SLURM, SLURMGraph, SGE, PBS")
    parser.add_argument("--plugin-args", type=Path, metavar="FILE",
                        help="YAML file of plugin arguments (e.g. sbatch_args), merged into execution.plugin_args")
    parser.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsmflow",
        description="Quantitative susceptibility mapping from a BIDS dataset of multi-echo GRE scans.",
        epilog="Also: 'qsmflow demo OUTPUT_DIR' runs the pipeline on a simulated cohort.",
    )
    parser.add_argument("--version", action="version", version=f"qsmflow {__version__}")
    parser.add_argument("bids_dir", type=Path, help="root of the BIDS dataset (never written to)")
    parser.add_argument("output_dir", type=Path, help="root of the BIDS derivatives dataset to write")
    parser.add_argument("analysis_level", choices=["participant"], help="processing level")
    parser.add_argument("--participant-label", nargs="+", default=[], metavar="LABEL",
                        help="subjects to process, with or without 'sub-' (default: all)")
    _common_options(parser)
    return parser


def build_demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsmflow demo", description="Simulate a small cohort and reconstruct it.")
    parser.add_argument("output_dir", type=Path, help="directory for the simulated dataset and the derivatives")
    parser.add_argument("--subjects", type=int, default=3, help="number of simulated subjects (default: 3)")
    _common_options(parser)
    return parser


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s qsmflow %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    for chatty in ("bids", "bidsschematools"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if debug else logging.WARNING)


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
        import yaml

        if not args.plugin_args.is_file():
            raise UsageError(f"{args.plugin_args}: plugin arguments file not found")
        extra = yaml.safe_load(args.plugin_args.read_text()) or {}
        if not isinstance(extra, dict):
            raise UsageError(f"{args.plugin_args}: expected a mapping of plugin arguments")
        config["execution"]["plugin_args"] = {**config["execution"]["plugin_args"], **extra}
    return config


def run_participant(bids_dir: Path, output_dir: Path, *, participant_labels=(), config: dict, work_dir: Path | None = None, debug: bool = False) -> int:
    """Reconstruct the selected participants; return the process exit code."""
    from .bids import check_output_dir, collect_scans, write_dataset_description
    from .execution import format_failures, plugin_settings, run_workflow
    from .workflows.base import init_participant_wf

    bids_dir, output_dir = Path(bids_dir).absolute(), Path(output_dir).absolute()
    check_output_dir(bids_dir, output_dir)
    scans, invalid = collect_scans(bids_dir, participant_labels, field_strength=config["input"]["field_strength"])
    for scan_name, reason in invalid:
        LOGGER.error("skipping %s: %s", scan_name, reason)
    if not scans:
        raise UsageError(invalid[0][1] if len(invalid) == 1 else f"{bids_dir}: none of the {len(invalid)} scans can be processed")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(output_dir, bids_dir)
    work_dir = Path(work_dir or output_dir / ".work").absolute()
    LOGGER.info("%d scan(s) of %d participant(s); preset %s; work directory %s",
                len(scans), len({s.subject for s in scans}), config["preset"], work_dir)
    workflow = init_participant_wf(scans, config, output_dir)
    plugin, plugin_args = plugin_settings(config)
    failures = run_workflow(workflow, work_dir, plugin=plugin, plugin_args=plugin_args, debug=debug)
    names = {f"{s.node_name}_{s.suffix}": f"{s.name}_{s.suffix}" for s in scans}
    for failure in failures:
        failure.scan = names.get(failure.scan, failure.scan)
    failed_scans = {f.scan for f in failures}
    done = len(scans) - len(failed_scans)
    if failures or invalid:
        lines = [f"{done} of {len(scans) + len(invalid)} scan(s) finished; {len(failed_scans) + len(invalid)} failed:"]
        if failures:
            lines.append(format_failures(failures))
        lines += [f"{name}: not started: {reason}" for name, reason in invalid]
        print("\n".join(lines), file=sys.stderr)
        return 1
    LOGGER.info("all %d scan(s) finished; derivatives in %s", len(scans), output_dir)
    return 0


def run_demo(output_dir: Path, *, subjects: int, config: dict, work_dir: Path | None = None, debug: bool = False) -> int:
    """Simulate a cohort in ``output_dir/bids``, reconstruct it, and score it against the truth."""
    from . import simulate
    from .reports import demo_accuracy_table

    output_dir = Path(output_dir).absolute()
    bids_dir = output_dir / "bids"
    derivatives = output_dir / "derivatives" / "qsmflow"
    if not (bids_dir / "dataset_description.json").exists():
        LOGGER.info("simulating %d subjects in %s", subjects, bids_dir)
        simulate.write_bids_dataset(bids_dir, simulate.default_demo_cohort(subjects))
    code = run_participant(bids_dir, derivatives, config=config, work_dir=work_dir or output_dir / "work", debug=debug)
    table = demo_accuracy_table(bids_dir, derivatives)
    (output_dir / "demo_accuracy.tsv").write_text(table)
    print(table, end="")
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = bool(argv) and argv[0] == "demo"
    parser = build_demo_parser() if demo else build_parser()
    args = parser.parse_args(argv[1:] if demo else argv)
    _setup_logging(args.debug)
    try:
        config = _load_config(args)
        if demo:
            return run_demo(args.output_dir, subjects=args.subjects, config=config, work_dir=args.work_dir, debug=args.debug)
        return run_participant(args.bids_dir, args.output_dir, participant_labels=args.participant_label,
                               config=config, work_dir=args.work_dir, debug=args.debug)
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
