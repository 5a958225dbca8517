"""Start-up validation: every bad value fails naming its key."""

import subprocess
import sys

import pytest

from configs import base, synthetic
from distill_jax import config_lib


def _cfg():
    return synthetic.get_config("tiny")


def test_defaults_are_valid():
    config_lib.validate(synthetic.get_config())
    config_lib.validate(synthetic.get_config("tiny"))
    config_lib.validate(base.get_base_config())


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("distill.temperature", 0.0, r"config\.distill\.temperature=0\.0.*> 0"),
        ("distill.temperature", -1.0, r"config\.distill\.temperature"),
        ("distill.temperature", float("inf"), r"config\.distill\.temperature=inf.*finite"),
        ("data.delimiter", ";;", r"config\.data\.delimiter=';;'.*one character"),
        ("distill.alpha", 1.5, r"config\.distill\.alpha=1\.5.*\[0, 1\]"),
        ("distill.alpha", -0.1, r"config\.distill\.alpha"),
        ("student.name", "transformer9000", r"config\.student\.name='transformer9000'.*sasrec"),
        ("teacher.dropout", 1.0, r"config\.teacher\.dropout"),
        ("student.mask_last_prob", 1.5, r"config\.student\.mask_last_prob=1\.5.*\[0, 1\]"),
        ("teacher.embed_dim", 15, r"config\.teacher\.embed_dim=15.*num_heads"),
        ("student.num_blocks", 0, r"config\.student\.num_blocks=0.*> 0"),
        ("student.dtype", "float16", r"config\.student\.dtype='float16'"),
        ("stages", "teacher,distill", r"config\.stages"),
        ("distill.method", "medium", r"config\.distill\.method='medium'.*'soft', 'hard'"),
        ("loss.form", "plain", r"config\.loss\.form='plain'.*'dense'"),
        ("student_scratch.learning_rate", 0.0, r"config\.student_scratch\.learning_rate=0\.0"),
        ("student_scratch.dropout", 1.0, r"config\.student_scratch\.dropout=1\.0.*\[0, 1\)"),
        ("student_scratch.weight_decay", -0.5, r"config\.student_scratch\.weight_decay"),
    ],
)
def test_bad_value_names_key(key, value, match):
    config = _cfg()
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(config)


def test_a_rating_threshold_needs_a_source_with_ratings():
    config = _cfg()
    config.data.update(source="s3rec", path="Beauty.txt", rating_threshold=4.0)
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.rating_threshold=4\.0"):
        config_lib.validate(config)


def test_last_item_slot_needs_a_causal_student_and_a_form_with_teacher_only_slots():
    config = _cfg()
    config.distill.last_item_slot = True
    config_lib.validate(config)  # sasrec student, plain loss: fine
    config.student.name = config.teacher.name = "bert4rec"
    with pytest.raises(config_lib.ConfigError, match=r"config\.distill\.last_item_slot.*causal"):
        config_lib.validate(config)
    config = _cfg()
    config.distill.last_item_slot = True
    config.loss.form = "cpu_kernel"  # the fused kernel has teacher-only rows too
    config_lib.validate(config)
    config.loss.form = "chunked"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config\.distill\.last_item_slot.*'soft'.*'chunked'"
        r".*\('dense', 'cpu_kernel', 'pallas'\)",
    ):
        config_lib.validate(config)
    config.distill.method = "hard"  # the chunked hard target has them
    config_lib.validate(config)


def test_exclude_history_needs_a_causal_model_and_a_form_that_excludes():
    config = _cfg()
    config.student.exclude_history = True
    config_lib.validate(config)  # sasrec student, plain loss: fine
    config.student.name = config.teacher.name = "bert4rec"
    with pytest.raises(config_lib.ConfigError, match=r"config\.student\.exclude_history.*bert4rec"):
        config_lib.validate(config)
    config = _cfg()
    config.teacher.exclude_history = True
    config.loss.form = "cpu_kernel"  # the kernel excludes for every target it has
    config.student.exclude_history = True
    config_lib.validate(config)
    config = _cfg()
    config.student_scratch.exclude_history = 1
    config.loss.form = "chunked"
    config_lib.validate(config)
    config.loss.form = "vocab_parallel"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config\.student_scratch\.exclude_history.*'vocab_parallel'.*'label'",
    ):
        config_lib.validate(config)
    config = _cfg()
    config.student_scratch.exclude_history = 2
    with pytest.raises(config_lib.ConfigError, match=r"config\.student_scratch\.exclude_history=2"):
        config_lib.validate(config)


