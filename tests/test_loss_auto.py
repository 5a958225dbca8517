"""config.loss.form='auto' (distill_jax/losses/auto.py): which form it picks where, what
it logs, and that a step through it has the dense form's loss and gradients."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from configs import base
from distill_jax import config_lib, losses, models
from distill_jax import sharding as sharding_lib
from distill_jax.compress import quantize
from distill_jax.losses import auto, kernel_lib
from distill_jax.train import state as state_lib
from distill_jax.train import steps
from tests import test_train

NO_COMPILER = "config.loss.form='cpu_kernel' (and 'auto' on the CPU) needs a C++20 compiler"


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Each test sees its own choices logged (they are logged once per process)."""
    monkeypatch.setattr(auto, "_logged", set())


@pytest.fixture
def built(monkeypatch):
    """The kernel builds (whatever this machine has)."""
    monkeypatch.setattr(kernel_lib, "unavailable_reason", lambda: None)


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setattr(kernel_lib, "unavailable_reason", lambda: NO_COMPILER + " ...")


def _pick(target, backend="cpu", devices=1, shards=1, **options):
    where = auto.Where(backend, devices, shards)
    return losses.resolve_form("auto", target, where, **options)


# (target, options, devices, vocab shards) -> the form 'auto' picks on the CPU
# with the kernel built.
CPU_PICKS = [
    ("label", {}, 1, 1, "cpu_kernel"),
    ("label", {"exclude_history": True}, 1, 1, "cpu_kernel"),
    ("soft", {}, 1, 1, "cpu_kernel"),
    ("soft", {"teacher_only_slots": True}, 1, 1, "cpu_kernel"),
    ("soft", {"exclude_history": True, "teacher_only_slots": True}, 1, 1, "cpu_kernel"),
    ("hard", {"exclude_history": True, "teacher_only_slots": True}, 1, 1, "cpu_kernel"),
    ("ensemble", {}, 1, 1, "dense"),
    ("ranking", {}, 1, 1, "dense"),
    ("cached", {}, 1, 1, "dense"),
    # Rows split along 'data', the table whole on every device.
    ("label", {"exclude_history": True}, 8, 1, "cpu_kernel"),
    ("soft", {"teacher_only_slots": True}, 8, 1, "cpu_kernel"),
    ("ensemble", {}, 8, 1, "dense"),
    # A vocab-sharded table: the kernel's blocks.
    ("label", {}, 8, 4, "cpu_kernel"),
    ("label", {"exclude_history": True}, 8, 4, "cpu_kernel"),
    ("soft", {"teacher_only_slots": True}, 8, 4, "cpu_kernel"),
    ("hard", {}, 8, 4, "cpu_kernel"),
    ("ranking", {}, 8, 4, "dense"),
]


@pytest.mark.parametrize("target,options,devices,shards,form", CPU_PICKS)
def test_auto_picks_on_the_cpu_as_documented(built, target, options, devices, shards, form):
    assert _pick(target, devices=devices, shards=shards, **options) == form


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerators_keep_to_xla_forms_until_pallas_is_measured(built, backend):
    assert auto.ACCELERATOR_FORMS == ()
    assert _pick("soft", backend=backend) == "dense"
    assert _pick("label", backend=backend, devices=8, shards=2) == "vocab_parallel"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerator_forms_get_pallas_else_vocab_parallel_or_dense_and_the_log_says_why(
    built, backend, caplog, monkeypatch
):
    monkeypatch.setattr(auto, "ACCELERATOR_FORMS", ("pallas",))
    with caplog.at_level(logging.INFO, logger=auto.__name__):
        assert _pick("soft", backend=backend) == "pallas"
        # No vocab-sharded pallas form: that mesh keeps its own.
        assert _pick("label", backend=backend, devices=8, shards=2) == "vocab_parallel"
        assert _pick("ranking", backend=backend) == "dense"  # no pallas form
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert f"chose 'pallas' for the 'soft' target ({backend} backend" in lines[0]
    assert "the fused Pallas kernels" in lines[0]
    assert "not 'cpu_kernel'" not in lines[0]  # never tried off the CPU
    assert "not 'pallas': has no vocab-sharded form (2 shards)" in lines[1]
    assert "not 'pallas': no such pair" in lines[2]


def test_without_a_compiler_auto_falls_back_in_one_line_naming_what_to_install(no_compiler, caplog):
    with caplog.at_level(logging.INFO, logger=auto.__name__):
        assert _pick("label", shards=1) == "dense"
        assert _pick("soft", devices=8, shards=2) == "vocab_parallel"
    first = caplog.records[0].getMessage()
    assert first.startswith("config.loss.form='auto' falls back to 'dense' for the 'label' target")
    assert "needs a C++20 compiler" in first and "\n" not in first
    assert caplog.records[0].levelno == logging.WARNING


