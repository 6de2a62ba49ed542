"""`[[teachers]]` (issue 18): parsing, the single-[teacher] equivalence, overrides and every refusal, each one line
naming the entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multi_teacher_job import two_teachers, write_multi_job

from dskd.config import Config, load_config, parse_config
from dskd.config_teachers import TeacherEntry, route_fields, teacher_entries
from dskd.errors import ConfigError
from dskd.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def problems(path: Path, registry, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), registry=registry)
    return [str(p) for p in info.value.problems]


def test_entries_parse_with_their_names_weights_routes_and_resolved_paths(tmp_path, registry):
    config = load_config(write_multi_job(tmp_path, two_teachers(weights=(2, 1))), registry=registry)
    a, b = teacher_entries(config)
    assert (a.name, a.weight, a.route_values) == ("mistral", 2.0, ("arithmetic/*",))
    assert b.route_field == "category" and b.route_values == ("list/*", "string/*", "conversion/*")
    assert a.teacher.config == str(tmp_path / "teacher")  # relative to the TOML file, as [teacher]'s
    assert a.aligner.name == "eta"  # the job's [aligner] when the entry names none
    assert route_fields(config) == ("category",)
    assert a.serves({"category": "arithmetic/add"}) and not a.serves({"category": "list/max"})
    assert not a.serves({})


def test_a_single_teacher_table_is_one_entry_named_teacher_and_writes_no_teachers_key():
    config = Config()
    (entry,) = teacher_entries(config)
    assert entry == TeacherEntry(name="teacher", weight=1.0, aligner=config.aligner, teacher=config.teacher)
    assert "teachers" not in config.to_dict()


def test_the_config_round_trips_through_its_dict_as_config_json_holds_it(tmp_path, registry):
    config = load_config(write_multi_job(tmp_path), registry=registry)
    data = json.loads(json.dumps(config.to_dict()))
    assert [e["name"] for e in data["teachers"]] == ["mistral", "tinyllama"]
    assert parse_config(data, source=config.source, registry=registry) == config


def test_an_entry_aligner_may_be_a_name_or_a_table(tmp_path, registry):
    teachers = two_teachers()
    teachers[0]["aligner"] = "index"
    teachers[1]["aligner"] = {"name": "eta"}
    a, b = teacher_entries(load_config(write_multi_job(tmp_path, teachers), registry=registry))
    assert a.aligner.name == "index" and b.aligner.name == "eta"


def test_set_overrides_a_key_of_a_named_entry(tmp_path, registry):
    config = load_config(
        write_multi_job(tmp_path),
        ["teachers.tinyllama.weight=3", 'teachers.mistral.route={category="list/*"}'],
        registry=registry,
    )
    a, b = config.teachers
    assert b.weight == 3.0 and a.route_values == ("list/*",)
    found = problems(write_multi_job(tmp_path), registry, ["teachers.nobody.weight=3"])
    assert len(found) == 1 and "mistral, tinyllama" in found[0]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda t: t[1].update(name="mistral"), "two [[teachers]] entries are named 'mistral'"),
        (lambda t: t[0].update(weight=-1), "teachers.mistral.weight: must be >= 0"),
        (lambda t: (t[0].update(weight=0), t[1].update(weight=0)), "every weight is 0"),
        (lambda t: t[0].pop("name"), "teachers[0].name: is missing"),
        (lambda t: t[0].update(name="a b"), "is not a name"),
        (lambda t: t[0].update(route={"category": "x", "kind": "y"}), "exactly one key"),
        (lambda t: t[0].update(route={"category": [1]}), "expected a string or a list of strings"),
        (lambda t: t[0].update(aligner="nope"), "teachers.mistral.aligner.name: unknown aligner 'nope'"),
        (lambda t: t[0].update(dtype="int4"), "teachers.mistral.dtype: unknown dtype"),
        (lambda t: t[0].update(tokenizr="x"), "teachers.mistral.tokenizr: unknown key"),
        (lambda t: t[1].pop("config"), "teachers.tinyllama: no teacher"),
    ],
)
def test_bad_entries_are_one_problem_each_naming_the_entry(tmp_path, registry, change, expected):
    teachers = two_teachers()
    change(teachers)
    found = problems(write_multi_job(tmp_path, teachers), registry)
    assert len(found) == 1, found
    assert expected in found[0], found


def test_a_job_with_both_a_teacher_table_and_teachers_entries_says_how_to_convert(tmp_path, registry):
    path = write_multi_job(tmp_path)
    path.write_text(path.read_text() + '\n[teacher]\nconfig = "teacher"\n')
    (found,) = problems(path, registry)
    assert "either one [teacher] table or [[teachers]] entries" in found and "name =" in found


def test_a_teacher_whose_positions_end_before_max_length_is_named(tmp_path, registry):
    path = write_multi_job(tmp_path)
    (tmp_path / "teacher2" / "config.json").write_text(
        json.dumps({**json.loads((tmp_path / "teacher2" / "config.json").read_text()), "max_position_embeddings": 64})
    )
    (found,) = problems(path, registry)
    assert found.startswith("teachers.tinyllama:") and "64" in found and "data.max_length = 128" in found


def test_sft_with_teachers_is_refused(tmp_path, registry):
    (found,) = problems(write_multi_job(tmp_path, objective="sft"), registry)
    assert "objective 'sft' uses no teacher" in found


def test_a_policy_for_one_teacher_is_refused_naming_it(tmp_path, registry):
    (found,) = problems(write_multi_job(tmp_path), registry, ["policy.name=on_policy"])
    assert "policy 'on_policy' works with one teacher only" in found


def test_an_objective_that_declares_one_teacher_is_refused(tmp_path, registry, monkeypatch):
    factory = registry.get("objectives", "dskd_v2")
    monkeypatch.setattr(factory, "multi_teacher", False, raising=False)
    (found,) = problems(write_multi_job(tmp_path), registry)
    assert "objective 'dskd_v2' supports one teacher only" in found
