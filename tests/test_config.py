from pathlib import Path

import pytest
import yaml

from coaflow.config import ConfigError, load_config


def test_tiny_profile_loads_with_defaults():
    cfg = load_config("tiny")
    assert cfg.profile == "tiny" and cfg.run.workdir == "work"


def test_override_parses_yaml_values():
    cfg = load_config("tiny", ["run.seed=7", "tracking.uri=sqlite:///x.db"])
    assert cfg.run.seed == 7 and cfg.tracking.uri == "sqlite:///x.db"


def test_misspelled_key_in_file_names_key_and_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: tiny\nrun:\n  sead: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: run.sead: unknown key (known: name, seed, workdir)"


def test_misspelled_override_names_the_set():
    with pytest.raises(ConfigError, match=r"--set run\.sed=1: run\.sed: unknown key"):
        load_config("tiny", ["run.sed=1"])


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"--set run\.seed=abc: run\.seed: Input should be"):
        load_config("tiny", ["run.seed=abc"])


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown profile 'nope' \\(known: .*tiny"):
        load_config("nope")


def test_real_profile_inherits_tiny():
    cfg = load_config("qwen3-0.6b-1gpu")
    assert cfg.run.name == "coaflow-qwen3-0.6b" and cfg.run.seed == 0


def test_base_loop_is_an_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(a)


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("tiny", ["noequals"])


ROOT = Path(__file__).resolve().parents[1]


def test_the_knob_reference_is_the_code():
    """docs/config.md is `coaflow config --explain`, generated from the Config classes: a knob
    added, removed, renamed or given another default without the page fails here (regenerate
    with `coaflow config --explain > docs/config.md`). Every knob says what it does."""
    from coaflow.config import explain

    text = explain()
    assert (ROOT / "docs" / "config.md").read_text() == text + "\n"
    assert not [line for line in text.splitlines() if line.endswith("|  |")]


# keys a profile keeps although they equal what it inherits: why
KEPT = {("smoke", "sft.model"): "smoke's keys double as overrides of the default profile "
        "(the Airflow form tests), where sft.model is not tiny"}


@pytest.mark.parametrize("profile", ["tiny", "default", "smoke", "qwen3-0.6b-1gpu"])
def test_a_profile_says_only_what_differs(profile):
    """One default per knob, in its stage's Config: a profile sets a key only to change the value
    it would otherwise get (the code's default, or its base profile's)."""
    from coaflow.config import PROFILE_DIR, _read_yaml, config_model

    model = config_model()
    raw = yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text())
    base = raw.pop("base", None)
    inherited = model.model_validate(_read_yaml(PROFILE_DIR / f"{base}.yaml") if base else {})
    inherited = inherited.model_dump(mode="json")
    restated = []
    for section, values in raw.items():
        for key, value in (values or {}).items():
            mine = model.model_validate({section: {key: value}}).model_dump(mode="json")
            if mine[section][key] == inherited[section][key] and \
                    (profile, f"{section}.{key}") not in KEPT:
                restated.append(f"{section}.{key}")
    assert restated == [], f"{profile}.yaml restates {restated}"