def test_a_form_limited_to_some_meshes_is_passed_over_elsewhere(built):
    dense = losses.PAIRS[("label", "dense")]
    kernel = losses.PAIRS[("label", "cpu_kernel")]
    for meshes, where, why in [
        ("data", auto.Where("cpu", 8, 2), "has no vocab-sharded form (2 shards)"),
        ("one", auto.Where("cpu", 8, 1), "runs on one device, the mesh has 8"),
    ]:
        pairs = {
            ("label", "dense"): dense,
            ("label", "cpu_kernel"): dataclasses.replace(kernel, meshes=meshes),
        }
        choice = auto.choose(pairs, "label", where)
        assert choice.form == "dense" and f"not 'cpu_kernel': {why}" in choice.reason
        assert auto.choose(pairs, "label", auto.Where("cpu")).form == "cpu_kernel"


def test_a_model_wider_than_the_kernels_limit_stays_on_dense(built):
    """On the CPU the kernel serves narrow models (students); a teacher of width
    128 trains faster with XLA's own products (auto.CPU_KERNEL_MAX_WIDTH)."""
    limit = auto.CPU_KERNEL_MAX_WIDTH
    for target in ("label", "soft", "hard"):
        assert _choose(target, auto.Where("cpu", width=limit)).form == "cpu_kernel"
        wide = _choose(target, auto.Where("cpu", width=2 * limit))
        assert wide.form == "dense" and not wide.fallback
        assert f"not 'cpu_kernel': slower than XLA's products above width {limit}" in wide.reason
        # Width 0 (unknown) and other backends are not affected.
        assert _choose(target, auto.Where("cpu")).form == "cpu_kernel"
    assert _choose("label", auto.Where("gpu", width=512)).form == "dense"
    # A form the config names runs at any width.
    assert losses.resolve_form("cpu_kernel", "label", auto.Where("cpu", width=512)) == "cpu_kernel"


def _choose(target, where):
    return auto.choose(losses.PAIRS, target, where)


def test_the_choice_says_why_and_is_logged_once(built, caplog):
    with caplog.at_level(logging.INFO, logger=auto.__name__):
        for _ in range(3):  # e.g. the teacher and the scratch student
            _pick("label", backend="gpu", devices=2, shards=2, exclude_history=True)
        _pick("ensemble", devices=2, shards=2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "chose 'dense' for the 'label' target" in lines[0]
    assert "not 'vocab_parallel': does not exclude history" in lines[0]
    assert "chose 'dense' for the 'ensemble' target" in lines[1]
    assert "not 'cpu_kernel': no such pair" in lines[1]


def test_a_named_form_that_cannot_run_here_is_refused_naming_the_key(built):
    where = auto.Where("gpu")
    with pytest.raises(ValueError, match=r"config\.loss\.form='cpu_kernel' runs on cpu only"):
        losses.resolve_form("cpu_kernel", "label", where)
    assert losses.resolve_form("dense", "label", where) == "dense"


def test_auto_is_the_default_and_validates_with_every_option():
    config = base.get_base_config()
    assert config.loss.form == "auto"
    for method in losses.TEACHER_TARGETS:
        config = base.get_base_config()
        config.distill.method = method
        config.student.exclude_history = config.teacher.exclude_history = True
        config.distill.last_item_slot = True
        config_lib.validate(config)


# That 'auto' trains exactly as 'dense': every form it may choose is checked
# against dense (tests/test_kernels.py: two optimiser steps through the kernel,
# on one device and on meshes; tests/test_loss_registry.py: every pair), and
# the main-job tests run on 'auto', the default.


@pytest.mark.parametrize(
    "task,mesh_shape,want",
    [
        ("train", (1, 1), "cpu_kernel"),
        ("distill", (1, 1), "cpu_kernel"),
        ("train", (8, 1), "cpu_kernel"),
        ("train", (2, 4), "cpu_kernel"),
    ],
)
def test_the_train_step_resolves_auto_for_its_mesh(built, task, mesh_shape, want):
    config = test_train._distill_config()
    config.mesh.data, config.mesh.model = mesh_shape
    mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[: np.prod(mesh_shape)])
    model = models.build_model(config.student, num_items=63, max_len=config.student.max_len)
    state, shard = state_lib.create_state(
        model, config.student, mesh, sharding_lib.rules(config), jax.random.key(0)
    )
    teacher = model if task == "distill" else None
    step = steps.make_train_step(
        model,
        task=task,
        mesh=mesh,
        state_shardings=shard,
        teacher=teacher,
        teacher_shardings=shard.params if teacher else None,
        distill_cfg=config.distill,
        loss_cfg=config.loss,
    )
    assert step.loss_form == want


def test_a_quantization_aware_model_keeps_to_forms_that_call_its_logits(built):
    """int8_qat fine-tuning: the catalogue scores are quantized inside the model's
    `logits`, which the fused forms would bypass."""
    config = test_train._distill_config()
    mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    model = models.build_model(config.student, num_items=63, max_len=config.student.max_len)
    qat = quantize.qat_model(model)
    assert model.plain_logits and not qat.plain_logits
    forms = {}
    for m in (model, qat):
        _, shard = state_lib.create_state(
            m, config.student, mesh, sharding_lib.rules(config), jax.random.key(0)
        )
        step = steps.make_train_step(
            m, task="train", mesh=mesh, state_shardings=shard, loss_cfg=config.loss
        )
        forms[m is qat] = step.loss_form
    assert forms == {False: "cpu_kernel", True: "dense"}
