"""Lineage: runs started or used inside another run are linked to it, Runs passed as
arguments are read on the executing host, graphs have no cycle, runs re-run from their
record and export it. On the local system and on a real SSH host alike."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import remote_tasks as tasks

import remoterun as rr


def _acyclic(graph) -> bool:
    """Whether the graph's edges have no cycle (Kahn's algorithm)."""
    incoming = {url: 0 for url in graph.nodes}
    for _, dst, _ in graph.edges:
        incoming[dst] += 1
    ready = [url for url, n in incoming.items() if n == 0]
    seen = 0
    while ready:
        url = ready.pop()
        seen += 1
        for src, dst, _ in graph.edges:
            if src == url:
                incoming[dst] -= 1
                if incoming[dst] == 0:
                    ready.append(dst)
    return seen == len(graph.nodes)


def _names(runs) -> list[str]:
    return [r.config.get("fn_name") or r.name for r in runs]


def test_block_links_the_steps_it_produced_then_the_ones_it_used(system, tmp_path):
    make = rr.function(tasks.make_list, system=system, cache=True)
    add_up = rr.function(tasks.total, system=system, cache=True)
    path = str(tmp_path / "blocks" / "pipeline")

    with rr.run(path=path) as first:
        data = make.get_or_run(4)
        summed = add_up.get_or_run(data)  # a Run passed on: read where it lives
        assert summed.result() == 6
    assert _names(first.children()) == ["make_list", "total"]
    assert first.upstream() == []  # what it produced is not also "used"
    assert summed.parent() == first
    assert data.config["parent"] == first.url
    assert summed.config["upstream"] == [data.url]
    assert summed.inputs()["args"][0] == data  # recorded as the run, not as its value

    with rr.run(path=path) as second:  # everything is cached now
        data2 = make.get_or_run(4)
        assert add_up.get_or_call(data2) == 6
    assert second.children() == []
    assert _names(second.upstream()) == ["make_list", "total"]
    assert second.find_step("total").url == summed.url
    assert second.config["attempt"] == 2
    assert [r.config["attempt"] for r in second.attempts()] == [1]

    graph = second.graph()
    names = {url: run.name for url, run in graph.nodes.items()}
    edges = {(names[a], names[b], kind) for a, b, kind in graph.edges}
    assert edges == {
        (data.name, "pipeline", "used"),
        (summed.name, "pipeline", "used"),
        (data.name, summed.name, "used"),
    }
    dot = graph.to_dot()
    assert dot.startswith("digraph runs {") and dot.count("->") == 3
    assert _acyclic(graph)


def test_a_remote_function_calling_remote_functions_links_its_steps(system):
    pipeline = rr.function(tasks.nested_pipeline, system=system)
    run = pipeline.run(system.root, 5, run_name="nested")
    assert run.result(timeout=60) == 100  # sum(range(5)) * 10
    steps = run.children()
    assert _names(steps) == ["make_list", "total", "scaled_total"]
    assert all(step.parent() == run for step in steps)
    make, add_up, scale = steps
    assert scale.upstream() == [make]  # passed as a Run; the sum as a value
    assert add_up.upstream() == [make]
    assert run.find_step("total").result() == 10
    graph = run.graph()
    assert len(graph.nodes) == 4 and _acyclic(graph)

    again = pipeline.run(system.root, 5, run_name="nested")  # the steps are cached now
    assert again.result(timeout=60) == 100
    assert again.children() == []
    assert _names(again.upstream()) == ["make_list", "total", "scaled_total"]


def test_a_failed_run_passed_as_an_argument_starts_nothing(system):
    failed = rr.function(tasks.fail, system=system).run("broken", run_name="broken")
    assert failed.wait(timeout=30) is rr.RunStatus.FAILED
    add_up = rr.function(tasks.total, system=system)
    with pytest.raises(rr.RemoterunError, match="argument 'xs' .* is run 'broken', which FAILED"):
        add_up.run(failed, run_name="after-broken")
    assert [r.name for r in system.runs()] == ["broken"]


def test_a_run_passed_to_another_system_travels_as_its_value(system, tmp_path):
    data = rr.function(tasks.make_list, system=system).run(3, run_name="three")
    other = rr.LocalSystem(root=str(tmp_path / "other"))
    summed = rr.function(tasks.total, system=other).run(data, run_name="summed")
    assert summed.result(timeout=30) == 3
    assert summed.config["upstream"] == [data.url]
    assert rr.function(tasks.total, system=system)(data) == 3  # an unrecorded call too


def test_a_run_cannot_wait_for_itself(system):
    run = rr.function(tasks.wait_for_myself, system=system).run(system.root, run_name="me")
    with pytest.raises(rr.RemoterunError, match="cannot wait for itself"):
        run.result(timeout=60)


def test_lineage_has_no_cycle_when_a_name_is_executed_again(tmp_path):
    """x is computed; y uses x; x is executed again using y. By URL alone that is the
    cycle x -> y -> x; links name attempts, so the first x is its own node and used links
    run forward in time."""
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    add_up = rr.function(tasks.total, system=here)
    scale = rr.function(tasks.scaled_total, system=here)
    x = add_up.run([1, 2], run_name="x")
    y = scale.run([1], x, run_name="y")
    assert y.result(timeout=30) == 3
    x_again = scale.run([2], y, run_name="x")
    assert x_again.result(timeout=30) == 6
    graph = x_again.graph()
    names = {url: run.url.split("/runs/")[1] for url, run in graph.nodes.items()}
    edges = {(names[a], names[b], kind) for a, b, kind in graph.edges}
    assert edges == {("y", "x", "used"), ("x/attempts/1", "y", "used")}
    assert _acyclic(graph)
    for src, dst, _ in graph.edges:  # a used run ended before its user
        assert graph.nodes[src].config["end_time"] < graph.nodes[dst].config["end_time"]


def test_shared_store_hits_are_linked_as_used(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("REMOTERUN_SIGNING_KEY", "a-team-key-for-the-lineage-tests")
    store = f"{s3}/team"
    make = rr.function(tasks.make_list, cache=True, share=store)
    make.to(rr.LocalSystem(root=str(tmp_path / "alice"))).get_or_call(7)
    bob = make.to(rr.LocalSystem(root=str(tmp_path / "bob")))
    with rr.run(path=str(tmp_path / "bob-block" / "pipeline")) as block:
        assert bob.get_or_call(7) == list(range(7))
    (used,) = block.config["upstream"]
    assert used.startswith(f"{store}/make_list-")
    assert block.upstream()[0].result() == list(range(7))


def test_rerun_executes_the_recorded_function_again(system, tmp_path):
    original = rr.function(tasks.add, system=system).run(40, b=2, run_name="answer")
    assert original.result(timeout=30) == 42
    again = original.rerun()
    assert again.result(timeout=30) == 42 and again.name != "answer"
    assert again.config["source"] == original.url
    assert again.config["source_attempt"] == 1
    assert again.inputs() == {"args": [40], "kwargs": {"b": 2}}
    elsewhere = original.rerun(run_name="answer-here", system=rr.LocalSystem(root=str(tmp_path)))
    assert elsewhere.result(timeout=30) == 42
    assert (tmp_path / "answer-here" / "config.json").exists()


def test_rerun_of_a_recorded_command(system):
    system.run(["echo again"], run_name="echoed", stream=False)
    again = system.get_run("echoed").rerun()
    assert again.result(timeout=30) == [(0, "again\n", "")]
    assert again.config["run_type"] == "command" and again.config["cmds"] == ["echo again"]


def test_map_over_runs_maps_over_their_results(system):
    runs = [rr.function(tasks.make_list, system=system).run(n, run_name=f"l{n}") for n in (2, 3)]
    assert rr.function(tasks.total, system=system).map(runs) == [1, 3]


def test_rerun_of_a_run_with_a_run_argument_on_another_system(system, tmp_path):
    data = rr.function(tasks.make_list, system=system).run(4, run_name="four")
    summed = rr.function(tasks.total, system=system).run(data, run_name="sum-four")
    assert summed.result(timeout=30) == 6
    moved = summed.rerun(system=rr.LocalSystem(root=str(tmp_path)))
    assert moved.result(timeout=30) == 6
    assert moved.config["upstream"] == [data.url]


def test_rerun_refuses_what_it_cannot_re_run(tmp_path):
    with rr.run(path=str(tmp_path / "block")) as block:
        pass
    with pytest.raises(rr.RemoterunError, match="no function to re-run"):
        block.rerun()
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    run = rr.function(tasks.add, system=here).run(1, run_name="gone")
    run.wait(timeout=30)
    (tmp_path / "runs" / "gone" / "function.pkl").unlink()
    with pytest.raises(rr.RunStorageError, match="function.pkl"):
        run.rerun()


def test_export_writes_the_record_as_json_and_yaml(system, tmp_path):
    run = rr.function(tasks.add, system=system).run(1, run_name="exported")
    run.wait(timeout=30)
    run.set_tag("team", "ml")
    as_json = json.loads(Path(run.export(str(tmp_path / "run.json"))).read_text())
    assert as_json["name"] == "exported" and as_json["status"] == "COMPLETED"
    assert as_json["url"] == run.url and as_json["tags"] == {"team": "ml"}
    yaml = pytest.importorskip("yaml")
    as_yaml = yaml.safe_load(Path(run.export(str(tmp_path / "run.yaml"))).read_text())
    assert as_yaml == as_json
    with pytest.raises(ValueError, match="json or yaml"):
        run.export(str(tmp_path / "run.txt"))


def test_runs_through_star_args_are_waited_for_and_checked(tmp_path):
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    failed = rr.function(tasks.fail, system=here).run("broken", run_name="broken")
    slow = rr.function(tasks.record_call, system=here).run(os.devnull, [1], 0.3, run_name="slow")
    add_all = rr.function(tasks.total_of_all, system=here)
    assert add_all.run(slow, [2], run_name="all").result(timeout=30) == 4  # [1, 1] + [2]
    with pytest.raises(rr.RemoterunError, match=r"argument 'args\[0\]'.* which FAILED"):
        add_all.run(failed, run_name="never")
    assert "never" not in [r.name for r in here.runs()]


def test_a_run_inside_a_list_argument_is_refused_clearly(tmp_path):
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    data = rr.function(tasks.make_list, system=here).run(2, run_name="two")
    data.wait(timeout=30)
    add_all = rr.function(tasks.total_of_all, system=here, cache=True)
    with pytest.raises(rr.SerializationError, match="pass it as an argument of its own"):
        add_all.get_or_call([data])


def test_links_are_written_once_and_failed_steps_are_linked(tmp_path):
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    make = rr.function(tasks.make_list, system=here, cache=True)
    broken = rr.function(tasks.fail, system=here, cache=True)
    make.get_or_call(3)
    with rr.run(path=str(tmp_path / "block")) as block:
        make.get_or_call(3)
        config = tmp_path / "block" / "config.json"
        before = config.stat().st_mtime_ns, config.stat().st_ino
        for _ in range(20):  # the same hit again and again: the record is not rewritten
            make.get_or_call(3)
        assert (config.stat().st_mtime_ns, config.stat().st_ino) == before
        with pytest.raises(tasks.CustomError):
            broken.get_or_call("no luck")
    assert [link["kind"] for link in block.config["links"]] == ["used", "produced"]
    assert block.children()[0].status is rr.RunStatus.FAILED


def test_threads_and_unrecorded_calls_inside_a_block_are_linked(tmp_path):
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    data = rr.function(tasks.make_list, system=here).run(3, run_name="three")
    data.wait(timeout=30)
    add_up = rr.function(tasks.total, system=here)
    with rr.run(path=str(tmp_path / "block")) as block:
        assert add_up(data) == 3  # an unrecorded call: the block used the run
        worker = threading.Thread(target=lambda: add_up.run([1], run_name="threaded").wait())
        worker.start()
        worker.join()
    assert block.upstream() == [data]
    assert [r.name for r in block.children()] == ["threaded"]


def test_parent_of_a_removed_run_is_none(tmp_path):
    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    with rr.run(path=str(tmp_path / "gone-block")):
        child = rr.function(tasks.total, system=here).run([1], run_name="child")
    child.wait(timeout=30)
    assert child.parent() is not None
    shutil.rmtree(tmp_path / "gone-block")
    assert child.parent() is None


def test_reruns_keep_runs_passed_as_arguments_generation_after_generation(system):
    data = rr.function(tasks.make_list, system=system).run(4, run_name="four-again")
    summed = rr.function(tasks.total, system=system).run(data, run_name="sum-again")
    assert summed.result(timeout=30) == 6
    first = summed.rerun()
    assert first.result(timeout=30) == 6
    second = first.rerun()
    assert second.result(timeout=30) == 6
    for run in (first, second):
        assert run.config["upstream"] == [data.url]
        (passed,) = run.inputs()["args"]
        assert isinstance(passed, rr.Run) and passed.url == data.url
