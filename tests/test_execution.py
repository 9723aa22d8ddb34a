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


def _read_number(path):
    from pathlib import Path

    return int(Path(path).read_text())


def test_inputs_are_hashed_by_content_even_for_nodes_built_before_the_settings(tmp_path):
    """nipype copies its (timestamp-hashing) defaults into a workflow when it is made; a rerun
    after a file was rewritten with the same bytes (new mtime) must still reuse the node."""
    import os

    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from qsmflow.execution import run_workflow

    number = tmp_path / "number.txt"
    number.write_text("7")

    def build():
        workflow = pe.Workflow(name="hashing_wf")
        node = pe.Node(niu.Function(function=_read_number, input_names=["path"], output_names=["value"]), name="read")
        node.inputs.path = str(number)
        workflow.add_nodes([node])
        return workflow

    assert run_workflow(build(), tmp_path / "work", plugin="Linear") == []
    (result,) = (tmp_path / "work" / "hashing_wf" / "read").glob("result_*.pklz")
    before = result.stat().st_mtime_ns
    number.write_text("7")
    os.utime(number, ns=(before + 10**9, before + 10**9))  # same content, another time stamp
    assert run_workflow(build(), tmp_path / "work", plugin="Linear") == []
    assert result.stat().st_mtime_ns == before  # reused, not rerun
    number.write_text("8")
    assert run_workflow(build(), tmp_path / "work", plugin="Linear") == []
    assert result.stat().st_mtime_ns != before  # new content: rerun
