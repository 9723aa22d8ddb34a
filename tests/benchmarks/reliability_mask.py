"""Stability of the echo fit's reliability mask: does a perturbation far below the noise move it?

Run by hand (not part of the test-suite), with one or two threads:

    OMP_NUM_THREADS=1 python tests/benchmarks/reliability_mask.py [--datasets qf3,h5] [--presets default,accurate]
        [--min-cluster 1,10]

Each preset's whole chain (:func:`algorithms.chain`, raw phase to Chimap) runs on a data set of
the evidence block and on the same data with its phase rounded to 1 mrad (what GE's integer
milliradians store). Printed: the Chimap NRMSE against the truth and the coverage of the
brain, and the rounded run's Chimap NRMSE against the unrounded one with the number of QSM-mask
voxels that moved. ``--min-cluster`` sets ``echoes.outlier_min_cluster`` (1 drops every outlier,
the rule before issue 8 was closed). Data sets: ``qf3``/``qf7`` qsm-forward 3/7 T, ``h5`` the
supersampled phantom straight, ``h6`` tilted 21 degrees.
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        makers = {"qf3": lambda: algorithms.qsm_forward_dataset(3.0, Path(workdir)),
                  "qf7": lambda: algorithms.qsm_forward_dataset(7.0, Path(workdir)),
                  "h5": lambda: algorithms.honest_dataset(5, 0.0), "h6": lambda: algorithms.honest_dataset(6, 21.0)}
        print(f"{'dataset':30s} {'preset':9s} {'min_cluster':>11s} {'NRMSE%':>7} {'cover':>6} {'rounded: NRMSE%':>16} {'voxels moved':>12}")
        for key in args.datasets.split(","):
            data = makers[key]()
            rounded = dict(data, phase=(np.round(data["phase"] * 1000) / 1000).astype(np.float32))
            for preset in args.presets.split(","):
                for size in args.min_cluster.split(","):
                    config = load_config(preset, overrides=[f"echoes.outlier_min_cluster={size}"])
                    chi, mask = algorithms.chain(data, config)
                    chi_rounded, mask_rounded = algorithms.chain(rounded, config)
                    evaluated = mask & data["mask"]
                    inside = chi != 0
                    moved = 100 * np.linalg.norm(chi_rounded[inside] - chi[inside]) / np.linalg.norm(chi[inside])
                    print(f"{data['name']:30s} {preset:9s} {size:>11s} {metrics.nrmse(chi, data['chi'], evaluated):7.1f} "
                          f"{evaluated.sum() / data['mask'].sum():6.3f} {moved:16.2f} {int((mask ^ mask_rounded).sum()):12d}",
                          flush=True)


if __name__ == "__main__":
    main()
