"""Odd config values are refused when the config is built (or, for what depends on the machine,
when a run starts), each as a ``ConfigError`` naming the setting: never a traceback from deep inside."""

import copy
import dataclasses
import os
import random
import typing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mamlkit import config
from mamlkit.config import ConfigError, apply_overrides, load_raw
from mamlkit.experiments import build_config, configs, fewshot, load_config

GIB = 2**30


@pytest.fixture
def machine(monkeypatch):
    """A machine of 2 CPUs and 16 GiB, whatever runs the tests."""
    monkeypatch.setattr(configs, "usable_cpus", lambda: 2)
    monkeypatch.setattr(configs, "available_memory", lambda device: (16 * GIB, "MemAvailable"))


# -- sizes, counts and lists -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, item, message",
    [
        ("sinusoid", "model.hidden=[40, 0]", r"model.hidden: 0 out of range; allowed \[1, "),
        ("sinusoid", "model.hidden=[-3]", r"model.hidden: -3 out of range"),
        ("rl-navigation2d-tiny", "policy.hidden=[0]", r"policy.hidden: 0 out of range"),
        ("sinusoid", "eval.shots=[]", r"eval.shots: empty; give at least one value, e.g. eval.shots=\[5, 10, 20\]"),
        ("sinusoid", "eval.shots=[0]", r"eval.shots: 0 out of range"),
        ("sinusoid", "eval.tune_lrs=[]", r"eval.tune_lrs: empty; give at least one value"),
        ("sinusoid", "eval.tune_lrs=[-0.1]", r"eval.tune_lrs: -0.1 out of range"),
        ("rl-navigation2d-tiny", "eval.inner_lrs=[]", r"eval.inner_lrs: empty"),
        ("omniglot-5way-1shot", "eval.query=[]", r"eval.query: empty"),
        ("omniglot-5way-1shot", "eval.query=[papr]", r"eval.query: \['papr'\] not allowed.*did you mean 'paper'"),
        ("sinusoid", "train.iterations=99999999999", r"train.iterations: 99999999999 out of range; allowed \[1, "),
        ("sinusoid", "eval.num_tasks=1.0e+300", r"eval.num_tasks: \d+ out of range"),
        ("sinusoid", f"maml.inner_lr={10**400}", r"maml.inner_lr: \d+ is not a finite number"),
    ],
)
def test_sizes_counts_and_lists_have_ranges(preset, item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset, [item])


def test_an_empty_hidden_list_is_a_linear_model():
    assert load_config("sinusoid", ["model.hidden=[]"]).model.hidden == []
    assert load_config("rl-navigation2d-tiny", ["policy.hidden=[]"]).policy.hidden == []


def test_rl_tuning_candidates_may_be_empty_but_not_non_positive():
    assert load_config("rl-navigation2d-tiny", ["eval.tune_inner_lrs=[]"]).eval.tune_inner_lrs == []
    with pytest.raises(ConfigError, match=r"eval.tune_inner_lrs: step sizes must be positive"):
        load_config("rl-navigation2d-tiny", ["eval.tune_inner_lrs=[0.1, 0]"])


@pytest.mark.parametrize(
    "items, message",
    [
        (["task.k_shot=10", "task.q_query=15"], r"task.k_shot \+ task.q_query = 25: a omniglot class holds 20 images"),
        (["task.k_shot=10", "task.q_query=1"], r"its modern queries at test \(15\) = 25: .* lower task.k_shot or drop"),
        (["task.n_way=500"], r"task.n_way: 500-way tasks need 500 classes but the omniglot test split holds 423"),
        (["task.n_way=200", "train.validate_every=500"], r"omniglot val split holds 100"),
    ],
)
def test_fewshot_tasks_the_dataset_cannot_fill_are_refused(items, message):
    with pytest.raises(ConfigError, match=message):
        load_config("omniglot-5way-1shot", items)


def test_the_modern_query_count_is_the_experiments():
    assert configs.MODERN_QUERY == fewshot.MODERN_QUERY


# -- seeds -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, key",
    [
        ("sinusoid", "train.seed"),
        ("sinusoid", "eval.seed"),
        ("omniglot-5way-1shot", "eval.seed"),
        ("rl-navigation2d-tiny", "train.seed"),
        ("rl-navigation2d-tiny", "eval.seed"),
        ("rl-navigation2d-tiny", "eval.tune_seed"),
    ],
)
def test_seeds_are_refused_when_negative_or_too_large_for_their_offsets(preset, key):
    for value in (10**30, 2**32, config.SEED_HIGH + 1, -1):
        with pytest.raises(ConfigError, match=rf"{key}: {value} out of range; allowed \[0, {config.SEED_HIGH}\]"):
            load_config(preset, [f"{key}={value}"])
    cfg = load_config(preset, [f"{key}={config.SEED_HIGH}"])
    # The largest seed plus the offsets the experiments add (model index, +100, +1, +7, ...) is
    # still a seed that torch, numpy and random take.
    derived = config.SEED_HIGH + config.SEED_ROOM
    torch.Generator().manual_seed(derived)
    torch.manual_seed(derived)
    np.random.seed(derived)
    np.random.default_rng(derived)
    random.seed(derived)
    assert cfg is not None


