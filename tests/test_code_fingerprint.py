"""Code fingerprints: what a content-cached step's name depends on (issue 5)."""

from __future__ import annotations

import importlib
import sys
import textwrap
import time
from pathlib import Path

import pytest

from remoterun import fingerprint as cache

PIPELINE = '''
import json

SCALE = 3

def leaf(x):
    return x * SCALE

def middle(x):
    return leaf(x) + 1

def step(x):
    """Top of the chain."""
    return json.dumps(middle(x))
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write, import and re-import a module of the user's own, as an editor would."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def load(source: str, name: str = "rr_pipeline_mod"):
        path = Path(tmp_path, f"{name}.py")
        path.write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        sys.modules.pop(name, None)
        names.append(name)
        return importlib.import_module(name)

    yield load
    for name in names:
        sys.modules.pop(name, None)


def test_a_comment_or_docstring_edit_keeps_the_fingerprint(module):
    before = cache.code_fingerprint(module(PIPELINE).step)
    edited = PIPELINE.replace('"""Top of the chain."""', '"""Another docstring."""')
    edited = edited.replace("def leaf(x):", "# a comment\n\n\ndef leaf(x):  # why not")
    assert cache.code_fingerprint(module(edited).step) == before


def test_a_helper_two_calls_deep_changes_it_and_is_named(module):
    first = module(PIPELINE)
    before = cache.code_components(first.step)
    second = module(PIPELINE.replace("return x * SCALE", "return x * SCALE * 2"))
    after = cache.code_components(second.step)
    assert cache.code_fingerprint(second.step) != cache.code_fingerprint(first.step)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == ["rr_pipeline_mod.leaf"]


def test_a_module_constant_changes_it(module):
    before = cache.code_components(module(PIPELINE).step)
    after = cache.code_components(module(PIPELINE.replace("SCALE = 3", "SCALE = 4")).step)
    assert before["rr_pipeline_mod.SCALE"] != after["rr_pipeline_mod.SCALE"]
    assert [k for k in before if before[k] != after[k]] == ["rr_pipeline_mod.SCALE"]


def test_library_code_counts_by_version_only(module):
    components = cache.code_components(module(PIPELINE).step)
    assert components["lib:json"].startswith("json python ")
    assert not any(k.startswith("json.") for k in components)


def test_identical_functions_in_two_modules_do_not_share(module):
    a = module(PIPELINE, "rr_pipeline_a")
    b = module(PIPELINE, "rr_pipeline_b")
    assert cache.code_fingerprint(a.step) != cache.code_fingerprint(b.step)


def test_recursion_between_functions_terminates(module):
    mod = module(
        """
        def even(n):
            return True if n == 0 else odd(n - 1)

        def odd(n):
            return False if n == 0 else even(n - 1)
        """
    )
    assert set(cache.code_components(mod.even)) == {"rr_pipeline_mod.even", "rr_pipeline_mod.odd"}


def test_classes_closures_and_methods_are_followed(module):
    source = """
        class Model:
            def fit(self, x):
                return x + 1

        def make(k):
            model = Model()

            def run(x):
                return model.fit(x) * k
            return run
        """
    before = cache.code_components(module(source).make(2))
    after = cache.code_components(module(source.replace("x + 1", "x + 2")).make(2))
    assert before["rr_pipeline_mod.Model.fit"] != after["rr_pipeline_mod.Model.fit"]
    other_k = cache.code_components(module(source).make(3))
    assert other_k != before  # a closure's value is part of the code it runs


def test_a_fifty_function_tree_is_quick(module):
    lines = ["def f49(x):\n    return x\n"]
    lines += [f"def f{i}(x):\n    return f{i + 1}(x) + f{min(i + 2, 49)}(x)\n" for i in range(49)]
    mod = module("\n".join(lines))
    cache.code_fingerprint(mod.f0)
    start = time.perf_counter()
    for _ in range(20):
        components = cache.code_components(mod.f0)
    assert len(components) == 50
    # Not a timing test: the benchmark measures it. This only guards against a walk
    # that revisits shared helpers exponentially (2**49 paths here).
    assert time.perf_counter() - start < 5


def test_explain_names_what_changed(module):
    import remoterun as rr

    first = rr.function(module(PIPELINE).step, cache=True)
    assert first.get_or_call(2) == "7"
    assert first.explain(2).hit
    edited = rr.function(module(PIPELINE.replace("+ 1", "+ 10")).step, cache=True)
    why = edited.explain(2)
    assert not why.hit
    assert why.reasons == ["code: rr_pipeline_mod.middle changed"]
    assert "middle changed" in str(why)
    other_arg = first.explain(5)
    assert not other_arg.hit and other_arg.reasons == ["argument 'x' differs"]
    assert edited.get_or_call(2) == "16"  # executes: a new name


def test_version_stands_for_the_code(module):
    import remoterun as rr

    first = rr.function(module(PIPELINE).step, cache=True, version="1")
    assert first.get_or_call(2) == "7"
    edited = rr.function(module(PIPELINE.replace("+ 1", "+ 10")).step, cache=True, version="1")
    assert edited.explain(2).hit
    assert edited.get_or_call(2) == "7"  # the run of version 1, not executed again
    bumped = rr.function(module(PIPELINE).step, cache=True, version="2")
    assert bumped.explain(2).reasons == ["version: '1' -> '2'"]


def test_numpy_arrays_count_by_content():
    np = pytest.importorskip("numpy")
    a = np.arange(12, dtype="float64").reshape(3, 4)
    same = np.asfortranarray(a)  # other memory order, and other pickle bytes
    assert cache.value_fingerprint(same) == cache.value_fingerprint(a)
    assert cache.value_fingerprint(a.astype("float32")) != cache.value_fingerprint(a)
    assert cache.value_fingerprint(a.reshape(4, 3)) != cache.value_fingerprint(a)
    changed = a.copy()
    changed[2, 3] += 1e-9
    assert cache.value_fingerprint(changed) != cache.value_fingerprint(a)
    objects = np.array([{"a": 1}, None], dtype=object)  # by pickle, still stable
    assert cache.value_fingerprint(objects) == cache.value_fingerprint(objects.copy())
    assert cache.value_fingerprint(np.array(5)) != cache.value_fingerprint(np.array([5]))
    fields_a, fields_b = np.zeros(2, dtype=[("a", "i4")]), np.zeros(2, dtype=[("b", "i4")])
    assert cache.value_fingerprint(fields_a) != cache.value_fingerprint(fields_b)
    days = np.array(["2026-01-01", "2026-01-02"], dtype="datetime64[D]")
    assert cache.value_fingerprint(days) != cache.value_fingerprint(days + 1)


def test_pandas_frames_count_by_content():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    assert cache.value_fingerprint(df.copy()) == cache.value_fingerprint(df)
    assert cache.value_fingerprint(df.rename(columns={"a": "c"})) != cache.value_fingerprint(df)
    assert cache.value_fingerprint(df.astype({"a": "int32"})) != cache.value_fingerprint(df)
    assert cache.value_fingerprint(df.set_axis([7, 8, 9])) != cache.value_fingerprint(df)
    edited = df.copy()
    edited.loc[1, "b"] = "Y"
    assert cache.value_fingerprint(edited) != cache.value_fingerprint(df)
    assert cache.value_fingerprint(df["a"]) != cache.value_fingerprint(df["a"].rename("c"))
    lists = pd.DataFrame({"a": [[1], [2]]})  # unhashable cells: by pickle
    assert cache.value_fingerprint(lists) == cache.value_fingerprint(lists.copy())
    numbers, texts = pd.Series([1, 2], dtype=object), pd.Series(["1", "2"], dtype=object)
    assert cache.value_fingerprint(numbers) != cache.value_fingerprint(texts)
    by_int, by_text = pd.DataFrame({1: [1]}), pd.DataFrame({"1": [1]})
    assert cache.value_fingerprint(by_int) != cache.value_fingerprint(by_text)
    named = df.rename_axis("row")
    assert cache.value_fingerprint(named) != cache.value_fingerprint(df)


def test_hashing_a_slice_at_a_time_keeps_the_fingerprints(monkeypatch):
    """Long strings and pandas objects are hashed a slice at a time, so that hashing an
    argument holds no copy of its size; the fingerprints are those of hashing them whole,
    so runs recorded before still hit."""
    pd = pytest.importorskip("pandas")
    np = pytest.importorskip("numpy")
    rows = 2 * cache._ROW_SLICE + 5
    frame = pd.DataFrame(
        {
            "f": np.arange(rows, dtype=float),
            "c": pd.Categorical(np.arange(rows) % 3),
            "t": pd.date_range("2024-01-01", periods=rows, freq="s", tz="UTC"),
        }
    )
    values = [
        frame,
        frame["c"],
        pd.Index(frame["f"]),
        "a" * (2 * cache._STR_SLICE + 1),
        "é\ud800x" * cache._STR_SLICE,  # multi-byte and a lone surrogate, across slices
    ]
    in_slices = [cache.value_fingerprint(v) for v in values]
    monkeypatch.setattr(cache, "_ROW_SLICE", 1 << 62)
    monkeypatch.setattr(cache, "_STR_SLICE", 1 << 62)
    assert [cache.value_fingerprint(v) for v in values] == in_slices


def test_a_content_cached_call_with_an_array_hits(tmp_path):
    np = pytest.importorskip("numpy")
    import remoterun as rr

    here = rr.LocalSystem(root=str(tmp_path / "runs"))
    total = rr.function(np.sum, system=here, name="total", cache=True)
    data = np.arange(1000)
    assert total.get_or_call(data) == 499500
    assert total.explain(np.asfortranarray(data.copy())).hit
    assert not total.explain(data + 1).hit
    assert len(here.runs()) == 1
    days = np.array(["2026-01-01"], dtype="datetime64[D]")
    first = rr.function(np.min, system=here, name="first", cache=True)
    assert first.get_or_call(days) == days[0]  # no buffer format, still fingerprinted


def test_explain_compares_with_runs_of_the_same_function_only(module):
    import remoterun as rr

    a = rr.function(module(PIPELINE, "rr_pipeline_a").step, cache=True)
    assert a.get_or_call(2) == "7"
    b = rr.function(module(PIPELINE, "rr_pipeline_b").step, cache=True)  # also "step"
    why = b.explain(2)
    assert not why.hit and why.compared_to is None
    assert why.reasons == ["no earlier COMPLETED run of step"]


def test_an_argument_that_cannot_be_fingerprinted_is_named(tmp_path):
    import threading

    import remoterun as rr

    here = rr.LocalSystem(root=str(tmp_path / "runs"))

    def use(data, lock):
        return len(data)

    fn = rr.function(use, system=here, cache=True)
    with pytest.raises(rr.SerializationError) as caught:
        fn.get_or_call([1, 2], threading.Lock())
    message = str(caught.value)
    assert "argument 'lock'" in message and "ignore=['lock']" in message
    assert "version=" in message and "Nothing was started" in message
    assert here.runs() == []
