"""`dtype: auto` for faked CPU flag sets and a faked CUDA device; peak FLOP/s lookup."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from jsonargparse import Namespace

from cllm import hardware
from cllm.errors import UserError
from cllm.lightning_cli import match_precision
from cllm.models import resolve_dtype

EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
GENOA = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.fixture(autouse=True)
def fresh_choice():
    hardware.auto_dtype.cache_clear()
    yield
    hardware.auto_dtype.cache_clear()


def flags_of(tmp_path, text: str) -> frozenset[str]:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return hardware.cpu_flags(path)


def test_cpu_flags_reads_the_flags_line(tmp_path):
    assert flags_of(tmp_path, GENOA) == {"fpu", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert flags_of(tmp_path, "processor\t: 0\n") == frozenset()
    assert hardware.cpu_flags(tmp_path / "missing") == frozenset()  # not Linux: no flags


@pytest.mark.parametrize(
    ("cpuinfo", "speedup", "expected", "reason_has"),
    [
        (EPYC_AVX2, 5.0, torch.float32, "without amx_bf16/avx512_bf16"),
        (GENOA, 4.9, torch.bfloat16, "avx512_bf16; probe: bf16 matmul 4.9x"),
        (SAPPHIRE_RAPIDS, 8.0, torch.bfloat16, "amx_bf16"),
        (GENOA, 0.5, torch.float32, "probe found bf16 matmuls 0.50x"),  # flag present but the fast path is not
        (GENOA, 1.1, torch.float32, "1.10x"),  # a near tie stays float32
    ],
)
def test_cpu_auto_dtype(tmp_path, cpuinfo, speedup, expected, reason_has):
    probed = []
    choice = hardware.cpu_auto_dtype(flags_of(tmp_path, cpuinfo), probe=lambda: probed.append(1) or speedup)
    assert choice.dtype == expected
    assert reason_has in choice.reason
    assert len(probed) == (0 if cpuinfo == EPYC_AVX2 else 1)  # no flag: no probe second spent


def test_auto_dtype_on_faked_cpus_prints_the_choice(monkeypatch, tmp_path, capsys):
    genoa, epyc = flags_of(tmp_path, GENOA), flags_of(tmp_path, EPYC_AVX2)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: genoa)
    monkeypatch.setattr(hardware, "bf16_probe", lambda: 3.0)
    assert resolve_dtype("auto") == torch.bfloat16
    assert "dtype auto -> bfloat16 on cpu (CPU with avx512_bf16" in capsys.readouterr().out
    assert resolve_dtype("auto") == torch.bfloat16  # decided once per process: nothing printed again
    assert capsys.readouterr().out == ""
    hardware.auto_dtype.cache_clear()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: epyc)
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_faked_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Fake 9000")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    choice = hardware.auto_dtype("cuda")
    assert choice.dtype == expected and "NVIDIA Fake 9000" in choice.reason
    assert hardware.autocast_precision(choice) == ("bf16-mixed" if bf16 else "16-mixed")


def test_autocast_precision_of_float32_is_full_precision():
    assert hardware.autocast_precision(hardware.DtypeChoice(torch.float32, "")) == "32-true"


def test_unknown_dtype_names_auto():
    with pytest.raises(UserError, match="choose one of auto, float32"):
        resolve_dtype("bf16")


def test_bf16_probe_is_the_ratio_of_per_call_times(monkeypatch):
    """A float32 matmul that takes 3 clock units and a bf16 one that takes 1: the probe says 3.0 exactly."""
    now = [0.0]
    real = torch.Tensor.__matmul__

    def timed_matmul(a, b):
        now[0] += 3.0 if a.dtype == torch.float32 else 1.0
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", timed_matmul)
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: now[0])
    assert hardware.bf16_probe(seconds=20.0, size=4) == 3.0


def test_peak_flops(monkeypatch):
    assert hardware.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert hardware.peak_flops(torch.device("cuda"), torch.bfloat16) == pytest.approx(989.4e12, rel=0.01)  # dense
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert hardware.peak_flops(torch.device("cuda"), torch.bfloat16) == pytest.approx(312e12, rel=0.01)


def cli_config(precision=None, dtype="auto", accelerator="cpu"):
    model = Namespace(class_path="cllm.module.CLLMModule", init_args=Namespace(model="tiny", dtype=dtype))
    return Namespace(trainer=Namespace(precision=precision, accelerator=accelerator), model=model)


@pytest.mark.parametrize(
    ("speedup", "precision", "dtype", "expected"),
    [
        (3.0, None, "auto", "bf16-mixed"),  # bf16 is fast here: float32 masters, bf16 autocast
        (0.5, None, "auto", "32-true"),  # the probe says no
        (3.0, "32-true", "auto", "32-true"),  # an explicit precision wins (llama7b.yaml under FSDP2's bf16 policy)
        (3.0, None, "float32", None),  # an explicit dtype: Lightning's default precision
    ],
)
def test_fit_precision_follows_dtype_auto(monkeypatch, tmp_path, speedup, precision, dtype, expected):
    genoa = flags_of(tmp_path, GENOA)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: genoa)
    monkeypatch.setattr(hardware, "bf16_probe", lambda: speedup)
    config = cli_config(precision, dtype)
    match_precision(config)
    assert config.trainer.precision == expected


def test_fit_precision_on_a_faked_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Fake 9000")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    config = cli_config(accelerator="gpu")
    match_precision(config)
    assert config.trainer.precision == "16-mixed"


def write_stat(folder, total_busy, total_idle, own_ticks):
    """A /proc/stat line (user nice system idle iowait ...) and a /proc/self/stat with utime + stime = own_ticks."""
    (folder / "stat").write_text(f"cpu  {total_busy} 0 0 {total_idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    fields = ["S"] + ["0"] * 10 + [str(own_ticks), "0"] + ["0"] * 30
    (folder / "self").write_text("1234 (py thon) " + " ".join(fields) + "\n")


def test_other_load_is_the_busy_time_not_ours(tmp_path):
    load = hardware.OtherLoad(tmp_path / "stat", tmp_path / "self")
    write_stat(tmp_path, total_busy=100, total_idle=100, own_ticks=50)
    with load:
        # 200 ticks pass on the machine: 120 busy, of which 60 are ours, so others used 60 / 200
        write_stat(tmp_path, total_busy=220, total_idle=180, own_ticks=110)
    assert load.share == pytest.approx(0.3)
    assert load.busy


def test_other_load_alone_and_unreadable(tmp_path):
    load = hardware.OtherLoad(tmp_path / "stat", tmp_path / "self")
    write_stat(tmp_path, total_busy=100, total_idle=100, own_ticks=50)
    with load:
        write_stat(tmp_path, total_busy=150, total_idle=250, own_ticks=100)  # every busy tick was ours
    assert load.share == 0.0 and not load.busy
    missing = hardware.OtherLoad(tmp_path / "nope", tmp_path / "self")
    with missing:
        pass
    assert missing.share is None and not missing.busy


def test_isa_limits_are_recorded_beside_the_flags(monkeypatch, tmp_path):
    genoa = flags_of(tmp_path, GENOA)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: genoa)
    for name in hardware.AVX2_EMULATION:
        monkeypatch.delenv(name, raising=False)
    assert hardware.recorded_cpu_flags() == ["avx2", "avx512_bf16", "avx512f"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.recorded_cpu_flags() == ["avx2", "avx512_bf16", "avx512f", "ONEDNN_MAX_CPU_ISA=AVX2"]


def test_emulate_avx2_reexecs_once_with_the_caps(monkeypatch):
    calls = []
    monkeypatch.setattr(hardware.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    for name in hardware.AVX2_EMULATION:
        monkeypatch.delenv(name, raising=False)
    hardware.emulate_avx2(["bench.py", "--suite", "json"])
    ((exe, args, env),) = calls
    assert args[1:] == ["bench.py", "--suite", "json"]
    assert {name: env[name] for name in hardware.AVX2_EMULATION} == hardware.AVX2_EMULATION
    for name, value in hardware.AVX2_EMULATION.items():
        monkeypatch.setenv(name, value)
    hardware.emulate_avx2(["bench.py"])  # already capped: no second re-exec
    assert len(calls) == 1
    # The capped process compiles into a kernel cache of its own: sharing one with uncapped runs gave garbage.
    own = hardware.capped_inductor_cache(hardware.AVX2_EMULATION)["TORCHINDUCTOR_CACHE_DIR"]
    assert env["TORCHINDUCTOR_CACHE_DIR"] == own


def test_capped_inductor_cache_only_under_caps_and_never_over_a_chosen_one():
    assert hardware.capped_inductor_cache({}) == {}
    capped = hardware.capped_inductor_cache(hardware.AVX2_EMULATION)
    assert capped["TORCHINDUCTOR_CACHE_DIR"].endswith(
        "-caps-aten_cpu_capability_avx2-onednn_max_cpu_isa_avx2-mkl_enable_instructions_avx2"
    )
    aten = hardware.capped_inductor_cache({"ATEN_CPU_CAPABILITY": "avx2"})["TORCHINDUCTOR_CACHE_DIR"]
    onednn = hardware.capped_inductor_cache({"ONEDNN_MAX_CPU_ISA": "AVX2"})["TORCHINDUCTOR_CACHE_DIR"]
    assert aten.endswith("-caps-aten_cpu_capability_avx2") and onednn != aten  # oneDNN alone keeps full-ISA kernels
    assert hardware.capped_inductor_cache({**hardware.AVX2_EMULATION, "TORCHINDUCTOR_CACHE_DIR": "/mine"}) == {}
    default = {**hardware.AVX2_EMULATION, "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_root"}  # inductor's own
    assert hardware.capped_inductor_cache(default) == capped


def test_under_avx2_emulation_auto_is_float32():
    """The caps really reach the matmul kernels: the probe finds bf16 slow even where the CPU has avx512_bf16."""
    code = (
        "from cllm import hardware; c = hardware.cpu_auto_dtype(hardware.cpu_flags());"
        "print(c.name, hardware.recorded_cpu_flags()[-1], '|', c.reason)"
    )
    env = {**os.environ, **hardware.AVX2_EMULATION, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    dtype, last_recorded, reason = out.stdout.split(maxsplit=2)
    if not {"avx512_bf16", "amx_bf16"} & hardware.cpu_flags():
        pytest.skip("this CPU has no bf16 flags: auto picks float32 without running the probe the caps must reach")
    assert dtype == "float32" and "probe" in reason, out.stdout  # the probe ran, under the caps, and found bf16 slow
    assert last_recorded == "MKL_ENABLE_INSTRUCTIONS=AVX2"
