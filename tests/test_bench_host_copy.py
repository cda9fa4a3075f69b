"""`coe bench host-copy` on this machine (CPU in CI): the worker's real host-tier code moves a
checkpoint disk → host → device and back, and the device ends with exactly the expert's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coe.bench.host_copy import SHAPES, BareWorker, _Model, run_host_copy_bench
from coe.cache.checkpoint_read import read_into_buffer, read_safetensors

from .conftest import coe


def test_swaps_leave_the_experts_exact_weights(tmp_path: Path) -> None:
    result = run_host_copy_bench("tiny", repeats=3, workdir=tmp_path)
    assert result.weights_match
    expected = sum(2 * torch.Size(d).numel() for _, d in SHAPES["tiny"].tensors())
    assert result.checkpoint_bytes == expected
    assert len(result.host_to_device_samples_s) == 3
    assert result.floor_s > 0 and result.host_to_device_s > 0
    assert list(tmp_path.iterdir()) == []  # the random checkpoints are removed


def test_a_swap_copies_into_the_same_tensors() -> None:
    """Activation copies in place: the engine's tensors (and any graph captured on them) stay."""
    model = _Model({"w": torch.zeros(4, 4, dtype=torch.bfloat16)})
    worker = BareWorker(model, torch.bfloat16)
    address = model.w.data_ptr()
    worker.coe_capture("zeros")
    model.w.data.fill_(1)
    worker.coe_capture("ones")
    worker.coe_activate("zeros")
    assert model.w.data_ptr() == address and not model.w.any()
    assert worker.coe_activate("ones")["copied_bytes"] == 32 and bool(model.w.all())


def test_checkpoint_read_equals_safetensors_own_loader(tmp_path: Path) -> None:
    """One read into one buffer, tensors as views of it, every dtype and shape as written.
    (The safetensors writer orders tensors by alignment, so no offset is odd here.)"""
    from safetensors.torch import load_file, save_file

    tensors = {
        "a_odd": torch.arange(3, dtype=torch.uint8),
        "b_bf16": torch.randn(5, 7, dtype=torch.bfloat16),
        "c_f32": torch.randn(4, dtype=torch.float32),
        "d_i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e_scalar": torch.tensor(1.5, dtype=torch.float16),
        "f_fp8": torch.randn(8).to(torch.float8_e4m3fn),
        "g_empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "h_bool": torch.tensor([True, False]),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    tensors, buffers = read_into_buffer(path, pin=False)  # the pinned path's reader, unpinned
    read = dict(tensors)
    assert len(buffers) == 1
    expected = load_file(str(path))
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape, name
        as_bytes = [t.reshape(-1).view(torch.uint8) for t in (read[name], tensor)]
        assert torch.equal(*as_bytes), name
    plain = dict(read_safetensors(path, pin=False)[0])  # safetensors' own loader on CPU
    assert plain.keys() == read.keys()
    assert all(torch.equal(plain[n].reshape(-1).view(torch.uint8),
                           read[n].reshape(-1).view(torch.uint8)) for n in read)  # fmt: skip
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="ends 4 bytes early"):
        read_into_buffer(path, pin=False)
    path.write_bytes(b"PK\x03\x04 a zip, not a checkpoint" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_into_buffer(path, pin=False)


def test_cli_prints_json(tmp_path: Path) -> None:
    result = coe("bench", "host-copy", "--shape", "tiny", "--repeats", "2",
                 "--dir", str(tmp_path), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["shape"] == "tiny" and figures["weights_match"] is True
