"""benchmarks/sass_report.py: parsing of cuobjdump output (samples copied from a real sm_90 build,
trimmed), the verdicts, the CLI exit codes through a stand-in cuobjdump, and, where a CUDA build
and a cuobjdump exist, a run on the real InfoNCE object."""

import importlib.util
import json
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "sass_report.py"


def load_script():
    spec = importlib.util.spec_from_file_location("sass_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves annotations through sys.modules, so the module must be registered.
    sys.modules["sass_report"] = module
    spec.loader.exec_module(module)
    return module


sass_report = load_script()

LSE_FLOAT = "_ZN5pyssl7infonce4cuda18lse_partial_kernelIfEEvPKT_S5_lllS5_blPS3_S6_"
LSE_MMA = "_ZN5pyssl7infonce4cuda22lse_partial_mma_kernelEPK6__halfS4_lllPKfblPfS7_"
FINALIZE = "_ZN5pyssl7infonce4cuda20grad_finalize_kernelIddEEvPKT_lllllS5_S5_S5_S5_S3_PT0_"
EMA = "_ZN5pyssl3ema49_GLOBAL__N__d48e73e4_11_ema_cuda_cu_8bc4e21e_466017ema_update_kernelEPKNS1_11TensorEntryElld"

RESOURCE_USAGE_SAMPLE = f"""
Fatbin ptx code:
================
arch = sm_90
code version = [9,0]
host = linux
compile_size = 64bit
compressed
identifier = /work/main/csrc/infonce/cuda/infonce_cuda.cu
ptxasOptions =  --generate-line-info

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /work/main/csrc/infonce/cuda/infonce_cuda.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function {FINALIZE}:
  REG:32 STACK:8 SHARED:1280 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {LSE_FLOAT}:
  REG:48 STACK:8 SHARED:9344 LOCAL:0 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {LSE_MMA}:
  REG:70 STACK:0 SHARED:18432 LOCAL:0 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# Instruction lines carry their address comment; each is followed by an encoding-only line.
SASS_SAMPLE = f"""
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /work/main/csrc/infonce/cuda/infonce_cuda.cu

\tcode for sm_90
\t.target\tsm_90

\t\tFunction : {LSE_FLOAT}
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
                                                                           /* 0x000ff00000000800 */
        /*0280*/               @P1 STL [R1], R0 ;                          /* 0x0000000001001387 */
                                                                           /* 0x000fe80000100800 */
        /*02e0*/                   STL [R1], R42 ;                         /* 0x0000002a01007387 */
                                                                           /* 0x000fe20000100800 */
        /*0300*/                   LDG.E.CONSTANT R4, desc[UR12][R4.64] ;  /* 0x0000000c04047981 */
                                                                           /* 0x000ea2000c1e9900 */
        /*0310*/                   STS [R3], R4 ;                          /* 0x0000000403007388 */
                                                                           /* 0x004fe80000000800 */
        /*0320*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;           /* 0x0000000000007b1d */
                                                                           /* 0x000fec0000010000 */
        /*0330*/                   LDS.128 R8, [R2] ;                      /* 0x0000000002087984 */
                                                                           /* 0x000e280000000c00 */
        /*0340*/                   MUFU.EX2 R9, R9 ;                       /* 0x0000000900097308 */
                                                                           /* 0x000e640000000800 */
        /*4100*/                   LDL R15, [R1] ;                         /* 0x00000000010f7983 */
                                                                           /* 0x000ea20000100800 */
        /*6f60*/                   LDL.LU R9, [R1] ;                       /* 0x0000000001097983 */
                                                                           /* 0x000ea20000300800 */
        /*6f70*/                   HFMA2.MMA R5, -RZ, RZ, 0, 0 ;           /* 0x00000000ff057435 */
                                                                           /* 0x000fe200000001ff */
        /*6f80*/                   EXIT ;                                  /* 0x000000000000794d */
                                                                           /* 0x000fea0003800000 */
        /*6f90*/                   BRA 0x6f90;                             /* 0xfffffffc00fc7947 */
                                                                           /* 0x000fc0000383ffff */
        /*6fa0*/                   NOP;                                    /* 0x0000000000007918 */
                                                                           /* 0x000fc00000000000 */
\t\t..........


\t\tFunction : {FINALIZE}
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*01c0*/                   STL.64 [R1], R8 ;                       /* 0x0000000801007387 */
                                                                           /* 0x0001e20000100a00 */
        /*1290*/                   LDL.64 R10, [R1] ;                      /* 0x00000000010a7983 */
                                                                           /* 0x000ea20000100a00 */
        /*1c80*/                   LDL.LU.64 R4, [R1] ;                    /* 0x0000000001047983 */
                                                                           /* 0x000ea20000300a00 */
        /*1c90*/                   STL.128 [R1+0x10], R4 ;                 /* 0x0000100401007387 */
                                                                           /* 0x000fe20000100c00 */
        /*1ca0*/              @!P0 LDL.U8 R2, [R1+0x8] ;                   /* 0x0000080001028983 */
                                                                           /* 0x000ea20000100000 */
        /*31a0*/                   EXIT ;                                  /* 0x000000000000794d */
                                                                           /* 0x000fea0003800000 */
\t\t..........


\t\tFunction : {LSE_MMA}
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0e00*/                   LDSM.16.M88.4 R76, [R3] ;               /* 0x000000000304783b */
                                                                           /* 0x000e280000000200 */
        /*0e40*/                   HMMA.16816.F32 R68, R76, R82, R68 ;     /* 0x000000524c44723c */
                                                                           /* 0x000fe20000001844 */
        /*0e80*/                   HMMA.16816.F32 R64, R76, R62, R64 ;     /* 0x0000003e4c40723c */
                                                                           /* 0x000fe20000001840 */
        /*0e90*/               @P0 EXIT ;                                  /* 0x000000000000794d */
                                                                           /* 0x000fea0003800000 */
\t\t..........
"""

DEMANGLED = {
    LSE_FLOAT: "void pyssl::infonce::cuda::lse_partial_kernel<float>(float const*, float const*, "
    "long, long, long, float const*, bool, long, float*, float*)",
    LSE_MMA: "pyssl::infonce::cuda::lse_partial_mma_kernel(__half const*, __half const*, long, "
    "long, long, float const*, bool, long, float*, float*)",
    FINALIZE: "void pyssl::infonce::cuda::grad_finalize_kernel<double, double>(double const*, "
    "long, long, long, long, long, double const*, double const*, double const*, double const*, "
    "double, double*)",
}


def sample_kernels(sass_text=SASS_SAMPLE):
    return sass_report.merge_kernels(
        sass_report.parse_resource_usage(RESOURCE_USAGE_SAMPLE),
        sass_report.parse_sass(sass_text),
        "infonce_cuda.cu.o",
        demangled=DEMANGLED,
    )


def by_name(kernels):
    return {kernel["name"]: kernel for kernel in kernels}


def test_resource_usage_fields_per_function():
    usages = sass_report.parse_resource_usage(RESOURCE_USAGE_SAMPLE)
    assert set(usages) == {("sm_90", LSE_FLOAT), ("sm_90", LSE_MMA), ("sm_90", FINALIZE)}
    lse = usages[("sm_90", LSE_FLOAT)]
    assert (lse.registers, lse.stack_bytes, lse.shared_bytes, lse.local_bytes) == (48, 8, 9344, 0)
    assert usages[("sm_90", LSE_MMA)].registers == 70


def test_sass_spill_bytes_follow_access_width():
    stats = sass_report.parse_sass(SASS_SAMPLE)
    lse = stats[("sm_90", LSE_FLOAT)]
    # Two 4-byte STL (one predicated, counted all the same) and two 4-byte LDL.
    assert (lse.spill_stores, lse.spill_loads) == (8, 8)
    finalize = stats[("sm_90", FINALIZE)]
    assert finalize.spill_stores == 8 + 16
    assert finalize.spill_loads == 8 + 8 + 1


def test_sass_opcode_classes_use_base_opcode():
    stats = sass_report.parse_sass(SASS_SAMPLE)
    lse = stats[("sm_90", LSE_FLOAT)]
    counts = lse.opcode_counts
    assert counts["HMMA"] == 0, "HFMA2.MMA is an FMA on the MMA pipe, not a tensor-core op"
    assert [counts[op] for op in ("LDG", "STS", "BAR", "LDS", "MUFU")] == [1, 1, 1, 1, 1]
    # 14 instruction lines, less the NOP padding; encoding-only lines are not instructions.
    assert lse.instructions == 13
    mma = stats[("sm_90", LSE_MMA)].opcode_counts
    assert (mma["HMMA"], mma["LDSM"], mma["LDS"]) == (2, 1, 0)


def test_kernel_records_and_violations():
    kernels = by_name(sample_kernels())
    lse = kernels["pyssl::infonce::cuda::lse_partial_kernel<float>"]
    mma = kernels["pyssl::infonce::cuda::lse_partial_mma_kernel"]
    finalize = kernels["pyssl::infonce::cuda::grad_finalize_kernel<double, double>"]
    assert lse["hot"] and not lse["tensor_core"] and not lse["hmma"]
    assert mma["hot"] and mma["tensor_core"] and mma["hmma"]
    assert not finalize["hot"]
    expected_fields = {
        "name", "mangled", "object", "registers", "shared_bytes", "stack_bytes", "local_bytes",
        "spill_stores", "spill_loads", "hmma", "sass_instructions", "hot", "tensor_core",
        "opcode_counts",
    }  # fmt: skip
    assert expected_fields <= set(lse)

    violations = sass_report.find_violations(list(kernels.values()))
    # grad_finalize spills too, but it is not hot: reported in the table, not a violation.
    assert [(v["kind"], v["kernel"]) for v in violations] == [("spill", lse["name"])]
    assert "8 bytes spill stores" in violations[0]["message"]


def test_tensor_core_kernel_without_hmma_is_a_violation():
    without_hmma = SASS_SAMPLE.replace("HMMA.16816.F32", "FFMA")
    violations = sass_report.find_violations(sample_kernels(without_hmma))
    assert ("no_hmma", "pyssl::infonce::cuda::lse_partial_mma_kernel") in {(v["kind"], v["kernel"]) for v in violations}


def test_local_memory_alone_counts_as_spill():
    kernel = sample_kernels()[0] | {"spill_stores": 0, "spill_loads": 0, "local_bytes": 16}
    assert sass_report.spills(kernel)
    assert not sass_report.spills(kernel | {"local_bytes": 0})


def test_names_without_cxxfilt():
    lse = sass_report.fallback_demangle(LSE_FLOAT)
    assert lse == "pyssl::infonce::cuda::lse_partial_kernel<...>"
    assert sass_report.fallback_demangle(LSE_MMA) == "pyssl::infonce::cuda::lse_partial_mma_kernel"
    assert sass_report.fallback_demangle(EMA) == "pyssl::ema::ema_update_kernel"
    assert sass_report.fallback_demangle("plain_c_kernel") == "plain_c_kernel"


def test_short_name_drops_return_type_parameters_and_anonymous_namespace():
    demangled = (
        "void pyssl::moco::(anonymous namespace)::moco_sweep_kernel<double, float>(float const*, "
        "double const*, long, long, long, long, float*, float*, float*)"
    )
    assert sass_report.short_name(demangled) == "pyssl::moco::moco_sweep_kernel<double, float>"


# ---- the command line, through a stand-in cuobjdump that prints the samples ---------------------


@pytest.fixture
def fake_cuobjdump(tmp_path):
    (tmp_path / "usage.txt").write_text(RESOURCE_USAGE_SAMPLE)
    (tmp_path / "sass.txt").write_text(SASS_SAMPLE)
    tool = tmp_path / "cuobjdump"
    tool.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            case "$1" in
              --dump-resource-usage) cat "{tmp_path / "usage.txt"}" ;;
              -sass) cat "{tmp_path / "sass.txt"}" ;;
              *) exit 1 ;;
            esac
            """
        )
    )
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    obj = tmp_path / "build" / "CMakeFiles" / "_C.dir" / "csrc" / "infonce_cuda.cu.o"
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"stand-in object")
    return tool, obj


