"""How runs and functions show in Jupyter (``_repr_html_``), on every system."""

from __future__ import annotations

import remote_tasks as tasks

import remoterun as rr


def test_a_run_card_holds_status_host_times_params_metrics_and_folder(system):
    run = rr.function(tasks.log_some_metrics, system=system).run(run_name="card")
    run.wait(timeout=30)
    run.set_tag("note", "<b>not bold</b>")
    run.log_params({"lr": 0.5})
    card = run._repr_html_()
    assert "Run card" in card and "COMPLETED" in card
    assert "remote_tasks.log_some_metrics" in card
    assert run.config.host in card
    assert "UTC" in card and "→" in card  # started, ended
    assert "lr=0.5" in card
    assert "loss=0.25" in card and "acc=0.9" in card  # the last value of each metric
    assert "&lt;b&gt;not bold&lt;/b&gt;" in card and "<b>not bold</b>" not in card
    assert run.url in card


def test_a_failed_run_card_says_why_in_one_line(system):
    run = rr.function(tasks.fail, system=system).run("it broke\nsecond line", run_name="bad")
    run.wait(timeout=30)
    card = run._repr_html_()
    assert "FAILED" in card
    assert "CustomError: it broke" in card and "second line" not in card


def test_a_card_for_a_run_that_does_not_exist_says_so(system):
    card = rr.run(name="nowhere", system=system)._repr_html_()
    assert "Run nowhere" in card and "NOT FOUND" in card


def test_a_function_shows_its_name_kind_and_system(system):
    sync = rr.function(tasks.add, system=system)._repr_html_()
    assert "<b>add</b>" in sync and "remote_tasks.add" in sync
    assert f"<b>{system.name}</b>" in sync and "async" not in sync
    assert "async remote function" in rr.function(tasks.async_add)._repr_html_()
    assert repr(rr.function(tasks.add, system=system)).endswith(f"on {system.name}>")
