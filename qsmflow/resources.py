"""CPUs this process may use: the allocation's, never the machine's.

A job in a 4-core allocation on a 64-core node must use 4 threads, not 64. Everything in
qsmflow that sizes a pool of processes or threads (MultiProc, ``scipy.fft`` workers, ANTs/ITK
threads) asks :func:`available_cpus` or :func:`thread_count`, never ``os.cpu_count()``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager


def available_cpus() -> int:
    """Number of CPUs this process may run on.

    The smallest of: the CPU affinity mask (``os.sched_getaffinity``: ``taskset``, cgroup
    cpusets, ``srun --cpus-per-task``), ``SLURM_CPUS_PER_TASK`` when set, and
    ``os.cpu_count()`` where neither is known. Always at least 1.
    """
    counts = []
    try:
        counts.append(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        counts.append(os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    return max(1, min(counts))


def thread_count(n_procs: int | None = None) -> int:
    """Threads for one computation (FFT workers, ANTs): ``QSMFLOW_FFT_WORKERS`` when set, else
    the node's ``n_procs`` when given, capped by :func:`available_cpus`."""
    value = os.environ.get("QSMFLOW_FFT_WORKERS", "").strip()
    if value:
        try:
            requested = int(value)
        except ValueError:
            raise ValueError(f"QSMFLOW_FFT_WORKERS={value!r}: expected a positive whole number") from None
        if requested < 1:
            raise ValueError(f"QSMFLOW_FFT_WORKERS={value!r}: expected a positive whole number")
        return min(requested, available_cpus())
    if n_procs is not None:
        return max(1, min(int(n_procs), available_cpus()))
    return available_cpus()


#: Environment variables that size native thread pools when a library starts: OpenMP, the BLAS
#: libraries numpy and scipy load (OpenBLAS, MKL), and ITK (antspyx).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


@contextmanager
def limited_threads(threads: int | None = None):
    """Inside: every native thread pool of this process and of the processes it starts uses
    ``threads`` threads (default :func:`thread_count`, capped by :func:`available_cpus`).

    The BLAS libraries already loaded (numpy's and scipy's OpenBLAS start one thread per CPU of
    the affinity mask, not of ``SLURM_CPUS_PER_TASK``) are limited with ``threadpoolctl``; worker
    processes forked inside inherit the limit. :data:`THREAD_VARIABLES` are set for libraries that
    start later, in this process or in processes it spawns (ITK reads its variable when antspyx
    first runs a filter). Both are restored on exit. Yields the thread count.
    """
    from threadpoolctl import threadpool_limits

    count = thread_count() if threads is None else max(1, min(int(threads), available_cpus()))
    previous = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(count) for name in THREAD_VARIABLES})
    try:
        with threadpool_limits(limits=count):
            yield count
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
