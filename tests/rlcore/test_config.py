"""Config composition, validation and the CLI's config errors."""


import pytest

from conftest import REPO, run_cli
from rlcore.config import RLConfig
from rlcore.recipe import ConfigError, builtin_recipes, compose, field_docs, to_yaml
from rlcore.validate import validate


def test_quickstart_composes_and_validates():
    cfg, path = compose(None, [])
    assert isinstance(cfg, RLConfig) and path.name == "quickstart.yaml"
    plan = validate(cfg)
    assert plan.seqs_per_step == cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_builtin_recipe_composes_and_validates(name, saved_model, tmp_path):
    cfg, _ = compose(name, [])
    if cfg.model.path is not None:
        # Real-size recipes point at weights and data that are not here: swap in a local model and an
        # existing file so every other rule of the recipe is still validated.
        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
        cfg, _ = compose(name, [f"model.path={saved_model('qwen2')}", f"data.train_files=[{data}]",
                                f"data.eval_files=[{data}]"])
    validate(cfg)


def test_override_sets_nested_value():
    cfg, _ = compose("quickstart", ["algo.policy_loss.clip_high=0.28", "rollout.stop=[';']"])
    assert cfg.algo.policy_loss.clip_high == 0.28 and cfg.rollout.stop == [";"]


def test_misspelt_key_in_recipe_names_key_and_file(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("defaults:\n  - rlcore\n  - _self_\nalgo:\n  policy_loss:\n    clip_hgh: 0.3\n")
    with pytest.raises(ConfigError) as e:
        compose(str(recipe), [])
    assert "clip_hgh" in str(e.value) and str(recipe) in str(e.value)


def test_unknown_override_and_wrong_type_name_the_key():
    with pytest.raises(ConfigError, match="train.lrr"):
        compose(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt"):
        compose(None, ["rollout.samples_per_prompt=many"])


@pytest.mark.parametrize("override, hint", [
    ("+train.learning_rate=5", "train.lr"),      # `+` used to add the key unchecked, then drop it
    ("train.lrr=0.1", "train.lr"),
    ("train.total_steps=3", "trainer.total_steps"),
    ("rollout.max_new_token=3", "rollout.max_new_tokens"),
    ("++algo.kl.coeff=1", "algo.kl.coef"),
])
def test_every_override_is_checked_and_the_nearest_key_suggested(override, hint):
    with pytest.raises(ConfigError) as e:
        compose(None, [override])
    msg = str(e.value)
    assert f"did you mean {hint}?" in msg
    assert "To append" not in msg and f"+{override.lstrip('+').split('=')[0]}=" not in msg.split("unknown key")[1]


def test_plus_on_a_schema_key_is_a_plain_override_and_free_form_args_still_add():
    cfg, _ = compose(None, ["+train.lr=5", "+reward.terms.0.args.answer_key=target", "reward.terms.0.weight=2"])
    assert cfg.train.lr == 5.0
    assert cfg.reward.terms[0].args == {"answer_key": "target"} and cfg.reward.terms[0].weight == 2.0


def test_typo_in_a_recipe_file_suggests_the_nearest_key(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("defaults:\n  - rlcore\n  - _self_\nalgo:\n  policy_loss:\n    clip_hgh: 0.3\n")
    with pytest.raises(ConfigError, match=r"did you mean algo\.policy_loss\.clip_high\?"):
        compose(str(recipe), [])


def test_recipe_without_schema_defaults_is_refused(tmp_path):
    recipe = tmp_path / "bare.yaml"
    recipe.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="defaults"):
        compose(str(recipe), [])


def test_unknown_recipe_lists_builtins():
    with pytest.raises(ConfigError, match="quickstart"):
        compose("no_such_recipe", [])


@pytest.mark.parametrize("override, key", [
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
    ("train.minibatches_per_step=7", "train.minibatches_per_step"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("algo.policy_loss.dual_clip=0.5", "algo.policy_loss.dual_clip"),
    ("algo.estimator=ppo_typo", "algo.estimator"),
    ("rollout.engine=nope", "rollout.engine"),
    ("model.path=/does/not/exist", "model.path"),
    ("data.train_files=[/no/such.jsonl]", "data.train_files"),
    ("train.max_tokens_per_microbatch=16", "train.max_tokens_per_microbatch"),
])
def test_validate_names_the_key_to_change(override, key):
    cfg, _ = compose(None, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_turns=3"], r"rollout\.max_turns=3 but rollout\.tools is empty"),
    (["rollout.tools=[{name: calculator}]", "data.apply_chat_template=true"], r"needs rollout\.max_turns >= 2"),
    (["rollout.tools=[{name: calculator}]", "rollout.max_turns=2"], r"set data\.apply_chat_template=true"),
    (["rollout.tools=[{name: abacus}]", "rollout.max_turns=2", "data.apply_chat_template=true"],
     r"rollout\.tools\[0\]\.name='abacus': unknown tool"),
    (["rollout.tools=[{name: calculator}]", "rollout.max_turns=2", "data.apply_chat_template=true",
      "rollout.tool_format=python_block"], r"python_block calls the tool named python"),
])
def test_tool_settings_name_the_key_to_change(overrides, message):
    cfg, _ = compose(None, overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_output_dir_naming_an_existing_file_names_the_key(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    cfg, _ = compose(None, [f"trainer.output_dir={tmp_path / 'notes.txt'}"])
    with pytest.raises(ConfigError, match=r"trainer\.output_dir=.*notes\.txt' is an existing file"):
        validate(cfg)


def test_missing_reward_file_fails_before_training(tmp_path):
    cfg, _ = compose(None, ["reward.terms=[{name: 'python:missing_reward.py:score'}]"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "missing_reward.py" in str(e.value) and "reward.terms[0].name" in str(e.value)


def test_cli_reports_config_errors_without_traceback(tmp_path):
    proc = run_cli("train", "train.lrr=1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "train.lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert "did you mean train.lr?" in proc.stderr and "+train.lrr" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing created before the config is valid


def test_ls_lists_registries(tmp_path):
    out = run_cli("ls", cwd=tmp_path).stdout
    for name in ("quickstart", "grpo", "vanilla", "token-mean", "k3", "exact", "math", "format", "hf", "arithmetic"):
        assert name in out


def test_help_prints_every_field_doc(tmp_path):
    out = run_cli("train", "--help", cwd=tmp_path).stdout
    docs = field_docs()
    assert all(doc for _, _, doc in docs), [k for k, _, d in docs if not d]
    assert all(key in out for key, _, _ in docs)


def test_reference_config_is_current():
    """docs/reference_config.yaml is the fully resolved default config; regenerate it when the schema changes:
    python -c "from rlcore.recipe import to_yaml; from rlcore.config import RLConfig; print(to_yaml(RLConfig()), end='')" > docs/reference_config.yaml
    """
    assert (REPO / "docs" / "reference_config.yaml").read_text() == to_yaml(RLConfig())


def test_config_is_frozen_after_validation():
    from rlcore.config import freeze

    cfg, _ = compose(None, [])
    validate(cfg)
    freeze(cfg)
    with pytest.raises(AttributeError, match="frozen"):
        cfg.train.lr = 1.0
    with pytest.raises(AttributeError, match="frozen"):
        cfg.reward.terms[0].weight = 2.0


def test_algorithms_page_names_every_registered_key():
    from algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES

    page = (REPO / "docs" / "algorithms.md").read_text()
    for table in (ADVANTAGES, POLICY_LOSSES, AGGREGATIONS, KL_ESTIMATORS):
        for name in table:
            assert f"`{name}`" in page, f"docs/algorithms.md does not mention {name!r}"
    for recipe in builtin_recipes():
        assert "arith" not in recipe or f"`{recipe}`" in page, f"docs/algorithms.md lacks recipe {recipe!r}"
