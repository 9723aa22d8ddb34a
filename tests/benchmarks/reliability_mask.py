"""Stability of the echo fit's reliability mask: does a perturbation far below the noise move it?

Run by hand (not part of the test-suite), with one or two threads:

    OMP_NUM_THREADS=1 python tests/benchmarks/reliability_mask.py [--datasets qf3,h5] [--presets default,accurate]
        [--min-cluster 1,10] [--outlier-factor 10,3]

Each preset's whole chain (:func:`algorithms.chain`, raw phase to Chimap) runs on a data set of
the evidence block and on the same data with its phase rounded to 1 mrad (what GE's integer
milliradians store). Printed: the Chimap NRMSE against the truth and the coverage of the
brain, and the rounded run's Chimap NRMSE against the unrounded one with the number of QSM-mask
voxels that moved. ``--min-cluster`` sets ``echoes.outlier_min_cluster`` (1 drops every outlier,
the rule before issue 8 was closed); ``--outlier-factor`` sets ``echoes.outlier_factor`` (the
preset's value if not given). Data sets: ``qf3``/``qf7`` qsm-forward 3/7 T, ``h5`` the
supersampled phantom straight, ``h6`` tilted 21 degrees, ``r0``, ``r1``, ... the random poses of
the evidence block (:func:`algorithms.evidence_poses`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import algorithms  # noqa: E402

from qsmflow import metrics  # noqa: E402
from qsmflow.config import load_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="qf3,qf7,h5,h6")
    parser.add_argument("--presets", default="fast,default,accurate")
    parser.add_argument("--min-cluster", default="1,10", help="values of echoes.outlier_min_cluster")
    parser.add_argument("--outlier-factor", default="", help="values of echoes.outlier_factor (default: the preset's)")
    parser.add_argument("--no-rounding", action="store_true", help="skip the run on the 1 mrad-rounded phase")
    args = parser.parse_args()
    factors = args.outlier_factor.split(",") if args.outlier_factor else [None]
    with tempfile.TemporaryDirectory() as workdir:
        makers = {"qf3": lambda: algorithms.qsm_forward_dataset(3.0, Path(workdir)),
                  "qf7": lambda: algorithms.qsm_forward_dataset(7.0, Path(workdir)),
                  "h5": lambda: algorithms.honest_dataset(5, 0.0), "h6": lambda: algorithms.honest_dataset(6, 21.0)}
        for index, pose in enumerate(algorithms.evidence_poses(8)):
            makers[f"r{index}"] = pose
        print(f"{'dataset':30s} {'preset':9s} {'factor':>6s} {'min_cluster':>11s} {'NRMSE%':>7} {'cover':>6} "
              f"{'rounded: NRMSE%':>16} {'voxels moved':>12}")
        for key in args.datasets.split(","):
            data = makers[key]()
            rounded = dict(data, phase=(np.round(data["phase"] * 1000) / 1000).astype(np.float32))
            for preset in args.presets.split(","):
                for factor in factors:
                    for size in args.min_cluster.split(","):
                        overrides = [f"echoes.outlier_min_cluster={size}"]
                        if factor is not None:
                            overrides.append(f"echoes.outlier_factor={factor}")
                        config = load_config(preset, overrides=overrides)
                        chi, mask = algorithms.chain(data, config)
                        evaluated = mask & data["mask"]
                        cells = f"{'':>16} {'':>12}"
                        if not args.no_rounding:
                            chi_rounded, mask_rounded = algorithms.chain(rounded, config)
                            inside = chi != 0
                            moved = 100 * np.linalg.norm(chi_rounded[inside] - chi[inside]) / np.linalg.norm(chi[inside])
                            cells = f"{moved:16.2f} {int((mask ^ mask_rounded).sum()):12d}"
                        label = factor if factor is not None else str(config["echoes"]["outlier_factor"])
                        print(f"{data['name']:30s} {preset:9s} {label:>6s} {size:>11s} "
                              f"{metrics.nrmse(chi, data['chi'], evaluated):7.1f} {evaluated.sum() / data['mask'].sum():6.3f} "
                              f"{cells}{algorithms.roi_cells(algorithms.roi_accuracy(chi, data, evaluated))}", flush=True)


if __name__ == "__main__":
    main()
