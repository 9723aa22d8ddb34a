"""nipype's private members that qsmflow's plugins override, call or read, pinned.

qsmflow/cluster.py (SLURM, SLURMGraph, SGE, PBS) and qsmflow/execution.py (the resilient
MultiProc) subclass nipype's plugins and rely on members that are not nipype's public API: the
methods they override or call through ``super()``, the attributes the parents' ``__init__``
sets, and the way the parents' loops call them. setup.cfg pins nipype to the tested range; this
file fails, naming the member, when a nipype release in (or outside) that range changes one:

* a member is missing, or its signature differs;
* the source of a member differs from the one the workarounds were written against (a change
  in nipype's own code there may fix, break or duplicate a workaround: re-read the member and
  the workaround named in the message, then update :data:`PINNED`);
* an attribute the patches read is not set by the parent's ``__init__`` any more.
"""
from __future__ import annotations

import configparser
import hashlib
import importlib
import inspect
from pathlib import Path

import nipype
import pytest

#: Version the source fingerprints below were taken from.
TESTED_NIPYPE = "1.11.0"

#: (module, member, signature, sha256 of its source with trailing spaces stripped, first 16 hex
#: digits, where qsmflow relies on it).
PINNED = [
    ("nipype.pipeline.plugins.multiproc", "MultiProcPlugin.__init__", "(self, plugin_args=None)", "ff4a529e32212c7c",
     "execution.py ResilientMultiProcPlugin reads pool, processors, _cwd, _taskid, _task_obj, _taskresult"),
    ("nipype.pipeline.plugins.multiproc", "MultiProcPlugin._submit_job", "(self, node, updatehash=False)", "55906d7a58b9a564",
     "execution.py ResilientMultiProcPlugin._submit_job re-implements it"),
    ("nipype.pipeline.plugins.multiproc", "MultiProcPlugin._async_callback", "(self, args)", "d0dc6e1a72c0bc4a",
     "execution.py ResilientMultiProcPlugin._collect replaces it"),
    ("nipype.pipeline.plugins.multiproc", "MultiProcPlugin._get_result", "(self, taskid)", "d5cafc206048cfe9",
     "execution.py: results are read from _taskresult"),
    ("nipype.pipeline.plugins.multiproc", "MultiProcPlugin._clear_task", "(self, taskid)", "6364f7aa6c2af3dd",
     "execution.py: tasks are kept in _task_obj"),
    ("nipype.pipeline.plugins.multiproc", "run_node", "(node, updatehash, taskid)", "28dc2a385ee2bdf8",
     "execution.py submits it to the rebuilt pool and expects its result dict"),
    ("nipype.pipeline.plugins.multiproc", "process_initializer", "(cwd)", "23ad6c35fc3d41d3",
     "execution.py initialises a rebuilt pool with it"),
    ("nipype.pipeline.plugins.base", "DistributedPluginBase.run", "(self, graph, config, updatehash=False)",
     "3e62673956c3e90b", "cluster.py _BatchMixin.run wraps it; the loop calls _get_result/_clear_task/_submit_job"),
    ("nipype.pipeline.plugins.base", "DistributedPluginBase._send_procs_to_workers", "(self, updatehash=False, graph=None)",
     "a11daee34052c65b", "cluster.py and execution.py: the caller of _submit_job and of the status callback"),
    ("nipype.pipeline.plugins.base", "DistributedPluginBase._clean_queue", "(self, jobid, graph, result=None)",
     "e098c5d96ddcc042", "cluster.py: report_crash is called here with the traceback _get_result returns"),
    ("nipype.pipeline.plugins.base", "SGELikeBatchManagerBase.__init__", "(self, template, plugin_args=None)",
     "80c6af04e22d3956", "cluster.py reads _template, _qsub_args, _pending"),
    ("nipype.pipeline.plugins.base", "SGELikeBatchManagerBase._get_result", "(self, taskid)", "6921166fd4576295",
     "cluster.py _BatchMixin._get_result: the str traceback of a job without result file"),
    ("nipype.pipeline.plugins.base", "SGELikeBatchManagerBase._submit_job", "(self, node, updatehash=False)",
     "d09ec2145cacd6ca", "cluster.py _BatchMixin._submit_job re-implements it"),
    ("nipype.pipeline.plugins.base", "SGELikeBatchManagerBase._clear_task", "(self, taskid)", "ad32d99c1755a459",
     "cluster.py _BatchMixin._clear_task calls it"),
    ("nipype.pipeline.plugins.base", "GraphPluginBase.run", "(self, graph, config, updatehash=False)", "5680f885a63ff155",
     "cluster.py SLURMGraphPlugin.run: returns after _submit_graph, sets _config"),
    ("nipype.pipeline.plugins.slurm", "SLURMPlugin.__init__", "(self, **kwargs)", "452a7b80df460560",
     "cluster.py SLURMPlugin reads _template, _sbatch_args, _max_tries, _retry_timeout, _pending"),
    ("nipype.pipeline.plugins.slurm", "SLURMPlugin._is_pending", "(self, taskid)", "6616942bd78d6e97",
     "cluster.py SLURMPlugin._is_pending replaces it"),
    ("nipype.pipeline.plugins.slurm", "SLURMPlugin._submit_batchtask", "(self, scriptfile, node)", "150ae04bc2e278cb",
     "cluster.py SLURMPlugin._submit_batchtask replaces it (LOGNAME, refusals)"),
    ("nipype.pipeline.plugins.slurmgraph", "SLURMGraphPlugin.__init__", "(self, **kwargs)", "65c5641c07a36cf3",
     "cluster.py SLURMGraphPlugin: _dont_resubmit_completed_jobs only with plugin_args"),
    ("nipype.pipeline.plugins.slurmgraph", "SLURMGraphPlugin._submit_graph", "(self, pyfiles, dependencies, nodes)",
     "92c6f0bf9937719a", "cluster.py SLURMGraphPlugin._submit_graph replaces it"),
    ("nipype.pipeline.plugins.sge", "SGEPlugin.__init__", "(self, **kwargs)", "c54e7c1ceb4ce56f",
     "cluster.py SGEPlugin"),
    ("nipype.pipeline.plugins.sge", "SGEPlugin._is_pending", "(self, taskid)", "332b5a8449aa5c89",
     "cluster.py SGEPlugin keeps it"),
    ("nipype.pipeline.plugins.sge", "SGEPlugin._submit_batchtask", "(self, scriptfile, node)", "49e94158e2385bbb",
     "cluster.py _QsubMixin._submit_batchtask calls it with qsub_args in node.plugin_args (LOGNAME)"),
    ("nipype.pipeline.plugins.pbs", "PBSPlugin.__init__", "(self, **kwargs)", "41c01a3ce6b408ee",
     "cluster.py PBSPlugin"),
    ("nipype.pipeline.plugins.pbs", "PBSPlugin._is_pending", "(self, taskid)", "024647cf012c64b5",
     "cluster.py PBSPlugin keeps it"),
    ("nipype.pipeline.plugins.pbs", "PBSPlugin._submit_batchtask", "(self, scriptfile, node)", "824d55a4f733069e",
     "cluster.py _QsubMixin._submit_batchtask calls it with qsub_args in node.plugin_args (LOGNAME)"),
    ("nipype.pipeline.plugins.tools", "create_pyscript", "(node, updatehash=False, store_exception=True)",
     "754b2b96aa57d259", "cluster.py writes each node's job script with it"),
    ("nipype.pipeline.engine.workflows", "Workflow._create_flat_graph", "(self)", "b2a05d999541d99a",
     "workunits.py reads the graph nipype runs (node _hierarchy) to find which units consume which"),
    ("nipype.pipeline.plugins.tools", "report_crash", "(node, traceback=None, hostname=None)", "e5638fa8e70b711c",
     "cluster.py writes the crash file of a lost job with it (traceback must be a list)"),
]