def test_scratch_exclude_history_overrides_the_students():
    config = _cfg()
    config.student.exclude_history = True
    assert config_lib.stage_model_config(config, "student_scratch", "student").exclude_history
    config.student_scratch.exclude_history = 0
    assert config_lib.stage_model_config(config, "student_kd", "student").exclude_history is True
    scratch = config_lib.stage_model_config(config, "student_scratch", "student")
    assert scratch.exclude_history is False


def test_teacher_and_student_must_share_max_len_and_catalogue():
    config = _cfg()
    config.student.max_len = config.teacher.max_len + 1
    with pytest.raises(config_lib.ConfigError, match=r"config\.student\.max_len.*teacher"):
        config_lib.validate(config)
    config = _cfg()
    config.teacher.num_items = 100
    with pytest.raises(config_lib.ConfigError, match=r"config\.student\.num_items.*teacher"):
        config_lib.validate(config)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="configs/synthetic.py.*'huge'"):
        synthetic.get_config("huge")


def test_unknown_key_is_refused_on_the_command_line(tmp_path):
    # The config is locked: an override of a key base.py does not declare fails
    # before anything runs, and the message names the key.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_jax.main",
            f"--workdir={tmp_path}",
            "--config.student.embed_dimm=32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "embed_dimm" in out.stderr
    assert not (tmp_path / "teacher").exists()


def test_invalid_override_fails_at_start_up(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_jax.main",
            f"--workdir={tmp_path}",
            "--config.distill.temperature=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "config.distill.temperature" in out.stderr
    # One line naming the key, no traceback.
    assert "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "teacher").exists()


@pytest.mark.parametrize(
    "module,num_items",
    [("beauty", 12101), ("ml100k", 1682), ("synthetic", 1000)],
)
@pytest.mark.parametrize("variant", [None, "bert4rec"])
def test_dataset_configs_student_is_at_most_an_eighth_of_the_teacher(module, num_items, variant):
    """The dataset configs' students keep <= 1/8 of their teacher's parameters.

    `num_items` is each dataset's catalogue after our cleaning (the figures
    the main job logs), so the count is the one the report shows.
    """
    import importlib

    from distill_jax import models
    from distill_jax.train import state as state_lib

    config = importlib.import_module(f"configs.{module}").get_config(variant)
    counts = {}
    for key in ("teacher", "student"):
        model = models.build_model(
            config[key], num_items=num_items, max_len=config[key].max_len, key_prefix=key
        )
        counts[key] = models.count_params(state_lib.abstract_params(model))
    assert counts["student"] * 8 <= counts["teacher"], counts


def test_scratch_student_takes_its_own_settings_and_the_shared_architecture():
    config = _cfg()
    config.student.update(learning_rate=1e-2, dropout=0.1, weight_decay=0.0)
    config.student_scratch.weight_decay = 0.5
    config.student_scratch.dropout = 0.3
    config_lib.validate(config)
    scratch = config_lib.stage_model_config(config, "student_scratch", "student")
    kd = config_lib.stage_model_config(config, "student_kd", "student")
    assert (scratch.weight_decay, scratch.dropout, scratch.learning_rate) == (0.5, 0.3, 1e-2)
    assert (kd.weight_decay, kd.dropout, kd.learning_rate) == (0.0, 0.1, 1e-2)
    for key in ("name", "embed_dim", "num_blocks", "num_heads", "mlp_dim", "num_steps"):
        assert scratch[key] == kd[key] == config.student[key], key
    assert config.student.weight_decay == 0.0  # the shared subtree is not modified
    assert config_lib.stage_model_config(config, "teacher", "teacher") is config.teacher


def test_scratch_student_cannot_override_the_architecture():
    config = _cfg()
    config.student_scratch.embed_dim = 32
    with pytest.raises(config_lib.ConfigError, match=r"config\.student_scratch=.*learning_rate"):
        config_lib.validate(config)
