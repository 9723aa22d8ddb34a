"""The execution layer: a MultiProc worker that dies becomes a reported failure, not a hang."""
import signal

import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.execution import run_workflow


def _die():
    import os
    import signal as signals

    os.kill(os.getpid(), signals.SIGKILL)


def _double(value):
    return 2 * value


@pytest.fixture
def alarm():
    def timeout(*_):
        raise TimeoutError("the run hung after a worker died")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_killed_worker_is_a_failure_and_the_rest_runs(tmp_path, alarm):
    workflow = pe.Workflow(name="wf")
    killed = pe.Node(niu.Function(function=_die, input_names=[], output_names=[]), name="killed")
    survivor = pe.Node(niu.Function(function=_double, input_names=["value"], output_names=["out"]), name="survivor")
    survivor.inputs.value = 21
    after = pe.Node(niu.Function(function=_double, input_names=["value"], output_names=["out"]), name="after")
    workflow.connect(survivor, "out", after, "value")
    workflow.add_nodes([killed])
    failures = run_workflow(workflow, tmp_path / "work", plugin="MultiProc", plugin_args={"n_procs": 1})
    assert [f.node for f in failures] == ["killed"]
    assert failures[0].reason.startswith("WorkerDiedError: the process running wf.killed died")
    assert (tmp_path / "work" / "wf" / "after" / "result_after.pklz").exists()
