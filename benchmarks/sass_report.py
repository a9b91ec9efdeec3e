"""Per-kernel register, shared-memory, stack and spill report of the compiled CUDA objects, read
from their embedded SASS with ``cuobjdump``; ``--check`` fails when a hot kernel spills or a
tensor-core kernel has no HMMA instruction.

Usage::

    python benchmarks/sass_report.py                      # table of build/**/_C.dir/**/*.cu.o
    python benchmarks/sass_report.py --check --out sass.json
    python benchmarks/sass_report.py --objects build/cp311-cp311-linux_x86_64 --cuobjdump PATH

What "spill" means here
-----------------------
``cuobjdump --dump-resource-usage`` gives REG, STACK (the per-thread stack frame), SHARED and
LOCAL, but no spill counts: those exist only in ``ptxas -v`` output at build time. Since the
sm_20 ABI, ptxas spills registers into the stack frame with ``STL`` and reloads them with
``LDL``, so the report counts those in the SASS:

* ``spill_stores`` = bytes written by ``STL`` instructions, ``spill_loads`` = bytes read by
  ``LDL`` instructions (width from the ``.U8/.S8/.U16/.S16/.64/.128`` suffix, else 4 bytes),
  counting each instruction once as it appears in the code (not per execution). On the
  objects of this project these match ptxas's "N bytes spill stores, M bytes spill loads".
* A kernel *spills* when ``spill_stores``, ``spill_loads`` or ``local_bytes`` (LOCAL: local
  memory outside the stack frame) is non-zero. A stack frame (STACK > 0) with no STL/LDL is
  reported but is not a spill: ABI calls and address-taken locals reached through generic
  ``LD``/``ST`` use it without register pressure being the cause. A local array indexed with
  dynamic subscripts is accessed with STL/LDL as well and so counts as a spill: for a hot
  kernel that is just as slow, and worth the same warning.

``shared_bytes`` is cuobjdump's SHARED, which on sm_90 includes the 1 KiB the driver reserves
per block (ptxas -v reports 1 KiB less).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OBJECTS = "build/**/CMakeFiles/_C.dir/**/*.cu.o"

# Substrings of kernel names: a hot kernel runs every training step, so a spill there costs
# time on every step; a tensor-core kernel exists only to use HMMA, so without it the kernel is
# a slower copy of its SIMT twin.
HOT_PATTERNS = (
    "lse_partial",
    "grad_partial",
    "wide_grad",
    "moco_sweep",
    "moco_mma_sweep",  # MoCo's tensor-core sweep (moco_mma.cuh)
    "ema_update_kernel",
    "pass1_kernel",
    "pass2_kernel",
)
TENSOR_CORE_PATTERNS = (
    "_mma_kernel",  # the WMMA kernels of infonce_kernels.cuh
    "mma::lse_partial_kernel",  # the mma.sync kernels of infonce_mma.cuh
    "mma::grad_partial_kernel",
    "mma::wide_grad_kernel",
    "moco::mma::moco_mma_sweep_kernel",
)

# Base opcodes (before the first '.') so LDSM is not counted as LDS nor HFMA2.MMA as HMMA.
COUNTED_OPCODES = (
    "HMMA", "LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "MUFU", "BAR", "LDL", "STL",
)  # fmt: skip

LOCAL_ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
DEFAULT_LOCAL_ACCESS_BYTES = 4

RESOURCE_FUNCTION_RE = re.compile(r"^\s*Function\s+(\S+?):\s*$")
RESOURCE_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")
ARCH_RE = re.compile(r"^\s*arch\s*=\s*(sm_\w+)")
SASS_ARCH_RE = re.compile(r"^\s*code for (sm_\w+)")
SASS_FUNCTION_RE = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
# An instruction line starts with its address comment ("/*0280*/"); the encoding-only lines
# start with "/* 0x" and so do not match.
SASS_INSTRUCTION_RE = re.compile(
    r"^\s*/\*[0-9a-fA-F]+\*/\s+"  # address
    r"(?:@!?U?P(?:T|\d+)\s+)?"  # predicate guard
    r"([A-Z][A-Z0-9_.]*)"  # opcode with its modifiers
)

NO_DEVICE_CODE_MARK = "does not contain device code"


@dataclass
class ResourceUsage:
    registers: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    local_bytes: int | None = None


@dataclass
class SassStats:
    instructions: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    opcode_counts: Counter = field(default_factory=Counter)


# ---- locating the tool and the objects ---------------------------------------------------------


def triton_cuobjdump() -> Path | None:
    """The cuobjdump that the triton wheel of this Python ships (torch environments have triton
    even where no CUDA toolkit is installed)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if is_executable(candidate):
            return candidate
    return None


