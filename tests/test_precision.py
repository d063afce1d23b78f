"""`auto` precision: bf16 only where the hardware computes it natively, and records that say what ran."""
import json

import pytest
import torch

from sambtcv import cli
from sambtcv.models import precision
from sambtcv.study import records, tables


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """PyTorch's queries answer as on an AVX2-only CPU (first-generation AMD EPYC)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    """PyTorch's queries answer as on a CPU with AVX512_BF16 (Zen 4, Sapphire Rapids)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")


def test_auto_is_fp32_where_bf16_is_emulated(cpu_without_bf16):
    found = precision.support("cpu")
    assert not found.native and "emulated" in found.detail
    choice = precision.resolve("auto", found)
    assert (choice.used, choice.asked) == ("fp32", "auto") and choice.reason == found.detail
    assert precision.resolve("bf16", found).used == "bf16"  # asked for by name: what was asked


def test_auto_is_bf16_where_the_cpu_computes_it(cpu_with_bf16):
    found = precision.support("cpu")
    assert found.native and "AVX512_BF16" in found.detail
    assert precision.resolve("auto", found).used == "bf16"
    assert precision.resolve("fp32", found).used == "fp32"


def test_avx512_without_bf16_instructions_is_not_native(cpu_with_bf16, monkeypatch):
    """oneDNN runs bf16 on AVX-512 by converting (Skylake-X): that is emulation, not native."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert not precision.support("cpu").native


def test_a_capped_onednn_isa_counts_as_emulated(cpu_with_bf16, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    found = precision.support("cpu", "openvino")
    assert not found.native and "ONEDNN_MAX_CPU_ISA=AVX2" in found.detail


def test_openvino_asks_its_cpu_plugin(cpu_with_bf16, monkeypatch):
    from sambtcv.models import openvino_runtime

    monkeypatch.setattr(openvino_runtime, "cpu_capabilities", lambda: ["FP32", "INT8"])
    found = precision.support("cpu", "openvino")
    assert not found.native and "no BF16" in found.detail
    monkeypatch.setattr(openvino_runtime, "cpu_capabilities", lambda: ["BF16", "FP32", "INT8"])
    assert precision.support("cpu", "openvino").native
    assert precision.support("cpu", "torch").native


def test_unknown_precision_is_one_line():
    with pytest.raises(Exception, match="unknown precision 'fp16'; use auto, fp32, bf16"):
        precision.check_setting("fp16")


def test_records_and_tables_say_what_ran_and_why(cpu_without_bf16, tmp_path):
    """start_run resolves auto; the record holds the precision used (never "auto") and why."""
    cfg = cli.Config({"seed": 0, "device": "cpu", "dtype": "auto", "encoder_dtype": "auto", "runtime": "torch"})
    device = cli.start_run(cfg)
    assert (cfg["dtype"], cfg["encoder_dtype"]) == ("fp32", "fp32") and device.type == "cpu"
    settings = {"dtype": cfg["dtype"], "encoder_dtype": cfg["encoder_dtype"]}
    r = records.write_record(tmp_path, "task1", settings, {})
    data = json.loads(r.path.read_text())
    assert data["settings"]["dtype"] == "fp32"
    assert data["precision"]["dtype"]["asked"] == "auto" and "emulated" in data["precision"]["dtype"]["reason"]
    text = tables.precision_text(records.read(r.path))
    assert text.startswith("encoder fp32, decoder fp32 (auto: ") and "emulated" in text


def test_explicit_precision_is_kept_and_said_so(cpu_without_bf16, tmp_path):
    cfg = cli.Config({"seed": 0, "device": "cpu", "dtype": "bf16", "encoder_dtype": "fp32"})
    cli.start_run(cfg)
    assert (cfg["dtype"], cfg["encoder_dtype"]) == ("bf16", "fp32")
    r = records.write_record(tmp_path, "task1", {"dtype": "bf16", "encoder_dtype": "fp32"}, {})
    assert tables.precision_text(r) == "encoder fp32, decoder bf16"
