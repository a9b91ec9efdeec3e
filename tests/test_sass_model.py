"""benchmarks/sass_model.py: loops, the tile path and the trip counts on hand-written SASS, and,
where a CUDA build and a cuobjdump exist, predictions for the real InfoNCE kernels."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "sass_model.py"


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("sass_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sass_model"] = module
    spec.loader.exec_module(module)
    return module


sass_model = load_script()


def sass(*lines):
    """Instructions 16 bytes apart, as cuobjdump prints them."""
    body = "\n".join(f"        /*{16 * n:04x}*/                   {line} ;" for n, line in enumerate(lines))
    return "\t\tFunction : kernel\n" + body + "\n"


# A tile loop (0x10..0xb0) whose body branches around a masked path, with a nested loop of two
# HMMAs (0x30..0x50) and one HMMA outside it.
TILE_LOOP = sass(
    "S2R R0, SR_TID.X",  # 0x00
    "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x10 tile loop head
    "@P1 BRA 0x70",  # 0x20 skip the masking path
    "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x30 nested loop head
    "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x40
    "@P2 BRA 0x30",  # 0x50 nested back edge
    "BRA 0x90",  # 0x60
    "FSEL R1, R1, -INF, P3",  # 0x70 the masking path: cheaper, but skips the nested MMAs
    "FSEL R2, R2, -INF, P3",  # 0x80
    "MUFU.EX2 R3, R3",  # 0x90
    "FADD R5, R5, R3",  # 0xa0
    "@P0 BRA 0x10",  # 0xb0 tile loop back edge
    "EXIT",  # 0xc0
)


def test_loops_nest_from_backward_branches():
    instructions = sass_model.parse_functions(TILE_LOOP)["kernel"]
    roots = sass_model.find_loops(instructions)
    assert [(loop.head, loop.tail) for loop in roots] == [(0x10, 0xB0)]
    assert [(loop.head, loop.tail) for loop in roots[0].children] == [(0x30, 0x50)]


def test_tile_path_does_the_work_and_nested_loops_repeat_to_the_tiles_mmas():
    instructions = sass_model.parse_functions(TILE_LOOP)["kernel"]
    # 7 HMMA per warp per tile: 1 outside the nested loop, 2 per nested iteration -> 3 trips.
    cost, tile, notes = sass_model.tile_loop_cost(instructions, "HMMA", 7, 0)
    assert (tile.head, tile.tail) == (0x10, 0xB0)
    assert cost["hmma"] == 7 and cost["mufu"] == 2.0
    assert notes == ["loop 0x30..0x50 x 3"]
    # The path through the nested loop, not the shorter masking path that skips it: head HMMA,
    # branch, 3 x (2 HMMA + branch), BRA, MUFU, FADD, back edge.
    assert cost["instructions"] == 1 + 1 + 3 * 3 + 1 + 3
    assert cost["tensor"] == pytest.approx(7 * sass_model.HMMA_16816_CLOCKS)


def test_costs_by_resource():
    parse = sass_model.parse_functions
    ldsm, lds128, guarded_stg, ldgsts = parse(
        sass(
            "LDSM.16.M88.4 R4, [R2]",
            "LDS.128 R4, [R2]",
            "@P0 STG.E [R2.64], R4",
            "LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64]",
        )
    )["kernel"]
    assert sass_model.instruction_cost(ldsm)["l1"] == 4.0  # 512 bytes at 128 per clock
    assert sass_model.instruction_cost(lds128)["l1"] == 4.0
    assert sass_model.instruction_cost(guarded_stg)["l1"] == 0  # off on an interior tile
    assert sass_model.instruction_cost(ldgsts)["l2_bytes"] == 512
    assert sass_model.clocks({"issue": 10, "tensor": 12, "l1": 3}, warps=4) == (48, "tensor")


def test_column_splits_follow_the_launcher():
    # 2N = 16,384: 256 row tiles; forward aims at 4 blocks per SM (528), backward at 2 (264).
    assert sass_model.column_splits(256, 256, 4 * 132, True) == (3, 86)
    assert sass_model.column_splits(256, 256, 2 * 132, False) == (1, 256)


def test_occupancy_limits():
    assert sass_model.occupancy(registers=128, shared_bytes=20 * 1024, threads=128) == 4
    assert sass_model.occupancy(registers=32, shared_bytes=100 * 1024, threads=128) == 2


def test_real_kernels_are_modelled(tmp_path):
    objects = list((REPO_ROOT / "build").glob("**/CMakeFiles/_C.dir/**/infonce_cuda.cu.o"))
    if not objects:
        pytest.skip("no CUDA objects built (CPU-only build or not built yet)")
    out = tmp_path / "model.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--objects", str(objects[0]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if "nothing to model" in result.stderr:
        pytest.skip("no cuobjdump")
    predictions = json.loads(out.read_text())["predictions"]
    assert {(p["workload"].split()[0], p["kernels"]) for p in predictions} == {
        (w, k) for w in ("ntxent", "clip") for k in ("mma", "wmma")
    }
    for prediction in predictions:
        assert prediction["predicted_s"] > prediction["floor_s"] > 0
        for launch in prediction["launches"]:
            if launch["kind"] == "sweep":
                # The tile path holds the tile's MMAs (block flops / 4096 per warp share).
                assert launch["per_warp_tile"]["hmma"] > 0 and launch["tile_clocks"] > 0


def test_moco_workload_follows_the_launcher():
    # N = 256, K = 65,536 (1,024 tiles): the tensor-core sweep's 2 row blocks of 128 aim at 2 blocks
    # per SM (128 splits of 8 tiles), the SIMT sweep's 16 row blocks of 16 at 4 (32 splits of 32).
    for kind, blocks, tiles in (("mma", 2 * 128, 8), ("simt", 16 * 32, 32)):
        sweep = sass_model.moco_workload(kind).launches[1]
        assert (sweep.blocks, sweep.tiles_per_block) == (blocks, tiles), kind
    # The SIMT tile: 8 d FFMA per thread (logits and A), a warp-instruction each.
    assert sass_model.simt_moco_tile_cost(128)["fp32"] == 8 * 128 * sass_model.COST_PER_LANE["fp32"]


def test_real_moco_kernels_are_modelled(tmp_path):
    objects = list((REPO_ROOT / "build").glob("**/CMakeFiles/_C.dir/**/moco_cuda.cu.o"))
    if not objects:
        pytest.skip("no CUDA objects built (CPU-only build or not built yet)")
    out = tmp_path / "model.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--objects", str(objects[0]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if "nothing to model" in result.stderr:
        pytest.skip("no cuobjdump")
    predictions = {p["kernels"]: p for p in json.loads(out.read_text())["predictions"]}
    assert set(predictions) == {"mma", "simt"}
    assert all(p["workload"].startswith("moco N=256 K=65536 d=128") for p in predictions.values())
    mma = next(launch for launch in predictions["mma"]["launches"] if launch["kind"] == "sweep")
    # The tile path holds S's and P K's MMAs: 2 x 128 x 64 x 128 x 2 flops / 4096 / 4 warps.
    assert mma["kernel"].endswith("moco_mma_sweep_kernel<__nv_bfloat16, 128, 2>")
    assert mma["per_warp_tile"]["hmma"] == 256
    assert predictions["simt"]["predicted_s"] > predictions["mma"]["predicted_s"] > predictions["mma"]["floor_s"]