def test_check_fails_on_hot_spill_and_writes_json(fake_cuobjdump, tmp_path, capsys):
    tool, obj = fake_cuobjdump
    out = tmp_path / "report.json"
    args = ["--objects", str(obj), "--cuobjdump", str(tool), "--out", str(out)]
    assert sass_report.main(args) == 0, "without --check violations only warn"
    assert sass_report.main([*args, "--check"]) == 1
    printed = capsys.readouterr().out
    assert "[spill] hot kernel spills: pyssl::infonce::cuda::lse_partial_kernel<float>" in printed
    report = json.loads(out.read_text())
    assert report["tool"] == str(tool)
    assert len(report["objects"]) == 1
    assert [v["kind"] for v in report["violations"]] == ["spill"]
    assert by_name(report["kernels"])["pyssl::infonce::cuda::lse_partial_mma_kernel"]["hmma"]


def test_nothing_to_check_exits_zero_unless_required(tmp_path, fake_cuobjdump):
    tool, _ = fake_cuobjdump
    missing = str(tmp_path / "no-build" / "*.cu.o")
    assert sass_report.main(["--objects", missing, "--cuobjdump", str(tool)]) == 0
    assert sass_report.main(["--objects", missing, "--cuobjdump", str(tool), "--require"]) == 1


