"""A throughput model of the InfoNCE-family and MoCo CUDA kernels on an H200, read from their SASS.

No GPU has run these kernels yet; until one does, this model judges them. For each modelled
kernel it takes the compiled SASS (``cuobjdump -sass``), finds the tile loop (the outermost loop
holding the kernel's key instruction, HMMA), follows the cheapest path through one iteration
(the most HMMA and exponentials, then the fewest issue slots: an interior tile's path, with no
padding column, no diagonal and no positive),
expands nested loops by trip counts derived from the work a tile must do, and charges every
instruction to the SM resources it occupies:

=========  =====================================================================================
issue      4 warp-instructions per clock per SM (one per scheduler)
tensor     HMMA.16816 (4,096 flop) at the dense bf16/fp16 peak, 790 TFLOP/s / 132 SMs / 1.98 GHz
mufu       16 lanes per clock per SM (ex2, rcp, rsqrt, ...)
fp32       128 lanes per clock per SM (FFMA, FMUL, FADD)
alu        64 lanes per clock per SM (integer, compare, select, min/max, conversions)
l1         128 bytes per clock per SM shared by shared-memory and L1 traffic (LDS/STS/LDSM,
           LDG/STG, the shared-memory side of LDGSTS), by the instruction's width
=========  =====================================================================================

A tile costs the most loaded resource (perfect overlap of the others: an optimistic bound, as
latency is not modelled; occupancy is reported beside it). A kernel costs its busiest SM's
tiles plus its L2 traffic bound and a launch; the small kernels around the sweeps (operand
preparation, merges, the gradient's finalisation) are charged their DRAM bytes at 4.3 TB/s and
a launch each. The floors are the issue's: the GEMM-equivalents of the work at the tensor
cores' peak, and eager PyTorch's traffic over the materialised N x N matrix.

MoCo's SIMT sweep (moco_sweep_kernel, the "simt" workload) has no HMMA to find its tile loop by
and its chunk loops do not nest cleanly in the SASS, so its tile is counted from the source's
loops instead (simt_moco_tile_cost), charged to the same resources.

Usage::

    python benchmarks/sass_model.py                    # prints the predictions
    python benchmarks/sass_model.py --out runs/sass_model.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass_report  # noqa: E402  (the same object discovery and cuobjdump lookup)

# ---- the machine --------------------------------------------------------------------------------

SMS = 132
CLOCK_HZ = 1.98e9
DENSE_BF16_FLOPS = 790e12
DRAM_BYTES_PER_S = 4.3e12
# Assumed: Hopper's L2 serves about 5.5 TB/s of reads to the SMs (measured on H100 by
# microbenchmarks; the H200 shares the chip).
L2_BYTES_PER_S = 5.5e12
LAUNCH_S = 2e-6  # one more launch in a stream of back-to-back kernels
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32

HMMA_16816_CLOCKS = 4096 / (DENSE_BF16_FLOPS / SMS / CLOCK_HZ)  # ~1.36 SM clocks per warp-HMMA
COST_PER_LANE = {"mufu": 32 / 16, "fp32": 32 / 128, "alu": 32 / 64}
L1_BYTES_PER_CLOCK = 128

FP32_OPS = {"FFMA", "FMUL", "FADD", "FFMA2", "FMUL2", "FADD2"}
ISSUE_ONLY = {"BRA", "BSSY", "BSYNC", "NOP", "BAR", "DEPBAR", "LDGDEPBAR", "EXIT", "WARPSYNC", "YIELD"}

INSTRUCTION_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
BRANCH_TARGET_RE = re.compile(r"0x([0-9a-fA-F]+)")


@dataclass
class Instruction:
    address: int
    opcode: str  # with modifiers
    predicated: bool
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    def branch_target(self) -> int | None:
        if self.base != "BRA":
            return None
        match = BRANCH_TARGET_RE.search(self.operands)
        return int(match.group(1), 16) if match else None


def parse_functions(sass_text: str) -> dict[str, list[Instruction]]:
    """``cuobjdump -sass`` text -> {mangled name: instructions} (the first arch seen)."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in sass_text.splitlines():
        if match := sass_report.SASS_FUNCTION_RE.match(line):
            name = match.group(1)
            current = None if name in functions else functions.setdefault(name, [])
        elif current is not None and (match := INSTRUCTION_RE.match(line)):
            current.append(Instruction(int(match.group(1), 16), match.group(3), bool(match.group(2)), match.group(4)))
    return functions