def _member(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _fingerprint(obj) -> str:
    source = "\n".join(line.rstrip() for line in inspect.getsource(obj).splitlines())
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def test_the_pinned_range_holds_the_tested_version():
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    requirement = next(line.strip() for line in setup["options"]["install_requires"].splitlines()
                       if line.strip().startswith("nipype"))
    assert requirement == "nipype>=1.11,<1.12", f"setup.cfg pins {requirement!r}; re-check PINNED for the new range"
    assert TESTED_NIPYPE.startswith("1.11.")


@pytest.mark.parametrize("module, member, signature, fingerprint, reason", PINNED, ids=[f"{m[0].rsplit('.', 1)[-1]}.{m[1]}" for m in PINNED])
def test_private_member_is_unchanged(module, member, signature, fingerprint, reason):
    obj = _member(module, member)
    where = f"{module}.{member} (qsmflow relies on it: {reason}; nipype {nipype.__version__}, tested {TESTED_NIPYPE})"
    assert obj is not None, f"nipype's private member {where} has disappeared"
    assert str(inspect.signature(obj)) == signature, (
        f"nipype's private member {where} changed its signature: {inspect.signature(obj)} instead of {signature}")
    assert _fingerprint(obj) == fingerprint, (
        f"nipype's private member {where} changed its code: re-read it against the workaround, then update PINNED "
        f"in tests/test_nipype_internals.py (new fingerprint {_fingerprint(obj)})")


def test_multiproc_sets_the_attributes_the_resilient_plugin_reads():
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin

    plugin = MultiProcPlugin(plugin_args={"n_procs": 1, "memory_gb": 1})
    try:
        for name in ("pool", "processors", "_cwd", "_taskid", "_task_obj", "_taskresult"):
            assert hasattr(plugin, name), f"nipype's MultiProcPlugin.__init__ no longer sets {name!r} (qsmflow/execution.py reads it)"
        assert isinstance(plugin._task_obj, dict) and isinstance(plugin._taskresult, dict) and plugin._taskid == 0
    finally:
        plugin.pool.shutdown()


def test_batch_plugins_set_the_attributes_the_cluster_plugins_read(tmp_path):
    from nipype.pipeline.plugins.pbs import PBSPlugin
    from nipype.pipeline.plugins.slurm import SLURMPlugin
    from nipype.pipeline.plugins.slurmgraph import SLURMGraphPlugin

    expected = {
        SLURMPlugin: ("_template", "_sbatch_args", "_max_tries", "_retry_timeout", "_pending", "_config"),
        SLURMGraphPlugin: ("_template", "_sbatch_args", "_max_tries", "_retry_timeout", "_dont_resubmit_completed_jobs"),
        PBSPlugin: ("_template", "_qsub_args", "_pending", "_config"),  # (SGE's __init__ calls qstat: see PINNED)
    }
    for plugin_class, names in expected.items():
        plugin = plugin_class(plugin_args={"max_tries": 1, "retry_timeout": 1, "dont_resubmit_completed_jobs": True})
        for name in names:
            assert hasattr(plugin, name), (f"nipype's {plugin_class.__name__}.__init__ no longer sets {name!r} "
                                           "(qsmflow/cluster.py reads it)")


def test_nodes_have_the_members_the_plugins_read(tmp_path):
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    outer = pe.Workflow(name="outer_wf", base_dir=str(tmp_path))
    node = pe.Node(IdentityInterface(fields=["value"]), name="step", mem_gb=1.5, n_procs=2)
    node.inputs.value = 1
    outer.add_nodes([node])
    for name in ("_hierarchy", "_interface", "base_dir", "fullname", "overwrite", "plugin_args", "mem_gb", "n_procs",
                 "output_dir", "is_cached", "interface"):
        assert hasattr(node, name), f"nipype's Node no longer has {name!r} (qsmflow/cluster.py or execution.py reads it)"
    assert hasattr(node._interface, "always_run"), "nipype interfaces no longer have 'always_run' (qsmflow/cluster.py)"
    assert (node.mem_gb, node.n_procs) == (1.5, 2)
    assert node.fullname == "outer_wf.step" and callable(node.output_dir) and callable(node.is_cached)


def test_workflows_have_the_members_work_units_read():
    """qsmflow/workunits.py walks ``Workflow._graph`` (children: nodes and nested workflows)."""
    from nipype.interfaces.utility import Merge
    from nipype.pipeline import engine as pe

    outer, inner = pe.Workflow(name="outer_wf"), pe.Workflow(name="inner_wf")
    inner.add_nodes([pe.Node(Merge(1), name="step")])
    outer.add_nodes([inner])
    assert hasattr(outer, "_graph"), "nipype's Workflow no longer has '_graph' (qsmflow/workunits.py walks it)"
    assert list(outer._graph.nodes()) == [inner] and [n.name for n in inner._graph.nodes()] == ["step"]
