"""The client's on-disk cache of teacher tokenizers and LM heads, keyed by fingerprint and checksummed."""

from __future__ import annotations

import hashlib

import pytest

from dskd.servers.teacher_cache import TeacherCache

FP = "0123abcd"


def head_entry(data: bytes):
    meta = {
        "tensors": [
            {
                "name": "lm_head.weight",
                "dtype": 3,
                "shape": [len(data) // 4],
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        ],
        "scale": 1.0,
        "softcap": 0.0,
    }
    return meta, {"lm_head.weight": data}


def test_saved_head_loads_back_with_its_bytes(tmp_path):
    cache = TeacherCache(tmp_path)
    meta, tensors = head_entry(b"\x01\x02\x03\x04" * 4)
    cache.save_head(FP, "float32", meta, tensors)
    loaded_meta, loaded = cache.load_head(FP, "float32")
    assert loaded_meta == meta
    assert bytes(loaded["lm_head.weight"]) == tensors["lm_head.weight"]


def test_head_cache_misses_for_another_fingerprint_or_dtype(tmp_path):
    cache = TeacherCache(tmp_path)
    cache.save_head(FP, "float32", *head_entry(b"\0" * 16))
    assert cache.load_head("ffff0000", "float32") is None
    assert cache.load_head(FP, "bfloat16") is None


def test_corrupted_cached_head_is_ignored(tmp_path):
    cache = TeacherCache(tmp_path)
    cache.save_head(FP, "float32", *head_entry(b"\0" * 16))
    blob = next(cache.folder(FP).glob("head-float32.lm_head.weight.bin"))
    blob.write_bytes(b"\0" * 15 + b"\1")
    assert cache.load_head(FP, "float32") is None


def test_head_without_its_meta_file_is_not_an_entry(tmp_path):
    cache = TeacherCache(tmp_path)
    cache.save_head(FP, "float32", *head_entry(b"\0" * 16))
    (cache.folder(FP) / "head-float32.json").unlink()
    assert cache.load_head(FP, "float32") is None


def test_tokenizer_files_round_trip_and_corruption_is_noticed(tmp_path):
    cache = TeacherCache(tmp_path)
    assert cache.tokenizer_dir(FP) is None
    folder = cache.save_tokenizer(FP, {"tokenizer.json": b"{}", "tokenizer_config.json": b'{"a": 1}'})
    assert cache.tokenizer_dir(FP) == folder
    assert (folder / "tokenizer.json").read_bytes() == b"{}"
    (folder / "tokenizer.json").write_bytes(b"{ }")
    assert cache.tokenizer_dir(FP) is None


def test_tokenizer_file_names_cannot_escape_the_cache(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        TeacherCache(tmp_path).save_tokenizer(FP, {"../evil.json": b"{}"})


def test_fingerprint_must_be_a_plain_name(tmp_path):
    with pytest.raises(ValueError, match="cannot name a cache folder"):
        TeacherCache(tmp_path).folder("../x")


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DSKD_CACHE_DIR", str(tmp_path))
    assert TeacherCache().root == tmp_path / "teachers"