# ---- what one instruction costs ------------------------------------------------------------------


def access_bytes(instruction: Instruction) -> int:
    """Bytes one warp moves through the L1/shared-memory data path."""
    parts = instruction.opcode.split(".")
    base = parts[0]
    if base == "LDSM":  # ldmatrix: .x1/.x2/.x4 8x8 16-bit matrices
        count = 4 if parts[-1] == "4" else 2 if parts[-1] == "2" else 1
        return 128 * count
    width = 4
    for part in parts[1:]:
        if part in sass_report.LOCAL_ACCESS_BYTES:
            width = sass_report.LOCAL_ACCESS_BYTES[part]
    return 32 * width


def instruction_cost(instruction: Instruction) -> Counter:
    """SM clocks the instruction holds each resource, for one warp."""
    cost = Counter(issue=0.25, instructions=1)
    base = instruction.base
    if base == "HMMA":
        cost["tensor"] += HMMA_16816_CLOCKS * (0.5 if ".1688." in instruction.opcode else 1.0)
        cost["hmma"] += 1
    elif base == "MUFU":
        cost["mufu"] += COST_PER_LANE["mufu"]
    elif base in FP32_OPS:
        cost["fp32"] += COST_PER_LANE["fp32"]
    elif base in {"LDS", "STS", "LDSM", "LDG", "STG", "LDGSTS", "ATOMS", "RED", "ATOMG", "LDL", "STL"}:
        # A guarded global access on the tile path (a store of a row's positive, say) is off on
        # an interior tile: its issue slot counts, no bytes.
        moved = 0 if instruction.predicated and base in {"LDG", "STG"} else access_bytes(instruction)
        cost["l1"] += moved / L1_BYTES_PER_CLOCK
        # cp.async bypasses L1: the operand slices come from L2. LDG here reads per-row and
        # per-column scalars every warp of the block shares: L1 hits, not L2 traffic.
        if base == "LDGSTS":
            cost["l2_bytes"] += moved
            cost["ldgsts"] += 1
    elif base.startswith("U") or base in ISSUE_ONLY:
        pass  # uniform datapath and control: an issue slot only
    else:
        cost["alu"] += COST_PER_LANE["alu"]
    return cost


RESOURCES = ("issue", "tensor", "mufu", "fp32", "alu", "l1")


def clocks(cost: Counter, warps: int) -> tuple[float, str]:
    """SM clocks for `warps` warps each running `cost`, and the resource that bounds them."""
    bound = max(RESOURCES, key=lambda r: cost.get(r, 0))
    return cost.get(bound, 0) * warps, bound


# ---- loops and the cheapest path -----------------------------------------------------------------