def test_no_cuobjdump_exits_zero_unless_required(fake_cuobjdump, monkeypatch):
    _, obj = fake_cuobjdump
    monkeypatch.setattr(sass_report, "find_cuobjdump", lambda explicit: (None, []))
    assert sass_report.main(["--objects", str(obj)]) == 0
    assert sass_report.main(["--objects", str(obj), "--require"]) == 1


# ---- the real build -----------------------------------------------------------------------------


def test_real_infonce_object_has_hmma_in_mma_kernels(tmp_path):
    objects = sass_report.find_objects("build/**/CMakeFiles/_C.dir/**/infonce_cuda.cu.o")
    if not objects:
        pytest.skip("no CUDA objects built (CPU-only build or not built yet)")
    tool, _ = sass_report.find_cuobjdump(None)
    if tool is None:
        pytest.skip("no cuobjdump (no CUDA toolkit and no triton wheel)")
    out = tmp_path / "sass.json"
    # Only the InfoNCE object: it holds the tensor-core kernels, and one object keeps this fast.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--objects", str(objects[0]), "--check", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert result.returncode == (1 if report["violations"] else 0)
    mma_kernels = [kernel for kernel in report["kernels"] if kernel["tensor_core"]]
    assert {kernel["name"].rsplit("::", 1)[-1] for kernel in mma_kernels} >= {
        "lse_partial_mma_kernel",
        "grad_partial_mma_kernel",
        # The forward's instances: wide blocks (32 rows a warp) with resident rows, else streamed.
        *(
            f"lse_partial_kernel<{op}, {variant}>"
            for op in ("__half", "__nv_bfloat16")
            for variant in ("true, 2", "false, 1")
        ),
        *(
            f"grad_partial_kernel<{op}, {resident}>"
            for op in ("__half", "__nv_bfloat16")
            for resident in ("true", "false")
        ),
    }
    assert all(kernel["hmma"] for kernel in mma_kernels), mma_kernels
    assert not [v for v in report["violations"] if v["kind"] in ("no_hmma", "unreadable")]
    # A hot-kernel spill is a performance finding for `sass_report.py --check`, not a broken
    # build: shown here as a warning rather than failing the test suite.
    for violation in report["violations"]:
        warnings.warn(violation["message"], stacklevel=1)