# -- threads, memory --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, key",
    [("sinusoid", "train.threads"), ("rl-navigation2d-tiny", "train.threads"), ("rl-ant-dir", "env.sim_threads")],
)
def test_thread_counts_above_the_cpus_are_refused_when_a_run_starts(machine, preset, key):
    for value in (3, 10**9):
        cfg = load_config(preset, [f"{key}={value}"])  # a saved run's config still loads on a smaller machine
        with pytest.raises(
            ConfigError, match=rf"{key}={value}: more than the 2 CPUs this process may use; use at most 2"
        ):
            configs.check_machine(cfg)
    configs.check_machine(load_config(preset, [f"{key}=2"]))


def test_usable_cpus_is_the_affinity():
    assert 1 <= configs.usable_cpus() <= (os.cpu_count() or 1)


def test_every_shipped_preset_fits_a_16_gib_machine(machine):
    for name in config.preset_names():
        configs.check_memory(load_config(name))
        configs.check_machine(load_config(name))


@pytest.mark.parametrize(
    "preset, items, lower",
    [
        ("miniimagenet-5way-1shot", ["train.meta_batch_size=10000000"], "train.meta_batch_size"),
        ("miniimagenet-5way-1shot", ["eval.task_batch=100000"], "eval.task_batch"),
        ("omniglot-5way-1shot", ["task.n_way=1000", "task.k_shot=10", "task.q_query=10"], None),
        ("sinusoid", ["eval.num_tasks=100000000"], "eval.num_tasks"),
        ("sinusoid", ["model.hidden=[100000, 100000]"], "model.hidden"),
        ("rl-navigation2d", ["train.trajectories=10000000"], "train.trajectories"),
        ("rl-ant-dir", ["env.horizon=100000000"], "env.horizon"),
    ],
)
def test_sizes_beyond_the_memory_name_the_setting_to_lower(machine, preset, items, lower):
    try:
        cfg = load_config(preset, items)
    except ConfigError:  # refused already (a dataset too small for the tasks): fine too
        assert lower is None
        return
    with pytest.raises(ConfigError, match=r"needs roughly .*, more than the 16.0 GiB of memory available") as err:
        configs.check_memory(cfg)
    assert f"lower {lower} " in str(err.value), str(err.value)


def test_memory_is_not_checked_where_it_is_unknown(monkeypatch):
    monkeypatch.setattr(configs, "available_memory", lambda device: None)
    configs.check_memory(load_config("miniimagenet-5way-1shot", ["train.meta_batch_size=10000000"]))


def test_available_memory_reads_the_system():
    free, what = configs.available_memory("cpu")
    assert free > 0 and what


# -- --set ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.iterations=[1,", r"--set 'train.iterations=\[1,': the value '\[1,' is not valid YAML \("),
        ("maml.adapt={", r"--set 'maml.adapt=\{': the value '\{' is not valid YAML"),
        ("train.seed=@x", r"--set 'train.seed=@x': the value '@x' is not valid YAML"),
        ("=5", r"--set '=5': the key '' has an empty part"),
        ("train..seed=1", r"the key 'train..seed' has an empty part"),
        ("train.=1", r"the key 'train.' has an empty part"),
        ("train.seed", r"--set 'train.seed': expected key=value"),
        ("model.hidden.x=1", r"--set 'model.hidden.x=1': model.hidden is not a section \(it holds \[40, 40\]\)"),
        ("description.x.y=1", r"description is not a section"),
    ],
)
def test_a_bad_set_item_is_a_config_error_naming_it(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_raw("sinusoid"), [item])


@pytest.mark.parametrize("value", ["[1]", "{a: 1}", "null", "3"])
def test_an_experiment_that_is_not_a_name_is_refused(value):
    with pytest.raises(ConfigError, match=r"experiment: .* not allowed; choose from"):
        load_config("sinusoid", [f"experiment={value}"])