def is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_cuobjdump(explicit: str | None) -> tuple[Path | None, list[str]]:
    """The cuobjdump to use, in order: --cuobjdump, $CUOBJDUMP, PATH, /usr/local/cuda/bin, the
    triton wheel. Returns it with notes on rejected candidates (a bad explicit path raises)."""
    notes = []
    if explicit:
        path = Path(explicit)
        if not is_executable(path):
            raise FileNotFoundError(f"--cuobjdump {explicit}: not an executable file")
        return path, notes
    from_env = os.environ.get("CUOBJDUMP")
    if from_env:
        if is_executable(Path(from_env)):
            return Path(from_env), notes
        notes.append(f"CUOBJDUMP={from_env} is not an executable file; looking further")
    on_path = shutil.which("cuobjdump")
    if on_path:
        return Path(on_path), notes
    toolkit = Path("/usr/local/cuda/bin/cuobjdump")
    if is_executable(toolkit):
        return toolkit, notes
    return triton_cuobjdump(), notes


def find_objects(spec: str | None) -> list[Path]:
    """Objects named by a file, a directory (its *.cu.o, recursively) or a glob. A relative
    spec is tried from the current directory, then from the repository root, so the default
    works wherever the script is started."""
    spec = spec or DEFAULT_OBJECTS
    bases = [Path(spec)] if Path(spec).is_absolute() else [Path(spec), REPO_ROOT / spec]
    for path in bases:
        if path.is_file():
            return [path]
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.cu.o") if p.is_file())
        else:
            matches = glob.glob(str(path), recursive=True)
            found = sorted(Path(p) for p in matches if Path(p).is_file())
        if found:
            return found
    return []


# ---- parsing cuobjdump output ------------------------------------------------------------------


def parse_resource_usage(text: str) -> dict[tuple[str, str], ResourceUsage]:
    """``cuobjdump --dump-resource-usage`` output -> {(arch, mangled name): usage}."""
    usages: dict[tuple[str, str], ResourceUsage] = {}
    arch = "unknown"
    current: ResourceUsage | None = None
    for line in text.splitlines():
        if match := ARCH_RE.match(line):
            arch = match.group(1)
            current = None
        elif match := RESOURCE_FUNCTION_RE.match(line):
            current = usages.setdefault((arch, match.group(1)), ResourceUsage())
        elif current is not None and "REG:" in line:
            fields = dict(RESOURCE_FIELD_RE.findall(line))
            current.registers = int(fields.get("REG", 0))
            current.stack_bytes = int(fields.get("STACK", 0))
            current.shared_bytes = int(fields.get("SHARED", 0))
            current.local_bytes = int(fields.get("LOCAL", 0))
            current = None
    return usages


def local_access_bytes(opcode: str) -> int:
    for modifier in opcode.split(".")[1:]:
        if modifier in LOCAL_ACCESS_BYTES:
            return LOCAL_ACCESS_BYTES[modifier]
    return DEFAULT_LOCAL_ACCESS_BYTES


def parse_sass(text: str) -> dict[tuple[str, str], SassStats]:
    """``cuobjdump -sass`` output -> {(arch, mangled name): instruction statistics}. NOPs are
    left out of the instruction count: they are alignment padding after the last EXIT."""
    stats: dict[tuple[str, str], SassStats] = {}
    arch = "unknown"
    current: SassStats | None = None
    for line in text.splitlines():
        if match := SASS_INSTRUCTION_RE.match(line):
            if current is None:
                continue
            opcode = match.group(1)
            base = opcode.split(".", 1)[0]
            if base == "NOP":
                continue
            current.instructions += 1
            if base in COUNTED_OPCODES:
                current.opcode_counts[base] += 1
            if base == "STL":
                current.spill_stores += local_access_bytes(opcode)
            elif base == "LDL":
                current.spill_loads += local_access_bytes(opcode)
        elif match := SASS_FUNCTION_RE.match(line):
            current = stats.setdefault((arch, match.group(1)), SassStats())
        elif match := SASS_ARCH_RE.match(line):
            arch = match.group(1)
            current = None
    return stats


# ---- names -------------------------------------------------------------------------------------


