"""Presets that build on other presets (``base:``), and how they are shown and checked."""

from importlib import resources

import pytest
import yaml

from mamlkit import cli, config
from mamlkit.experiments import load_config


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def leaves(d: dict, prefix: str = "") -> dict:
    """``{"a.b": value}`` for every non-mapping value of a nested dict."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def shipped(name: str) -> dict:
    """A shipped preset's file as written (its ``base`` not resolved)."""
    return yaml.safe_load((resources.files("mamlkit.presets") / f"{name}.yaml").read_text())


BASE = """\
experiment: sinusoid
description: the base
models: [maml, pretrained]
train:
  iterations: 100
  meta_batch_size: 5
maml:
  inner_lr: 0.02
eval:
  shots: [5, 10]
  steps: 4
"""


def test_a_variant_is_its_base_plus_its_changes(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    variant = write(
        tmp_path / "variant.yaml",
        "base: base.yaml\ndescription: the variant\ntrain:\n  iterations: 7\nmaml:\n  first_order: true\n",
    )
    raw = config.load_raw(str(variant))
    assert raw == {
        "experiment": "sinusoid",
        "description": "the variant",
        "models": ["maml", "pretrained"],
        "train": {"iterations": 7, "meta_batch_size": 5},
        "maml": {"inner_lr": 0.02, "first_order": True},
        "eval": {"shots": [5, 10], "steps": 4},
    }
    cfg = load_config(str(variant), ["train.meta_batch_size=3"])  # --set applies over the merged result
    assert (cfg.train.iterations, cfg.train.meta_batch_size, cfg.maml.inner_lr) == (7, 3, 0.02)
    assert cfg.maml.first_order and cfg.eval.shots == [5, 10]


def test_deep_merge_merges_mappings_and_replaces_lists_and_scalars(tmp_path):
    write(
        tmp_path / "base.yaml",
        "a:\n  b:\n    c: 1\n    d: [1, 2, 3]\n  e: x\nf: [1, 2]\ng: {h: 1}\nkeep: {k: 1}\n",
    )
    variant = write(
        tmp_path / "v.yaml",
        "base: base.yaml\na:\n  b:\n    d: [9]\n    new: 2\nf: [3]\ng: 5\nadded: {z: 1}\n",
    )
    assert config.load_raw(str(variant)) == {
        "a": {"b": {"c": 1, "d": [9], "new": 2}, "e": "x"},  # nested mappings merge key by key
        "f": [3],  # a list replaces the base's list, it is not appended to
        "g": 5,  # a scalar replaces even a mapping
        "keep": {"k": 1},
        "added": {"z": 1},
    }
    assert "base" not in config.load_raw(str(variant))
    assert config.load_raw(str(tmp_path / "base.yaml"))["a"]["b"]["d"] == [1, 2, 3], "the base file is untouched"


def test_a_base_can_be_a_shipped_preset_and_bases_chain(tmp_path):
    write(tmp_path / "mid.yaml", "base: sinusoid\ndescription: mid\ntrain:\n  iterations: 50\n")
    top = write(tmp_path / "top.yaml", "base: mid.yaml\ndescription: top\nmodels: [maml]\n")
    raw = config.load_raw(str(top))
    want = config.load_raw("sinusoid")
    want.update(description="top", models=["maml"])
    want["train"]["iterations"] = 50
    assert raw == want
    assert load_config(str(top)).train.meta_batch_size == 25


def test_a_relative_base_is_found_next_to_the_file_that_names_it(tmp_path, monkeypatch):
    write(tmp_path / "shared" / "common.yaml", BASE)
    variant = write(tmp_path / "exp" / "one" / "v.yaml", "base: ../../shared/common.yaml\neval:\n  steps: 2\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not where the files are: the base is found from the variant's folder
    raw = config.load_raw(str(variant))
    assert raw["eval"] == {"shots": [5, 10], "steps": 2} and raw["train"]["iterations"] == 100
    monkeypatch.chdir(tmp_path / "exp")
    assert config.load_raw("one/v.yaml") == raw  # the variant given by a relative path too


def test_a_cycle_is_refused_with_the_chain(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\nexperiment: sinusoid\n")
    write(tmp_path / "b.yaml", "base: ./c.yaml\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(config.ConfigError, match="cycle") as err:
        config.load_raw(str(a))
    message = str(err.value)
    assert message.index("a.yaml") < message.index("b.yaml") < message.index("c.yaml")
    assert message.count("a.yaml") == 2, message  # the chain ends where it started
    itself = write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(config.ConfigError, match="cycle"):
        config.load_raw(str(itself))


def test_an_unknown_or_missing_base_is_refused(tmp_path):
    variant = write(tmp_path / "v.yaml", "base: sinusiod\n")
    with pytest.raises(config.ConfigError, match="unknown base preset 'sinusiod'") as err:
        config.load_raw(str(variant))
    assert "v.yaml" in str(err.value) and "'sinusoid'" in str(err.value), "names the file and lists the presets"
    write(variant, "base: missing.yaml\n")
    with pytest.raises(config.ConfigError, match=r"base 'missing.yaml' not found \(looked for .*missing.yaml\)"):
        config.load_raw(str(variant))


@pytest.mark.parametrize("value", ["[sinusoid]", "3", "null", "''", "{name: sinusoid}"])
def test_base_must_be_a_string(tmp_path, value):
    variant = write(tmp_path / "v.yaml", f"base: {value}\nexperiment: sinusoid\n")
    with pytest.raises(config.ConfigError, match="base must be a preset name or a YAML file path"):
        config.load_raw(str(variant))


def test_malformed_yaml_names_the_file_and_the_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "experiment: sinusoid\ntrain:\n  iterations: 7\n  seed: [1, 2\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml, line 5, column 1: invalid YAML") as err:
        config.load_raw(str(bad))
    assert str(tmp_path) in str(err.value)
    write(bad, "experiment: sinusoid\ntrain:\n  iterations: 7\n   seed: 1\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml, line 4, column \d+: invalid YAML"):
        config.load_raw(str(bad))
    # An error in a base names the base's file, not the variant that names it.
    variant = write(tmp_path / "v.yaml", "base: bad.yaml\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml, line 4"):
        config.load_raw(str(variant))
    write(bad, "- a list\n- at the top\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml: expected a mapping at the top level"):
        config.load_raw(str(bad))


def test_every_shipped_preset_builds():
    names = config.preset_names()
    assert len(names) >= 26
    for name in names:
        cfg = load_config(name)
        assert cfg.description, f"{name} has no description"
        assert "base" not in config.load_raw(name)


def test_every_variant_states_only_what_differs_from_its_base():
    variants = 0
    for name in config.preset_names():
        written = shipped(name)
        if "base" not in written:
            continue
        variants += 1
        base = config.load_raw(written["base"])
        mine = leaves({k: v for k, v in written.items() if k not in ("base", "description")})
        resolved = leaves(config.load_raw(name))
        assert written.get("description") and written["description"] != base.get("description"), (
            f"{name} must state its own description"
        )
        assert len(mine) + 1 < len(resolved), f"{name} restates most of its base"
        inherited = leaves(base)
        same = [k for k, v in mine.items() if inherited.get(k, object()) == v]
        assert not same, f"{name} restates {same}, which its base {written['base']} already sets"
    assert variants >= 20


def test_shipped_variants_resolve_to_their_cells():
    """Spot checks of values that now come from a base."""
    o = load_config("omniglot-20way-5shot-first-order")
    assert (o.task.n_way, o.task.k_shot, o.task.q_query) == (20, 5, 5)
    assert (o.maml.inner_lr, o.maml.inner_steps, o.maml.first_order, o.train.meta_batch_size) == (2.0, 5, True, 16)
    assert (o.data.resize, o.data.rotate, o.eval.query) == ("nearest", True, ["paper", "modern"])
    m = load_config("miniimagenet-5way-5shot-first-order")
    assert (m.task.k_shot, m.task.q_query, m.train.meta_batch_size, m.train.grad_clip) == (5, 15, 2, 0.6667)
    a = load_config("rl-ant-dir")
    assert (a.env.name, a.env.horizon, a.train.meta_batch_size, a.train.trajectories) == ("ant_dir", 200, 40, 40)
    assert a.eval.trajectories == 40 and load_config("rl-ant-vel").train.trajectories == 20
    t = load_config("rl-navigation2d-tiny")
    assert (t.env.horizon, t.train.iterations, t.policy.hidden, t.train.threads) == (10, 2, [16, 16], 1)
    s = load_config("sinusoid-first-order")
    assert s.models == ["maml"] and s.maml.first_order and s.maml.compile and s.train.threads == 0


def test_cli_presets_lists_and_prints_a_preset_resolved(capsys):
    assert cli.main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name in config.preset_names():
        assert f"{name} " in listing
    assert "Omniglot 5-way 1-shot, the paper's protocol (Table 1: 98.7 ± 0.4), first-order" in listing
    for name in config.preset_names():
        assert cli.main(["presets", name]) == 0
        out = capsys.readouterr().out
        assert yaml.safe_load(out) == config.load_raw(name), name
        assert "base:" not in out
    assert cli.main(["presets", "no-such-preset"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


def test_cli_presets_prints_a_yaml_file_resolved(tmp_path, capsys):
    variant = write(tmp_path / "v.yaml", "base: sinusoid\ntrain:\n  iterations: 9\n")
    assert cli.main(["presets", str(variant)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["iterations"] == 9
