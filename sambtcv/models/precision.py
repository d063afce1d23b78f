"""Which precision runs: ``auto`` becomes bf16 where the hardware computes it natively, else fp32.

A CPU without bf16 instructions only emulates it (every value converted to fp32 and back), which made
the decoder's training step 5-8x slower than fp32 on an AVX2-only CPU (docs/MEASUREMENTS.md, section
7c); where bf16 is native it is about twice as fast with the same masks. So `DTYPE = "auto"` and
`ENCODER_DTYPE = "auto"` ask what runs the model:

* CUDA: ``torch.cuda.is_bf16_supported()``;
* PyTorch on a CPU: oneDNN must have bf16 kernels for it (``torch.ops.mkldnn._is_mkldnn_bf16_supported``)
  and the CPU must compute bf16 itself: AVX512_BF16 or AMX-BF16 on x86 (``torch.cpu.get_capabilities``),
  BF16 on Arm;
* OpenVINO on a CPU: its CPU plugin lists ``BF16`` in ``OPTIMIZATION_CAPABILITIES``.

A run on a CPU with the OpenVINO runtime needs both answers (Tasks 2-3 train in PyTorch and infer in
OpenVINO). ``ONEDNN_MAX_CPU_ISA`` set below ``AVX512_CORE_BF16`` counts as "not native" for both (PyTorch
honours it by itself; OpenVINO's own copy of oneDNN does not), so ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2`` shows on any x86 machine what an AVX2-only CPU gets.

`resolve` returns a `Choice` (the precision used, what was asked, and why); `sambtcv.cli.start_run`
resolves a page's flags with it and `note` keeps the choice, which every record then states.
"""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

from sambtcv.core.config import PRECISIONS
from sambtcv.core.errors import PipelineError

AUTO = "auto"
SETTINGS = (AUTO, *PRECISIONS)  # what DTYPE / ENCODER_DTYPE accept
# ONEDNN_MAX_CPU_ISA values under which oneDNN has no native bf16 instructions
NO_BF16_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})
X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class Support:
    """Whether the engine that runs the model computes bf16 natively (`native`), and what says so."""

    native: bool
    detail: str


@dataclass(frozen=True)
class Choice:
    """The precision used (fp32 | bf16), what was asked (auto | fp32 | bf16) and why that one."""

    used: str
    asked: str
    reason: str

    def text(self) -> str:
        return self.used if self.asked != AUTO else f"{self.used} (auto: {self.reason})"


def check_setting(value: str) -> str:
    if value not in SETTINGS:
        raise PipelineError(f"unknown {{subject}} {value!r}; use {', '.join(SETTINGS)}", subject="precision")
    return value


def _isa_capped() -> str | None:
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return isa if isa in NO_BF16_ISAS else None


def torch_cpu_support() -> Support:
    """PyTorch's answer for this CPU."""
    import torch

    capped = _isa_capped()
    if capped:
        return Support(False, f"ONEDNN_MAX_CPU_ISA={capped} leaves oneDNN without bf16 instructions")
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return Support(False, f"oneDNN has no bf16 kernels for this CPU ({_cpu_name()}, "
                                  f"{torch.backends.cpu.get_cpu_capability()}): bf16 would be emulated")
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    except (AttributeError, RuntimeError) as exc:
        return Support(False, f"PyTorch could not say whether this CPU computes bf16 ({exc})")
    if platform.machine().lower() in X86:
        found = [name.upper() for name in ("avx512_bf16", "amx_bf16") if caps.get(name)]
        if found:
            return Support(True, f"{_cpu_name()} computes bf16 natively ({' and '.join(found)})")
        return Support(False, f"{_cpu_name()} has no AVX512_BF16 or AMX-BF16: bf16 would be emulated")
    found = [name for name, on in caps.items() if on and "bf16" in str(name).lower()]
    if found:
        return Support(True, f"{_cpu_name()} computes bf16 natively ({', '.join(map(str, found))})")
    return Support(False, f"{_cpu_name()} reports no bf16 instructions: bf16 would be emulated")


def openvino_support() -> Support:
    """OpenVINO's CPU plugin's answer."""
    capped = _isa_capped()
    if capped:
        return Support(False, f"ONEDNN_MAX_CPU_ISA={capped} (the project counts bf16 as emulated under it)")
    try:
        from sambtcv.models.openvino_runtime import cpu_capabilities

        caps = cpu_capabilities()
    except Exception as exc:  # noqa: BLE001 - any failure of the plugin means "do not rely on bf16"
        return Support(False, f"OpenVINO's CPU plugin could not say ({type(exc).__name__}: {str(exc)[:120]})")
    if "BF16" in caps:
        return Support(True, "OpenVINO's CPU plugin computes bf16 natively (BF16 in OPTIMIZATION_CAPABILITIES)")
    return Support(False, f"OpenVINO's CPU plugin lists no BF16 ({', '.join(caps)})")


def cuda_support(device) -> Support:
    import torch

    if torch.cuda.is_bf16_supported():
        return Support(True, f"{torch.cuda.get_device_name(device)} computes bf16 natively")
    return Support(False, f"{torch.cuda.get_device_name(device)} has no native bf16")


def support(device, runtime: str = "torch") -> Support:
    """What runs the model on `device` with the resolved `runtime` ("torch" | "openvino")."""
    import torch

    if torch.device(device).type == "cuda":
        return cuda_support(device)
    cpu = torch_cpu_support()
    if runtime != "openvino" or not cpu.native:
        return cpu
    ov = openvino_support()
    return Support(True, f"{cpu.detail}; {ov.detail}") if ov.native else ov


def resolve(asked: str, found: Support) -> Choice:
    """The precision for a DTYPE / ENCODER_DTYPE setting `asked`, given what the hardware does."""
    check_setting(asked)
    if asked != AUTO:
        return Choice(asked, asked, "set explicitly")
    return Choice("bf16" if found.native else "fp32", AUTO, found.detail)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "this CPU"


def machine(device) -> dict:
    """What a report's header says of the machine: CPU, cores, and whether bf16 is native here."""
    found = support(device)
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "bf16_native": found.native, "bf16": found.detail}


_NOTED: dict = {}


def note(choices: dict) -> None:
    """Remember this process's choices ({"dtype": Choice, ...}); `noted` returns them for its records."""
    _NOTED.clear()
    _NOTED.update(choices)


def noted() -> dict:
    """{"dtype": {"used", "asked", "reason"}, ...} of this process's run (empty before `note`)."""
    return {k: asdict(v) for k, v in _NOTED.items()}
