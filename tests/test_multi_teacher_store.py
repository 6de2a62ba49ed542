"""A teacher store as one of several teachers: it trains beside a live teacher, and a store built with another
data.max_length is refused at validation, naming the teacher."""

from __future__ import annotations

import json

import pytest
from multi_teacher_job import TOKENIZERS, write_multi_job
from store_jobs import REGISTRY, build

from dskd.config import load_config
from dskd.errors import ConfigError
from dskd.run.job import Job


def _teachers(store) -> list[dict]:
    return [
        {"name": "live", "config": "teacher", "tokenizer": str(TOKENIZERS / "mistral")},
        {"name": "stored", "store": str(store), "weight": 2.0, "route": {"category": ["list/*"]}},
    ]


@pytest.mark.integration
def test_a_stored_teacher_trains_beside_a_live_one(tmp_path):
    _, store = build(tmp_path / "built")
    path = write_multi_job(tmp_path / "job", _teachers(store), samples=12, steps=2)
    Job(load_config(path, [], registry=REGISTRY), REGISTRY).run()
    lines = [json.loads(line) for line in (tmp_path / "job" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert any("train/projector_ce/stored" in r for r in lines) and all("train/projector_ce/live" in r for r in lines)


@pytest.mark.integration
def test_a_store_built_with_another_max_length_is_refused_naming_the_teacher(tmp_path):
    _, store = build(tmp_path / "built")
    path = write_multi_job(tmp_path / "job", _teachers(store), samples=12)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.max_length=100"], registry=REGISTRY)
    found = [str(p) for p in info.value.problems]
    assert any(p.startswith("teachers.stored.store: was built with data.max_length = 128") for p in found), found