@dataclass
class Loop:
    head: int  # address of the first instruction
    tail: int  # address of the backward branch
    children: list[Loop] = field(default_factory=list)

    def contains(self, other: Loop) -> bool:
        return (
            self.head <= other.head and other.tail <= self.tail and (self.head, self.tail) != (other.head, other.tail)
        )


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Top-level loops (each with its nested children) from the backward branches."""
    spans = sorted(
        {(t, i.address) for i in instructions if (t := i.branch_target()) is not None and t <= i.address},
        key=lambda span: (span[0], -span[1]),
    )
    roots: list[Loop] = []
    stack: list[Loop] = []
    for head, tail in spans:
        loop = Loop(head, tail)
        while stack and not stack[-1].contains(loop):
            stack.pop()
        (stack[-1].children if stack else roots).append(loop)
        stack.append(loop)
    return roots


def all_loops(roots: list[Loop]):
    for loop in roots:
        yield loop
        yield from all_loops(loop.children)


def cheapest_path(instructions: list[Instruction], loop: Loop, trips: dict[tuple[int, int], float]) -> Counter:
    """Cost of one iteration of `loop`, from its head to its backward branch, along the path
    that does a tile's work (the most HMMA, then the most exponentials, then the most cp.async:
    no early exit, no skipped step, and the next tile's prefetch, which only a split's last tile
    skips) with the fewest issue slots among those (an interior tile's: no masking, no positive
    to store); nested loops count `trips` times each along their own such path."""
    body = [i for i in instructions if loop.head <= i.address <= loop.tail]
    index = {i.address: n for n, i in enumerate(body)}
    child_at = {child.head: child for child in loop.children}
    best: list[Counter | None] = [None] * (len(body) + 1)
    best[0] = Counter()

    def rank(cost: Counter):  # the tile's work first (MMAs, exponentials, copies), then fewest issue slots
        return (-cost["hmma"], -cost["mufu"], -cost["ldgsts"], cost["issue"])

    def relax(position: int, cost: Counter) -> None:
        if position <= len(body) and (best[position] is None or rank(cost) < rank(best[position])):
            best[position] = cost

    for n, instruction in enumerate(body):
        here = best[n]
        if here is None:
            continue
        child = child_at.get(instruction.address)
        if child is not None:
            inner = cheapest_path(instructions, child, trips)
            times = trips.get((child.head, child.tail), 1.0)
            after = index.get(next((i.address for i in body if i.address > child.tail), -1), len(body))
            relax(after, here + Counter({k: v * times for k, v in inner.items()}))
            continue
        cost = here + instruction_cost(instruction)
        target = instruction.branch_target()
        if n == len(body) - 1:  # the loop's own backward branch
            relax(len(body), cost)
            continue
        if target is not None and target > instruction.address:
            if target in index:
                relax(index[target], cost)
            if not instruction.predicated:
                continue  # unconditional: no fall-through
        if instruction.base == "EXIT" and not instruction.predicated:
            continue
        relax(n + 1, cost)
    if best[len(body)] is None:
        raise ValueError(f"no path through the loop at {loop.head:#x}..{loop.tail:#x}")
    return best[len(body)]


def tile_loop_cost(instructions: list[Instruction], key: str, key_per_warp: float, copies_per_thread: float):
    """Cost of one tile for one warp, and a note on how nested loops were expanded.

    The tile loop is the outermost loop holding the key instruction. Nested loops holding the
    key instruction repeat until the tile has its `key_per_warp` (the tile's work); loops that
    only copy (LDGSTS) repeat until each thread has issued `copies_per_thread`; any other
    nested loop counts once (reported)."""
    roots = find_loops(instructions)

    def count(loop: Loop, what: str) -> int:
        return sum(1 for i in instructions if loop.head <= i.address <= loop.tail and i.base == what)

    tile = next((lp for lp in all_loops(roots) if count(lp, key)), None)
    if tile is None:
        raise ValueError(f"no loop holds {key}")
    trips: dict[tuple[int, int], float] = {}
    notes = []
    for child in tile.children:
        trips[(child.head, child.tail)] = 1.0
    base = cheapest_path(instructions, tile, trips)
    for child in tile.children:
        span = (child.head, child.tail)
        inner = cheapest_path(instructions, child, trips)
        if inner["hmma"]:
            outside = base["hmma"] - inner["hmma"]
            trips[span] = max((key_per_warp - outside) / inner["hmma"], 0.0)
        elif inner["ldgsts"]:
            outside = base["ldgsts"] - inner["ldgsts"]
            trips[span] = max((copies_per_thread - outside) / inner["ldgsts"], 0.0)
        else:
            notes.append(f"loop {child.head:#x}..{child.tail:#x} counted once")
            continue
        notes.append(f"loop {child.head:#x}..{child.tail:#x} x {trips[span]:g}")
    cost = cheapest_path(instructions, tile, trips)
    return cost, tile, notes


# ---- the modelled launches -------------------------------------------------------------------------


@dataclass
class Sweep:
    """One launch of a tile-loop kernel."""

    label: str
    kernel: str  # substring of the demangled name
    blocks: int
    tiles_per_block: int
    threads: int
    key_per_block_tile: float  # HMMA per block per tile: the tile's work
    copies_per_thread_tile: float  # 16-byte cp.async per thread per tile (nested copy loops)
    instance: str = ""  # how the template instance's name ends, e.g. ", true, 2>"
    logits_per_tile: int = 64 * 64  # a block's logits per tile


@dataclass
class CountedSweep:
    """A launch whose tile cost is counted from the kernel's source, not walked in its SASS."""

    label: str
    kernel: str  # substring of the demangled name (for registers and occupancy)
    blocks: int
    tiles_per_block: int
    threads: int
    per_warp_tile: Counter
    logits_per_tile: int


@dataclass
class Stream:
    """A small memory-bound kernel, charged its bytes."""

    label: str
    dram_bytes: float


@dataclass
class Workload:
    name: str
    kernels: str  # "mma" (infonce_mma.cuh) or "wmma" (the older kernels)
    launches: list
    floor_s: float
    eager_s: float
    note: str


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def column_splits(col_tiles: int, other: int, target: int, round_up: bool) -> tuple[int, int]:
    """As infonce_cuda.cu's column_splits: (splits, tiles per split)."""
    other = max(other, 1)
    wanted = ceil_div(target, other) if round_up else target // other
    splits = min(max(wanted, 1), col_tiles)
    per_split = ceil_div(col_tiles, splits)
    return ceil_div(col_tiles, per_split), per_split


def infonce_sweeps(rows: int, cols: int, dim: int, kernels: str, label: str, backward: bool) -> list:
    """The sweep launches of one row side (rows of x against the columns of y)."""
    tile = 64
    row_tiles, col_tiles = ceil_div(rows, tile), ceil_div(cols, tile)
    if kernels == "mma":
        depth, threads, grad_threads = ceil_div(dim, 32) * 32, 128, 128
        name_f, name_b = "mma::lse_partial_kernel<__nv_bfloat16", "mma::grad_partial_kernel<__nv_bfloat16"
    else:
        depth, threads, grad_threads = ceil_div(dim, 16) * 16, 256, 256
        name_f, name_b = "lse_partial_mma_kernel", "grad_partial_mma_kernel"
    dim_pad = ceil_div(dim, 16) * 16
    resident = kernels == "mma" and depth <= 128
    if not backward:
        # The mma forward with resident rows runs wide blocks: 128 rows, 32 per warp.
        block_rows = 128 if resident else tile
        row_blocks = ceil_div(rows, block_rows)
        splits, per_split = column_splits(col_tiles, row_blocks, 4 * SMS, True)
        flops = block_rows * tile * depth * 2
        instance = "" if kernels != "mma" else (", true, 2>" if resident else ", false, 1>")
        return [
            Sweep(
                f"{label} lse",
                name_f,
                row_blocks * splits,
                per_split,
                threads,
                flops / 4096,
                0,
                instance,
                block_rows * tile,
            )
        ]
    if kernels == "mma" and 128 < depth <= 512:
        # bf16 rows of 129..512 features: wide_grad_kernel, one block for all features of 64 rows
        # (each S tile formed once), 128 threads per 128 features, V staged once per tile.
        groups = 2 if depth <= 256 else 4
        threads = 128 * groups
        smem = 2 * (3 * tile * (depth + 8) + tile * (tile + 8))
        per_sm = max(1, min(232448 // (smem + 1024), 2048 // threads))
        splits, per_split = column_splits(col_tiles, row_tiles, per_sm * SMS, False)
        flops = 2 * tile * tile * depth * 2  # S and G V
        copies = tile * depth * 2 / 16 / threads  # V's raw rows, bf16
        sweep = Sweep(
            f"{label} grad", "mma::wide_grad_kernel", row_tiles * splits, per_split, threads, flops / 4096, copies
        )
        sweep.instance = f"<{groups}>"
        return [sweep]
    chunks = ceil_div(dim_pad, 128)
    splits, per_split = column_splits(col_tiles, row_tiles * chunks, 2 * SMS, False)
    chunk_features = min(128, depth)
    flops = tile * tile * depth * 2 + tile * tile * chunk_features * 2
    copies = tile * chunk_features * 2 / 16 / grad_threads  # V's chunk of unit rows, fp16
    sweep = Sweep(f"{label} grad", name_b, row_tiles * chunks * splits, per_split, grad_threads, flops / 4096, copies)
    sweep.instance = "" if kernels != "mma" else (", true>" if resident else ", false>")
    return [sweep]


def infonce_streams(rows: int, dim: int, label: str, splits_bwd: int) -> list:
    op_ld = ceil_div(dim, 32) * 32
    dim_pad = ceil_div(dim, 16) * 16
    prepare = rows * dim * 2 + rows * op_ld * 4 + rows * dim_pad * 4  # read z, op_raw+op_unit, unit (fp32)
    finalize = splits_bwd * rows * dim_pad * 4 + rows * dim_pad * 4 + rows * dim * 2
    return [Stream(f"{label} normalise+operands", prepare), Stream(f"{label} grad finalize", finalize)]


def ntxent_workload(kernels: str, pairs: int = 8192, dim: int = 128) -> Workload:
    rows = 2 * pairs
    launches = []
    launches += infonce_streams(rows, dim, "z (fwd)", 0)[:1]
    launches += infonce_sweeps(rows, rows, dim, kernels, "fwd", backward=False)
    launches += [Stream("fwd merge + loss", rows * 4 * 8)]
    launches += infonce_streams(rows, dim, "z (bwd)", 1)
    launches += infonce_sweeps(rows, rows, dim, kernels, "bwd", backward=True)
    gemm = (rows * rows * dim * 2) / DENSE_BF16_FLOPS
    # Eager (lightly's NTXentLoss in bf16): 13 passes over the 2N x 2N bf16 logits (einsum out,
    # / T, the diagonal mask, log-softmax in and out, and the backward of each).
    eager = 13 * rows * rows * 2 / DRAM_BYTES_PER_S
    return Workload(
        f"ntxent 2N={rows} d={dim} bf16 fwd+bwd",
        kernels,
        launches,
        2 * gemm,
        eager,
        "floor: 2 GEMM-equivalents at 790 TFLOP/s",
    )


def clip_workload(kernels: str, n: int = 32768, dim: int = 512) -> Workload:
    launches = []
    for side in ("image", "text"):
        launches += infonce_streams(n, dim, f"{side} (fwd)", 0)[:1]
    launches += infonce_sweeps(n, n, dim, kernels, "fwd rows", backward=False)
    launches += infonce_sweeps(n, n, dim, kernels, "fwd cols", backward=False)
    launches += [Stream("fwd merges + loss", 2 * n * 4 * 8)]
    for side in ("image", "text"):
        launches += infonce_streams(n, dim, f"{side} (bwd)", 1)
    launches += infonce_sweeps(n, n, dim, kernels, "bwd rows", backward=True)
    launches += infonce_sweeps(n, n, dim, kernels, "bwd cols", backward=True)
    gemm = (n * n * dim * 2) / DENSE_BF16_FLOPS
    eager = 13 * n * n * 2 / DRAM_BYTES_PER_S
    return Workload(
        f"clip N={n} d={dim} bf16 fwd+bwd",
        kernels,
        launches,
        3 * gemm,
        eager,
        "floor: 3 GEMM-equivalents (S once, G V and G^T U) at 790 TFLOP/s",
    )


# ---- MoCo: the queue sweep (moco_cuda.cu, moco_mma.cuh) ------------------------------------------


def simt_moco_tile_cost(dim: int) -> Counter:
    """One warp's share of a moco_sweep_kernel tile (16 rows x 64 queue columns, 8 warps), counted
    from its loops with the compiler's best case: per thread 4 rows x d FFMA for the logits and as
    many for A; the logits read u (4 rows, LDS.128 per 4 features) and the queue chunk (LDS.32
    per feature), A reads P (4 rows, LDS.128 per 4 columns) and the queue chunk (LDS.32 per
    column) per 64-feature chunk; the queue chunk is loaded twice (logits and A) and the query
    chunk once per 64 features, each element an LDG.16 + STS.32 and ~8 integer instructions of
    index arithmetic; the softmax step ~100 instructions."""
    chunks = ceil_div(dim, 64)
    ffma = 8 * dim
    lds = {16: dim + 64 * chunks, 4: dim + 64 * chunks}  # width: LDS per thread
    loaded = 2 * chunks * (64 * 64 // 256) + chunks * (16 * 64 // 256)  # elements per thread
    alu = 8 * loaded + 100
    instructions = ffma + sum(lds.values()) + 2 * loaded + alu
    l1_bytes = sum(width * 32 * count for width, count in lds.items()) + loaded * (2 + 4) * 32
    cost = Counter(
        issue=0.25 * instructions,
        instructions=instructions,
        fp32=COST_PER_LANE["fp32"] * ffma,
        alu=COST_PER_LANE["alu"] * alu,
        l1=l1_bytes / L1_BYTES_PER_CLOCK,
        mufu=COST_PER_LANE["mufu"] * 3,
    )
    cost["l2_bytes"] = 2 * chunks * 64 * 64 * 2 / 8  # the warp's share of the bf16 queue chunks
    return cost


def moco_workload(kernels: str, n: int = 256, keys: int = 65536, dim: int = 128) -> Workload:
    """MoCo's queue loss, bf16 query and queue, forward (prep, sweep, merge, mean) and the
    backward (ATen ops over N x d: it reads no queue). kernels: "mma" (moco_mma_sweep_kernel) or
    "simt" (moco_sweep_kernel, PYSSL_MOCO_KERNELS=simt); the splits are the launcher's."""
    tile = 64
    col_tiles = ceil_div(keys, tile)
    if kernels == "mma":
        bucket = 64 if dim <= 64 else (128 if dim <= 128 else 256)
        groups = 2 if bucket <= 128 else 1  # 16-row groups per warp (moco_mma.cuh's row_groups)
        block_rows = 64 * groups
        row_blocks = ceil_div(n, block_rows)
        splits, per_split = column_splits(col_tiles, row_blocks, 2 * SMS, True)
        flops = 2 * block_rows * tile * ceil_div(dim, 16) * 16 * 2  # S and P K
        copies = tile * dim * 2 / 16 / 128  # the queue tile's 16-byte cp.async per thread
        sweep = Sweep(
            "sweep",
            "moco::mma::moco_mma_sweep_kernel<__nv_bfloat16",
            row_blocks * splits,
            per_split,
            128,
            flops / 4096,
            copies,
            f", {bucket}, {groups}>",
            block_rows * tile,
        )
        prep = n * dim * 2 * 2 + n * 8
    else:
        row_blocks = ceil_div(n, 16)
        splits, per_split = column_splits(col_tiles, row_blocks, 4 * SMS, True)
        sweep = CountedSweep(
            "sweep (source-counted)",
            "moco::moco_sweep_kernel<c10::BFloat16, float>",
            row_blocks * splits,
            per_split,
            256,
            simt_moco_tile_cost(dim),
            16 * tile,
        )
        prep = n * dim * 2 * 2 + n * dim * 4 + n * 4  # scaled_u in float32
    merge = splits * n * dim * 4 + splits * n * 8 + n * dim * 4 + n * 12
    # grad_query / grad_key from lse and expected_queue: read q, k (bf16), A (fp32), write both.
    backward = n * dim * (2 + 2 + 4 + 2 + 2)
    launches = [
        Stream("prep (norms, S_i0)", prep),
        sweep,
        Stream("merge + mean", merge),
        Stream("backward (ATen, N x d)", backward),
    ]
    gemm = 2 * n * keys * dim / DENSE_BF16_FLOPS
    # Eager (reference.moco in bf16): 13 passes over the N x K bf16 logits, as for NT-Xent, and the
    # queue read by the forward and the backward's matmuls.
    eager = (13 * n * keys * 2 + 2 * keys * dim * 2) / DRAM_BYTES_PER_S
    return Workload(
        f"moco N={n} K={keys} d={dim} bf16 fwd+bwd",
        kernels,
        launches,
        2 * gemm,
        eager,
        "floor: 2 GEMM-equivalents (S and P K) at 790 TFLOP/s",
    )


def occupancy(registers: int, shared_bytes: int, threads: int) -> int:
    """Blocks resident per SM."""
    warps = ceil_div(threads, 32)
    per_block_registers = warps * 32 * ceil_div(max(registers, 1), 8) * 8
    limits = [
        REGISTERS_PER_SM // per_block_registers,
        MAX_THREADS_PER_SM // threads,
        MAX_BLOCKS_PER_SM,
        SHARED_PER_SM // max(shared_bytes, 1),
    ]
    return max(min(limits), 0)


def predict(workload: Workload, functions: dict, kernels: list[dict]) -> dict:
    rows = []
    total = 0.0
    for launch in workload.launches:
        if isinstance(launch, Stream):
            seconds = launch.dram_bytes / DRAM_BYTES_PER_S + LAUNCH_S
            rows.append({"launch": launch.label, "kind": "memory", "dram_bytes": launch.dram_bytes, "seconds": seconds})
            total += seconds
            continue
        if isinstance(launch, CountedSweep):
            record = next((k for k in kernels if k["name"].endswith(launch.kernel)), None)
            if record is None:
                raise LookupError(f"no compiled kernel matches {launch.kernel!r}")
            warps = launch.threads // 32
            cost = launch.per_warp_tile
            tile_clocks, bound = clocks(cost, warps)
            compute_s = ceil_div(launch.blocks, SMS) * launch.tiles_per_block * tile_clocks / CLOCK_HZ
            l2_s = launch.blocks * launch.tiles_per_block * cost["l2_bytes"] * warps / L2_BYTES_PER_S
            seconds = max(compute_s, l2_s) + LAUNCH_S
            total += seconds
            rows.append(
                {
                    "launch": launch.label,
                    "kind": "sweep",
                    "kernel": record["name"],
                    "blocks": launch.blocks,
                    "tiles_per_block": launch.tiles_per_block,
                    "registers": record["registers"],
                    "blocks_per_sm": occupancy(record["registers"] or 0, record["shared_bytes"] or 0, launch.threads),
                    "per_warp_tile": {k: round(v, 2) for k, v in sorted(cost.items())},
                    "instructions_per_logit": round(cost["instructions"] * warps * 32 / launch.logits_per_tile, 2),
                    "tile_clocks": round(tile_clocks, 1),
                    "bound": bound if compute_s >= l2_s else "l2",
                    "seconds": seconds,
                    "notes": ["tile counted from the source's loops (no HMMA to find it by)"],
                }
            )
            continue
        record = next((k for k in kernels if launch.kernel in k["name"] and k["name"].endswith(launch.instance)), None)
        if record is None:
            raise LookupError(f"no compiled kernel matches {launch.kernel!r}")
        instructions = functions[record["mangled"]]
        warps = launch.threads // 32
        cost, _, notes = tile_loop_cost(
            instructions, "HMMA", launch.key_per_block_tile / warps, launch.copies_per_thread_tile
        )
        tile_clocks, bound = clocks(cost, warps)
        busiest = ceil_div(launch.blocks, SMS)
        compute_s = busiest * launch.tiles_per_block * tile_clocks / CLOCK_HZ
        l2_s = launch.blocks * launch.tiles_per_block * cost["l2_bytes"] * warps / L2_BYTES_PER_S
        seconds = max(compute_s, l2_s) + LAUNCH_S
        total += seconds
        resident = occupancy(record["registers"] or 0, record["shared_bytes"] or 0, launch.threads)
        rows.append(
            {
                "launch": launch.label,
                "kind": "sweep",
                "kernel": record["name"],
                "blocks": launch.blocks,
                "tiles_per_block": launch.tiles_per_block,
                "registers": record["registers"],
                "blocks_per_sm": resident,
                "warps_per_scheduler": resident * warps / 4,
                "per_warp_tile": {k: round(v, 2) for k, v in sorted(cost.items())},
                "instructions_per_logit": round(cost["instructions"] * warps * 32 / launch.logits_per_tile, 2),
                "tile_clocks": round(tile_clocks, 1),
                "bound": bound if compute_s >= l2_s else "l2",
                "seconds": seconds,
                "notes": notes,
            }
        )
    return {
        "workload": workload.name,
        "kernels": workload.kernels,
        "predicted_s": total,
        "floor_s": workload.floor_s,
        "eager_traffic_s": workload.eager_s,
        "times_floor": total / workload.floor_s,
        "speedup_over_eager": workload.eager_s / total,
        "note": workload.note,
        "launches": rows,
    }


def load(objects_spec: str | None, cuobjdump: str | None):
    objects = [p for p in sass_report.find_objects(objects_spec) if "infonce" in p.name or "moco" in p.name]
    tool, _ = sass_report.find_cuobjdump(cuobjdump)
    if not objects or tool is None:
        return None, None
    functions: dict = {}
    kernels: list[dict] = []
    for obj in objects:
        sass = sass_report.run_cuobjdump(tool, "-sass", obj).stdout
        usage = sass_report.run_cuobjdump(tool, "--dump-resource-usage", obj).stdout
        functions.update(parse_functions(sass))
        kernels += sass_report.merge_kernels(
            sass_report.parse_resource_usage(usage), sass_report.parse_sass(sass), sass_report.display_path(obj)
        )
    return functions, kernels


def format_prediction(p: dict) -> str:
    lines = [
        f"{p['workload']} [{p['kernels']}]: predicted {p['predicted_s'] * 1e3:.3f} ms = "
        f"{p['times_floor']:.2f} x floor ({p['floor_s'] * 1e3:.3f} ms), "
        f"{p['speedup_over_eager']:.2f} x faster than eager's N^2 traffic ({p['eager_traffic_s'] * 1e3:.3f} ms)"
    ]
    for row in p["launches"]:
        if row["kind"] == "memory":
            lines.append(f"    {row['launch']:<24} {row['seconds'] * 1e6:8.1f} us  memory")
        else:
            lines.append(
                f"    {row['launch']:<24} {row['seconds'] * 1e6:8.1f} us  {row['bound']}-bound, "
                f"{row['tile_clocks']:.0f} clk/tile, {row['instructions_per_logit']} instr/logit, "
                f"{row['blocks']} blocks x {row['tiles_per_block']} tiles, {row['blocks_per_sm']} blocks/SM"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", help="as sass_report.py --objects")
    parser.add_argument("--cuobjdump", help="as sass_report.py --cuobjdump")
    parser.add_argument("--out", help="write the predictions as JSON here (nothing is written without it)")
    args = parser.parse_args(argv)
    functions, kernels = load(args.objects, args.cuobjdump)
    if functions is None:
        print("sass_model: no CUDA objects or no cuobjdump: nothing to model", file=sys.stderr)
        return 0
    workloads = []
    if any("infonce" in k["object"] for k in kernels):
        workloads += [make(kind) for kind in ("mma", "wmma") for make in (ntxent_workload, clip_workload)]
    if any("moco" in k["object"] for k in kernels):
        workloads += [moco_workload(kind) for kind in ("mma", "simt")]
    predictions = []
    for workload in workloads:
        prediction = predict(workload, functions, kernels)
        predictions.append(prediction)
        print(format_prediction(prediction))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        machine = {"sms": SMS, "clock_hz": CLOCK_HZ, "dense_bf16_flops": DENSE_BF16_FLOPS,
                   "dram_bytes_per_s": DRAM_BYTES_PER_S, "l2_bytes_per_s": L2_BYTES_PER_S}  # fmt: skip
        Path(args.out).write_text(json.dumps({"machine": machine, "predictions": predictions}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
