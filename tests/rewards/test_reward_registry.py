"""Registry, name resolution, python: user rewards, and config checks at construction."""

import pytest

from rewards import REWARDS, CompositeReward, register, resolve_reward

# Registry gate (STYLE §22): every built-in needs a test; add yours here with its test file.
TESTED = {"exact": "test_reward_rule.py", "format": "test_reward_rule.py", "math": "test_reward_math.py",
          "contains": "test_reward_rule.py", "choice": "test_reward_rule.py", "length": "test_reward_rule.py",
          "code": "test_code_reward.py"}


def test_every_registered_reward_is_tested():
    assert set(REWARDS) == set(TESTED)


def test_register_rejects_duplicates():
    @register("_test_dup")
    def first(prompt, response, row):
        return 1.0

    try:
        assert resolve_reward("_test_dup") is first
        with pytest.raises(ValueError, match="already registered"):
            register("_test_dup")(lambda p, r, row: 0.0)
    finally:
        del REWARDS["_test_dup"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown reward 'mth'; valid names: choice, code, contains, exact, format, length, math, orm, prm"):
        resolve_reward("mth")


def test_python_reward_loads_by_relative_and_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text("def score(prompt, response, row):\n    return len(response) / 10\n")
    monkeypatch.chdir(tmp_path)
    fn = resolve_reward("python:my_reward.py:score")
    assert fn("p", "abcde", {}) == 0.5
    assert resolve_reward(f"python:{tmp_path / 'my_reward.py'}:score") is fn  # imported once


def test_python_reward_missing_file_names_file_and_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'rw/missing\.py' not found.*fix the reward\[i\]\.name key"):
        resolve_reward("python:rw/missing.py:score")
    with pytest.raises(FileNotFoundError, match=r"^reward\[1\]: .*'rw/missing\.py'.*fix the reward\[1\]\.name key"):
        CompositeReward([("exact", 1.0, {}), ("python:rw/missing.py:score", 1.0, {})])


def test_python_reward_missing_function(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def other(prompt, response, row):\n    return 0.0\n")
    with pytest.raises(AttributeError, match=rf"{path} has no function 'score'"):
        resolve_reward(f"python:{path}:score")
    with pytest.raises(ValueError, match="expected python:path/to/file.py:fn"):
        resolve_reward(f"python:{path}")


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (("mth", 1.0, {}), ValueError, r"^reward\[1\]: unknown reward 'mth'; valid names"),
        (("exact", 1.0, {"answer_kye": "x"}), TypeError, r"^reward\[1\] \(exact\): bad kwargs"),
        (("exact", "1", {}), TypeError, r"^reward\[1\] \(exact\): weight must be a finite number"),
        (("exact", 1.0), ValueError, r"^reward\[1\]: expected \(name, weight, kwargs\)"),
    ],
)
def test_bad_spec_fails_at_construction_naming_its_index(spec, error, match):
    with pytest.raises(error, match=match):
        CompositeReward([("format", 1.0, {}), spec])