def test_real_moco_object_has_hmma_in_mma_sweep(tmp_path):
    # MoCo's tensor-core sweep (moco_mma.cuh): every instance (fp16/bf16 x the 64/128/256-feature
    # buckets, 32-row warps up to 128 features) is hot and a tensor-core kernel, holds HMMA and
    # does not spill.
    objects = sass_report.find_objects("build/**/CMakeFiles/_C.dir/**/moco_cuda.cu.o")
    if not objects:
        pytest.skip("no CUDA objects built (CPU-only build or not built yet)")
    tool, _ = sass_report.find_cuobjdump(None)
    if tool is None:
        pytest.skip("no cuobjdump (no CUDA toolkit and no triton wheel)")
    out = tmp_path / "sass.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--objects", str(objects[0]), "--check", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kernels = [k for k in json.loads(out.read_text())["kernels"] if "moco_mma_sweep_kernel" in k["name"]]
    assert {k["name"].rsplit("::", 1)[-1] for k in kernels} == {
        f"moco_mma_sweep_kernel<{op}, {depth}>"
        for op in ("__half", "__nv_bfloat16")
        for depth in ("64, 2", "128, 2", "256, 1")
    }
    for kernel in kernels:
        assert kernel["hot"] and kernel["tensor_core"] and kernel["hmma"], kernel["name"]
        assert not sass_report.spills(kernel), kernel["name"]
