"""`coe models prepare`: idempotent, verified, and a partial or corrupt folder is rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coe.models import prepare as prep
from coe.models.gemma_template import GEMMA_STOP_TOKEN_IDS


@pytest.fixture
def toy_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """A preparable model whose build writes two small files and counts its calls."""
    monkeypatch.setenv("COE_HOME", str(tmp_path / "home"))
    calls = {"builds": 0}

    def build(out: Path, report: prep.Report) -> str:
        calls["builds"] += 1
        report("writing")
        (out / "weights.bin").write_bytes(b"\x01" * 4096)
        (out / "config.json").write_text('{"toy": true}')
        return "0" * 64

    monkeypatch.setitem(prep.PREPARABLE, "toy", prep.PreparedModel("toy", "toy", build))
    return calls


def test_second_prepare_does_not_rebuild(toy_model: dict[str, int]) -> None:
    first = prep.prepare_model("toy")
    second = prep.prepare_model("toy")
    assert first == second and toy_model["builds"] == 1
    assert prep.verify_prepared(first) == []


def test_corrupt_file_is_detected_and_rebuilt(toy_model: dict[str, int]) -> None:
    path = prep.prepare_model("toy")
    data = bytearray((path / "weights.bin").read_bytes())
    data[100] ^= 0xFF  # same size, different bytes: only the hash can tell
    (path / "weights.bin").write_bytes(bytes(data))
    assert prep.verify_prepared(path, full=False) == []
    assert prep.verify_prepared(path) == ["weights.bin does not match its SHA-256 (corrupt)"]
    prep.prepare_model("toy")
    assert toy_model["builds"] == 2 and prep.verify_prepared(path) == []


def test_partial_folder_is_rebuilt(toy_model: dict[str, int]) -> None:
    path = prep.prepare_model("toy")
    (path / prep.MANIFEST_NAME).unlink()  # as if the build had been killed before the end
    assert "missing" in prep.verify_prepared(path)[0]
    prep.prepare_model("toy")
    assert toy_model["builds"] == 2
    (path / "weights.bin").write_bytes(b"short")
    assert "bytes, expected" in prep.verify_prepared(path, full=False)[0]
    prep.ensure_models(["coe:toy"])
    assert toy_model["builds"] == 3


def test_failed_build_leaves_the_old_copy(
    toy_model: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = prep.prepare_model("toy")

    def broken(out: Path, report: prep.Report) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setitem(prep.PREPARABLE, "toy", prep.PreparedModel("toy", "toy", broken))
    with pytest.raises(RuntimeError, match="disk full"):
        prep.prepare_model("toy", force=True)
    assert prep.verify_prepared(path) == []
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".toy.build")]


def test_real_gemma_folder(model_dir: Path) -> None:
    """The real conversion: bf16 safetensors, Gemma config, BOS-prepending tokenizer, template."""
    from transformers import AutoTokenizer

    assert prep.verify_prepared(model_dir) == []
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in config
    assert (model_dir / "model.safetensors").stat().st_size > 500_000_000
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(GEMMA_STOP_TOKEN_IDS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok("hello").input_ids[0] == tok.bos_token_id == 2
    assert tok.convert_tokens_to_ids("<end_of_turn>") == GEMMA_STOP_TOKEN_IDS[1]