# -- every problem at once ----------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_suggestions():
    items = ["train.iteratons=5", "maml.inner_lr=-1", "task.amplitude=[5, 1]", "maml.strategy=vmpa", "modle.x=1"]
    with pytest.raises(ConfigError) as err:
        load_config("sinusoid", items)
    message = str(err.value)
    assert message.startswith("5 problems in the config:\n"), message
    assert len(err.value.problems) == 5 and len(message.splitlines()) == 6
    assert "unknown key 'train.iteratons' (did you mean 'train.iterations'?)" in message
    assert "maml.inner_lr: -1.0 out of range" in message
    assert "task.amplitude: expected [low, high]" in message
    assert "maml.strategy: 'vmpa' not allowed; choose from ['auto', 'loop', 'vmap'] (did you mean 'vmap'?)" in message
    assert "unknown key 'modle' (did you mean 'model'?)" in message
    with pytest.raises(ConfigError, match=r"unknown preset 'sinusiod' \(did you mean 'sinusoid'\?\)"):
        load_config("sinusiod")
    with pytest.raises(ConfigError, match=r"experiment: 'fewshoot' not allowed.*did you mean 'fewshot'"):
        load_config("sinusoid", ["experiment=fewshoot"])


def test_a_single_problem_reads_as_before():
    with pytest.raises(ConfigError) as err:
        load_config("sinusoid", ["train.iterations=0"])
    assert str(err.value) == "train.iterations: 0 out of range; allowed [1, 2147483647]"


def test_checks_across_settings_are_all_reported_but_not_about_a_refused_value():
    with pytest.raises(ConfigError) as err:
        load_config("rl-navigation2d-tiny", ["models=[maml,bogus]", "env.goal_range=[1, 0]", "maml.compile=true"])
    assert len(err.value.problems) == 3, str(err.value)
    # train.log_every is refused: the check that validate_every is its multiple would judge the
    # default standing in for it, so it says nothing.
    with pytest.raises(ConfigError) as err:
        load_config("omniglot-5way-1shot", ["train.log_every=0", "train.validate_every=7"])
    assert err.value.problems == ["train.log_every: 0 out of range; allowed [1, 2147483647]"]


def test_a_section_that_is_not_a_mapping_is_one_problem_among_others():
    with pytest.raises(ConfigError) as err:
        load_config("sinusoid", ["train=5", "eval.shots=[]"])
    assert err.value.problems == [
        "train: expected a mapping of settings, got 5",
        "eval.shots: empty; give at least one value, e.g. eval.shots=[5, 10, 20]",
    ]


# -- any --set: a config or a ConfigError, never another exception ------------------------------------


PRESETS = ("sinusoid", "omniglot-5way-1shot", "miniimagenet-5way-1shot", "rl-navigation2d-tiny", "rl-ant-dir")
RAW = {name: load_raw(name) for name in PRESETS}


def keys_of(cls, prefix: str = "") -> list[str]:
    """Every setting of a config class, dotted."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out += keys_of(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
    return out


KEYS = sorted({k for cls in configs.CONFIGS.values() for k in keys_of(cls)})


def misspelt(key: str) -> st.SearchStrategy:
    return st.integers(0, len(key) - 1).map(lambda i: key[:i] + key[i + 1 :] or "x")


VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "-1",
            "-0.5",
            "1",
            "2",
            "3",
            "10**30",
            str(10**30),
            str(-(10**30)),
            str(2**63),
            "1e400",
            "1.0e300",
            ".nan",
            ".inf",
            "-.inf",
            "nan",
            "1e-3",
            "0.0",
            "true",
            "false",
            "null",
            "~",
            "''",
            "abc",
            "[]",
            "[0]",
            "[-1, 5]",
            "[1, 2]",
            "[[1]]",
            "[.nan]",
            "[abc]",
            "{}",
            "{a: 1}",
            "{random: [0.1]}",
            "{oracle: []}",
            "[1,",
            "{",
            "]",
            "@x",
            "'unterminated",
            "!!python/object:os.system x",
            "2020-01-01",
            "a: b: c",
            "cpu",
            "cuda",
            "auto",
            "vmap",
            "paper",
            "maml",
            "[maml]",
            "[maml, maml]",
            "{[1]: 2}",
            "- 1\n- 2",
        ]
    ),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)
ITEMS = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.sampled_from(KEYS).flatmap(misspelt).flatmap(lambda k: VALUES.map(lambda v: f"{k}={v}")),
    st.text(max_size=20),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(preset=st.sampled_from(PRESETS), items=st.lists(ITEMS, min_size=1, max_size=3))
def test_any_set_item_builds_or_is_a_config_error(preset, items):
    try:
        cfg = build_config(apply_overrides(copy.deepcopy(RAW[preset]), items))
    except ConfigError:
        return
    try:
        configs.check_machine(cfg)
    except ConfigError:
        pass