def demangle_all(mangled_names: list[str]) -> dict[str, str]:
    """{mangled: demangled} through one c++filt process; without c++filt each name maps to the
    readable part parsed out of the mangled name itself."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and mangled_names:
        result = subprocess.run([cxxfilt], input="\n".join(mangled_names) + "\n", capture_output=True, text=True)
        lines = result.stdout.splitlines()
        if result.returncode == 0 and len(lines) == len(mangled_names):
            return dict(zip(mangled_names, lines))
    return {name: fallback_demangle(name) for name in mangled_names}


def fallback_demangle(mangled: str) -> str:
    """The qualified name of an Itanium-mangled symbol (template arguments as <...>), enough to
    tell kernels apart when c++filt is missing; anything unparsable is returned as it is."""
    if mangled.startswith("_ZN"):
        position, nested = 3, True
    elif mangled.startswith("_Z"):
        position, nested = 2, False
    else:
        return mangled
    components: list[str] = []
    while position < len(mangled):
        digits = re.match(r"\d+", mangled[position:])
        if digits:
            length = int(digits.group())
            start = position + len(digits.group())
            identifier = mangled[start : start + length]
            if not identifier.startswith("_GLOBAL__N"):
                components.append(identifier)
            position = start + length
            if not nested:
                break
        elif mangled[position] == "I":
            components[-1:] = [components[-1] + "<...>"] if components else []
            break
        else:
            break
    return "::".join(components) or mangled


def short_name(demangled: str) -> str:
    """The demangled name without return type, parameter list and anonymous namespaces, e.g.
    ``pyssl::infonce::cuda::lse_partial_kernel<float>``."""
    name = demangled.replace("(anonymous namespace)::", "")
    depth = 0
    for index, char in enumerate(name):
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0:
            name = name[:index]
            break
    # Template kernels demangle with their return type first ("void ns::kernel<T>(...)").
    if name.startswith("void "):
        name = name[len("void ") :]
    return name.strip()


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(pattern in name for pattern in patterns)


# ---- one object --------------------------------------------------------------------------------


@dataclass
class ObjectReport:
    path: Path
    kernels: list[dict] = field(default_factory=list)
    error: str | None = None
    no_device_code: bool = False


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def run_cuobjdump(tool: Path, option: str, obj: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(tool), option, str(obj)], capture_output=True, text=True)


def analyse_object(tool: Path, obj: Path) -> ObjectReport:
    report = ObjectReport(obj)
    usage_run = run_cuobjdump(tool, "--dump-resource-usage", obj)
    if usage_run.returncode != 0:
        message = (usage_run.stderr or usage_run.stdout).strip()
        if NO_DEVICE_CODE_MARK in message:
            report.no_device_code = True
        else:
            report.error = message or f"cuobjdump exited with {usage_run.returncode}"
        return report
    sass_run = run_cuobjdump(tool, "-sass", obj)
    if sass_run.returncode != 0:
        report.error = (sass_run.stderr or sass_run.stdout).strip() or "cuobjdump -sass failed"
        return report
    report.kernels = merge_kernels(
        parse_resource_usage(usage_run.stdout), parse_sass(sass_run.stdout), display_path(obj)
    )
    return report


def merge_kernels(
    usages: dict[tuple[str, str], ResourceUsage],
    sass: dict[tuple[str, str], SassStats],
    object_name: str,
    demangled: dict[str, str] | None = None,
) -> list[dict]:
    """One record per (arch, function) seen in either dump; fields a dump lacks stay None."""
    keys = sorted(set(usages) | set(sass))
    if demangled is None:
        demangled = demangle_all(sorted({mangled for _, mangled in keys}))
    kernels = []
    for arch, mangled in keys:
        usage = usages.get((arch, mangled), ResourceUsage())
        stats = sass.get((arch, mangled))
        full_name = demangled.get(mangled, mangled)
        name = short_name(full_name)
        opcode_counts = {op: stats.opcode_counts[op] for op in COUNTED_OPCODES} if stats else {}
        kernels.append(
            {
                "name": name,
                "demangled": full_name,
                "mangled": mangled,
                "object": object_name,
                "arch": arch,
                "registers": usage.registers,
                "shared_bytes": usage.shared_bytes,
                "stack_bytes": usage.stack_bytes,
                "local_bytes": usage.local_bytes,
                "spill_stores": stats.spill_stores if stats else None,
                "spill_loads": stats.spill_loads if stats else None,
                "hmma": bool(stats and stats.opcode_counts.get("HMMA", 0)),
                "sass_instructions": stats.instructions if stats else None,
                "opcode_counts": opcode_counts,
                "hot": matches_any(name, HOT_PATTERNS) or matches_any(mangled, HOT_PATTERNS),
                "tensor_core": matches_any(name, TENSOR_CORE_PATTERNS) or matches_any(mangled, TENSOR_CORE_PATTERNS),
            }
        )
    # Sorted by readable name so a kernel's template instances sit next to each other.
    return sorted(kernels, key=lambda kernel: (kernel["arch"], kernel["name"], kernel["mangled"]))


# ---- verdicts and output -----------------------------------------------------------------------


def spills(kernel: dict) -> bool:
    return bool(kernel["spill_stores"] or kernel["spill_loads"] or kernel["local_bytes"])


def find_violations(
    kernels: list[dict],
    unreadable: list[ObjectReport] | None = None,
    known_spills: tuple[str, ...] = (),
) -> list[dict]:
    """``known_spills``: exact demangled kernel names whose spills are known and tracked (they
    are reported, not counted as violations); any other spilling hot kernel is one."""
    violations = []
    for kernel in kernels:
        where = f"{kernel['name']} [{kernel['arch']}, {kernel['object']}]"
        if kernel["hot"] and spills(kernel) and kernel["name"] not in known_spills:
            violations.append(
                {
                    "kind": "spill",
                    "kernel": kernel["name"],
                    "mangled": kernel["mangled"],
                    "object": kernel["object"],
                    "message": (
                        f"hot kernel spills: {where}: {kernel['spill_stores']} bytes spill "
                        f"stores (STL), {kernel['spill_loads']} bytes spill loads (LDL), "
                        f"{kernel['local_bytes']} bytes local memory, stack frame "
                        f"{kernel['stack_bytes']} bytes, {kernel['registers']} registers"
                    ),
                }
            )
        if kernel["tensor_core"] and not kernel["hmma"]:
            violations.append(
                {
                    "kind": "no_hmma",
                    "kernel": kernel["name"],
                    "mangled": kernel["mangled"],
                    "object": kernel["object"],
                    "message": f"tensor-core kernel has no HMMA instruction: {where}",
                }
            )
    for report in unreadable or []:
        violations.append(
            {
                "kind": "unreadable",
                "kernel": None,
                "mangled": None,
                "object": display_path(report.path),
                "message": f"cannot read {display_path(report.path)}: {report.error}",
            }
        )
    return violations


def format_bytes_pair(stores: int | None, loads: int | None) -> str:
    if stores is None or loads is None:
        return "?"
    return f"{stores}/{loads}"


def format_table(kernels: list[dict]) -> str:
    if not kernels:
        return "(no kernels)"
    name_width = min(72, max(len("kernel"), *(len(k["name"]) for k in kernels)))
    header = (
        f"  {'kernel':<{name_width}} {'REG':>4} {'SHARED':>7} {'STACK':>5} {'LOCAL':>5} "
        f"{'SPILL st/ld':>11} {'HMMA':>5} {'LDG':>5} {'LDS':>5} {'STS':>5} {'MUFU':>5} "
        f"{'BAR':>4} {'INSTR':>6}  flags"
    )
    lines = []
    current_group = None
    for kernel in kernels:
        if (kernel["object"], kernel["arch"]) != current_group:
            current_group = (kernel["object"], kernel["arch"])
            if lines:
                lines.append("")
            lines += [f"{kernel['object']} ({kernel['arch']})", header]
        counts = kernel["opcode_counts"]
        flags = [flag for flag, on in (("hot", kernel["hot"]), ("tc", kernel["tensor_core"])) if on]
        if kernel["hot"] and spills(kernel):
            flags.append("SPILLS")
        elif spills(kernel):
            flags.append("spills")
        if kernel["tensor_core"] and not kernel["hmma"]:
            flags.append("NO-HMMA")
        name = kernel["name"]
        if len(name) > name_width:
            name = name[: name_width - 3] + "..."
        lines.append(
            f"  {name:<{name_width}} {show(kernel['registers']):>4} "
            f"{show(kernel['shared_bytes']):>7} {show(kernel['stack_bytes']):>5} "
            f"{show(kernel['local_bytes']):>5} "
            f"{format_bytes_pair(kernel['spill_stores'], kernel['spill_loads']):>11} "
            f"{show(counts.get('HMMA')):>5} {show(counts.get('LDG')):>5} "
            f"{show(counts.get('LDS')):>5} {show(counts.get('STS')):>5} "
            f"{show(counts.get('MUFU')):>5} {show(counts.get('BAR')):>4} "
            f"{show(kernel['sass_instructions']):>6}  {','.join(flags)}"
        )
    return "\n".join(lines)


def show(value) -> str:
    return "?" if value is None else str(value)


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Registers, shared memory, stack, spills and HMMA use of each CUDA kernel "
        "in the compiled objects (read with cuobjdump)."
    )
    parser.add_argument(
        "--objects",
        help=f"an object file, a directory (its *.cu.o) or a glob; default {DEFAULT_OBJECTS} under the repository root",
    )
    parser.add_argument("--out", help="write the table as JSON here (nothing is written without it)")
    parser.add_argument(
        "--cuobjdump",
        help="cuobjdump to use; default $CUOBJDUMP, PATH, /usr/local/cuda/bin, then the triton wheel of this Python",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a hot kernel spills, a tensor-core kernel has no HMMA, or an object cannot be read",
    )
    parser.add_argument(
        "--known-spill",
        action="append",
        default=[],
        metavar="KERNEL",
        help="a hot kernel (exact demangled name) whose spill is known and tracked: reported, not a "
        "violation (repeatable); a spill anywhere else still fails --check",
    )
    parser.add_argument(
        "--require",
        action="store_true",
        help="exit 1 when there is nothing to check: no CUDA objects, no kernels or no cuobjdump "
        "(default: say so and exit 0, as on a CPU-only build)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def nothing_to_check(reason: str, tool: Path | None, objects: list[Path]) -> int:
        print(f"sass_report: {reason}", file=sys.stderr)
        if args.out:
            write_json(
                args.out,
                {
                    "tool": str(tool) if tool else None,
                    "objects": [display_path(p) for p in objects],
                    "kernels": [],
                    "violations": [],
                    "skipped": reason,
                },
            )
        return 1 if args.require else 0

    objects = find_objects(args.objects)
    if not objects:
        where = args.objects or DEFAULT_OBJECTS
        return nothing_to_check(
            f"no CUDA objects match {where} (CPU-only build, or not built yet); nothing to report",
            None,
            [],
        )
    try:
        tool, notes = find_cuobjdump(args.cuobjdump)
    except FileNotFoundError as error:
        print(f"sass_report: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"sass_report: {note}", file=sys.stderr)
    if tool is None:
        return nothing_to_check(
            "no cuobjdump found (tried --cuobjdump, $CUOBJDUMP, PATH, /usr/local/cuda/bin, the "
            "triton wheel); cannot read the SASS",
            None,
            objects,
        )

    # cuobjdump runs are independent and mostly wait on one process each; a few at once halve
    # the wall time without taking every core from a build running alongside.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        reports = list(pool.map(lambda obj: analyse_object(tool, obj), objects))

    kernels = [kernel for report in reports for kernel in report.kernels]
    unreadable = [report for report in reports if report.error]
    if not kernels and not unreadable:
        return nothing_to_check("the objects contain no CUDA kernels", tool, objects)
    violations = find_violations(kernels, unreadable, tuple(args.known_spill))
    for name in args.known_spill:
        if any(k["name"] == name and spills(k) for k in kernels):
            print(f"known spill (tracked, not a violation): {name}")

    print(f"cuobjdump: {tool}")
    for report in reports:
        if report.no_device_code:
            print(f"{display_path(report.path)}: no device code")
    print(format_table(kernels))
    hot_count = sum(k["hot"] for k in kernels)
    tensor_core_count = sum(k["tensor_core"] for k in kernels)
    print(
        f"\n{len(kernels)} kernels in {len(objects)} objects; {hot_count} hot, "
        f"{tensor_core_count} tensor-core; spill = STL/LDL bytes in the SASS or LOCAL > 0"
    )
    if violations:
        label = "VIOLATIONS" if args.check else "warnings (not failing without --check)"
        print(f"\n{len(violations)} {label}:")
        for violation in violations:
            print(f"  - [{violation['kind']}] {violation['message']}")
    else:
        tracked = " (apart from the known spills above)" if args.known_spill else ""
        print(f"no violations: hot kernels do not spill{tracked}; tensor-core kernels contain HMMA")

    if args.out:
        write_json(
            args.out,
            {
                "tool": str(tool),
                "objects": [display_path(p) for p in objects],
                "kernels": kernels,
                "violations": violations,
            },
        )
        print(f"wrote {args.out}")

    return 1 if args.check and violations else 0


if __name__ == "__main__":
    sys.exit(main())
