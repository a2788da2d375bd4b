"""The parity loader itself: an explicit folder must exist, only the default may be absent."""
import pytest

from . import harness


def test_explicit_missing_folder_is_fatal(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPIR_PARITY_DIR", str(tmp_path / "nope"))
    (problem,) = harness.load_cases("supir")
    assert isinstance(problem, harness.FolderProblem) and problem.fatal
    with pytest.raises(pytest.fail.Exception, match="does not exist"):
        harness.run_case(problem)


def test_explicit_empty_folder_is_fatal(monkeypatch, tmp_path):
    monkeypatch.setenv("CODEFORMER_PARITY_DIR", str(tmp_path))
    (problem,) = harness.load_cases("codeformer")
    assert problem.fatal
    with pytest.raises(pytest.fail.Exception, match="no case files"):
        harness.run_case(problem)


def test_missing_default_folder_skips(monkeypatch, tmp_path):
    monkeypatch.delenv("SUPIR_PARITY_DIR", raising=False)
    monkeypatch.setitem(harness.FAMILIES, "supir", ("SUPIR_PARITY_DIR", tmp_path / "absent", "*.json"))
    (problem,) = harness.load_cases("supir")
    assert not problem.fatal
    with pytest.raises(pytest.skip.Exception, match="absent"):
        harness.run_case(problem)


def test_every_case_file_is_collected(monkeypatch, tmp_path):
    (tmp_path / "cases").mkdir()
    for name in ("b", "a"):
        (tmp_path / "cases" / f"{name}.json").write_text('{"kind": "k", "name": "%s"}' % name)
    monkeypatch.setenv("CODEFORMER_PARITY_DIR", str(tmp_path))
    cases = harness.load_cases("codeformer")
    assert [c.name for c in cases] == ["a", "b"]
    ids = [p.id for p in harness.case_params("codeformer")]
    assert ids == ["codeformer-a", "codeformer-b"]
