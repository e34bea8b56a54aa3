"""Reading compiled GPU code without a GPU: the CUDA binary tools, SASS text and per-kernel resource usage.

``cuobjdump`` and ``nvdisasm`` come with the CUDA toolkit and with Triton's NVIDIA backend
(``triton/backends/nvidia/bin``), so they are found even where only pip packages are installed.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


def tool(name: str) -> str:
    """Path of a CUDA binary tool (``cuobjdump``, ``nvdisasm``): the toolkit's, else Triton's, else PATH's."""
    from fastdpo import _build

    cands = []
    home = _build.cuda_home()
    if home:
        cands.append(Path(home) / "bin" / name)
    try:
        import triton

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"fastdpo: {name} not found (looked in {', '.join(map(str, cands)) or 'no CUDA toolkit'} and PATH); "
        "install the CUDA toolkit or triton"
    )


def _run(args: list[str]) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"fastdpo: {' '.join(args[:2])} failed ({p.returncode}): {p.stderr.strip()[:500]}")
    return p.stdout


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (one ELF for one architecture), as ``nvdisasm`` prints it."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _run([tool("nvdisasm"), "-c", f.name])


def library_sass(path: str | os.PathLike, arch: str = "sm_90") -> str:
    """SASS of every kernel a fat binary (a ``.so``) holds for ``arch``."""
    return _run([tool("cuobjdump"), "-sass", "-arch", arch, str(path)])


_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_RES = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def resource_usage(path: str | os.PathLike) -> dict[str, dict[str, dict[str, int]]]:
    """``{arch: {kernel: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}}`` from
    ``cuobjdump --dump-resource-usage`` of a fat binary or cubin."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    arch = ""  # a cubin's listing names no architecture
    func = None
    for line in _run([tool("cuobjdump"), "--dump-resource-usage", str(path)]).splitlines():
        m = re.match(r"\s*arch = (\S+)", line)
        if m:
            arch = m.group(1)
            out.setdefault(arch, {})
            continue
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line:
            out.setdefault(arch, {})[func] = {k: int(v) for k, v in _RES.findall(line)}
            func = None
    return out


def embedded_ptx(path: str | os.PathLike) -> list[str]:
    """Names of the PTX files a fat binary embeds (empty when it has none)."""
    p = subprocess.run([tool("cuobjdump"), "-lptx", str(path)], capture_output=True, text=True, timeout=300)
    return re.findall(r"PTX file\s+\d+:\s*(\S+)", p.stdout)


def kernel_attributes(path: str | os.PathLike, arch: str = "sm_90") -> dict[str, dict[str, int]]:
    """Per kernel, the launch attributes its ELF records (``.nv.info.<kernel>``): ``max_threads``
    (threads per block, from ``__launch_bounds__``: ``EIATTR_MAX_THREADS``) and ``max_regs`` (the
    register cap the bounds imply: ``EIATTR_MAXREG_COUNT``), where present."""
    args = [tool("cuobjdump"), "-elf", str(path)]
    if not str(path).endswith(".cubin"):
        args[2:2] = ["-arch", arch]
    out: dict[str, dict[str, int]] = {}
    func = None
    attr = None
    for line in _run(args).splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)\s*$", line.strip())
        if m:
            func = m.group(1)
            continue
        m = re.match(r"\s*Attribute:\s*(\S+)", line)
        if m:
            attr = m.group(1)
            continue
        if func is None or attr not in ("EIATTR_MAX_THREADS", "EIATTR_MAXREG_COUNT"):
            continue
        m = re.match(r"\s*Value:\s*((?:0x[0-9a-f]+\s*)+)$", line)
        if m:
            vals = [int(v, 16) for v in m.group(1).split()]
            if attr == "EIATTR_MAX_THREADS":
                out.setdefault(func, {})["max_threads"] = vals[0] * vals[1] * vals[2] if len(vals) == 3 else vals[0]
            else:
                out.setdefault(func, {})["max_regs"] = vals[0]
            attr = None
    return out


def launch_bounds(path: str | os.PathLike, arch: str = "sm_90") -> dict[str, int]:
    """``{kernel: max threads per block}`` of the kernels compiled with ``__launch_bounds__``."""
    return {k: v["max_threads"] for k, v in kernel_attributes(path, arch).items() if "max_threads" in v}


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled C++ names (``c++filt``); names it cannot read map to themselves."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    p = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, timeout=60)
    got = p.stdout.splitlines()
    return dict(zip(names, got)) if p.returncode == 0 and len(got) == len(names) else {n: n for n in names}


# --------------------------------------------------------------------------- SASS main-loop profiler
#
# A loop in SASS is the code between a backward branch and its target. The hot loop of a
# streaming kernel is an innermost loop that moves global memory; its instruction count per
# iteration, against the bytes it moves per iteration, is what bounds the kernel when it cannot
# keep up with HBM. Counts are static: every instruction between the loop's head and its
# back-edge counts once per iteration (both sides of a branch inside the body count; the
# profiles say how many conditional branches a body has).

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_PRED = re.compile(r"^(@!?U?P(?:\d|T))\s+")
_TARGET_HEX = re.compile(r"(?:^|[\s,])(0x[0-9a-f]+)\s*$")
_TARGET_LABEL = re.compile(r"`\((\.L\w+)\)")
_KERNEL_CUOBJDUMP = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_KERNEL_NVDISASM = re.compile(r"^\s*\.text\.(\S+):\s*$")


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    pred: str  # "" or a guard such as "@P0", "@!P1"
    op: str  # full opcode with modifiers, e.g. "LDG.E.128.CONSTANT"
    args: str  # operand text
    target: int | None = None  # branch target address

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """Kernels of a SASS listing (``cuobjdump -sass`` or ``nvdisasm`` output) -> their instructions
    in address order, branch targets resolved (hex addresses or ``.L`` labels)."""
    kernels: dict[str, list[tuple[int, str, str, str, str | None]]] = {}
    labels: dict[str, dict[str, int]] = {}
    cur = None
    pending: list[str] = []
    for line in text.splitlines():
        m = _KERNEL_CUOBJDUMP.match(line) or _KERNEL_NVDISASM.match(line)
        if m:
            cur = m.group(1)
            kernels.setdefault(cur, [])
            labels.setdefault(cur, {})
            pending = []
            continue
        if cur is None:
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2).strip()
        for lab in pending:
            labels[cur][lab] = addr
        pending = []
        pred = ""
        pm = _PRED.match(body)
        if pm:
            pred, body = pm.group(1), body[pm.end():]
        op, _, args = body.partition(" ")
        args = args.strip()
        tl = _TARGET_LABEL.search(args)
        kernels[cur].append((addr, pred, op, args, tl.group(1) if tl else None))
    out: dict[str, list[Instr]] = {}
    for name, rows in kernels.items():
        instrs = []
        for addr, pred, op, args, lab in rows:
            target = None
            if op.split(".", 1)[0] in _BRANCHES:
                if lab is not None:
                    target = labels[name].get(lab)
                else:
                    th = _TARGET_HEX.search(args)
                    target = int(th.group(1), 16) if th else None
            instrs.append(Instr(addr, pred, op, args, target))
        out[name] = instrs
    return out


_BRANCHES = {"BRA", "JMP", "BRX", "JMX"}
# Special-function unit (16 lanes per SM per clock on sm_80/sm_90; the FP32 pipe has 128): MUFU.*,
# and the conversions the CUDA programming guide lists at the same rate ("all other type
# conversions"). F2FP (packed fp32 -> bf16/fp16) and I2FP/F2IP run on the ALU pipes.
_SFU_CONVERSIONS = {"F2F", "F2I", "I2F", "I2I", "FRND"}
_NOT_ISSUED = {"NOP"}
# Cross-thread exchanges that end one pass over a row before the next begins.
_REDUCTIONS = {"SHFL", "BAR", "REDUX", "ATOMS", "MEMBAR", "WARPSYNC"}


def _mem_width(op: str) -> int:
    """Bytes one thread moves with a load/store opcode (``LDG.E.128`` -> 16, ``STG.E.U16`` -> 2)."""
    mods = op.split(".")[1:]
    for m in mods:
        if m == "128":
            return 16
        if m == "64":
            return 8
        if m in ("U16", "S16", "16"):
            return 2
        if m in ("U8", "S8", "8"):
            return 1
    return 4


def _mem_kind(op: str) -> str | None:
    """'load' / 'store' for global (or generic) memory, 'shared', 'local', else None."""
    base = op.split(".", 1)[0]
    if base in ("LDG", "LD"):
        return "load"
    if base in ("STG", "ST"):
        return "store"
    if base in ("LDS", "STS", "LDSM", "ATOMS"):
        return "shared"
    if base in ("LDL", "STL"):
        return "local"
    return None


@dataclasses.dataclass
class Loop:
    """One loop: the instructions from its head (a backward branch's target) to its last back-edge."""

    start: int
    end: int
    instrs: list[Instr]

    @property
    def n_instr(self) -> int:
        """Instructions issued per iteration (NOPs excluded)."""
        return sum(1 for i in self.instrs if i.base not in _NOT_ISSUED)

    @property
    def mufu(self) -> collections.Counter:
        return collections.Counter(i.op.split(".")[1] if "." in i.op else i.op
                                   for i in self.instrs if i.base == "MUFU")

    @property
    def n_mufu(self) -> int:
        return sum(1 for i in self.instrs if i.base == "MUFU")

    @property
    def n_sfu(self) -> int:
        """MUFU ops plus the conversions that share the special-function unit's rate."""
        return self.n_mufu + sum(1 for i in self.instrs if i.base in _SFU_CONVERSIONS)

    def _mem(self, kind: str) -> collections.Counter:
        return collections.Counter(_mem_width(i.op) for i in self.instrs if _mem_kind(i.op) == kind)

    @property
    def loads(self) -> collections.Counter:
        """Global loads per iteration by width in bytes, e.g. ``{16: 2}`` for two ``LDG.E.128``."""
        return self._mem("load")

    @property
    def stores(self) -> collections.Counter:
        return self._mem("store")

    @property
    def load_bytes(self) -> int:
        return sum(w * n for w, n in self.loads.items())

    @property
    def store_bytes(self) -> int:
        return sum(w * n for w, n in self.stores.items())

    @property
    def n_shared(self) -> int:
        return sum(1 for i in self.instrs if _mem_kind(i.op) == "shared")

    @property
    def n_local(self) -> int:
        return sum(1 for i in self.instrs if _mem_kind(i.op) == "local")

    @property
    def n_cond_branches(self) -> int:
        """Conditional branches inside the body other than the back-edge(s)."""
        return sum(1 for i in self.instrs if i.base in _BRANCHES and i.pred and i.target != self.start)

    @property
    def moves_global(self) -> bool:
        return bool(self.loads or self.stores)

    def elements(self, dtype_bytes: int) -> float:
        """Elements of ``dtype_bytes`` each thread loads and stores per iteration."""
        return (self.load_bytes + self.store_bytes) / dtype_bytes

    def signature(self) -> tuple:
        return (tuple(sorted(self.loads.items())), tuple(sorted(self.stores.items())))

    def summary(self) -> str:
        ld = "+".join(f"{n}x{8 * w}b" for w, n in sorted(self.loads.items())) or "-"
        st = "+".join(f"{n}x{8 * w}b" for w, n in sorted(self.stores.items())) or "-"
        return (f"[{self.start:#06x}-{self.end:#06x}] {self.n_instr} instr, {self.n_mufu} MUFU, "
                f"ld {ld}, st {st}, {self.n_cond_branches} cond. branches")


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every loop of a kernel: per backward-branch target, the span up to its last back-edge."""
    heads: dict[int, int] = {}
    for i in instrs:
        if i.base in _BRANCHES and i.target is not None and i.target <= i.addr:
            heads[i.target] = max(heads.get(i.target, -1), i.addr)
    loops = []
    for start, end in sorted(heads.items()):
        body = [i for i in instrs if start <= i.addr <= end]
        loops.append(Loop(start, end, body))
    return loops


def innermost(loops: list[Loop]) -> list[Loop]:
    """Loops that contain no other loop."""
    return [a for a in loops
            if not any(b is not a and a.start <= b.start and b.end <= a.end and (b.start, b.end) != (a.start, a.end)
                       for b in loops)]


def main_loops(instrs: list[Instr]) -> list[Loop]:
    """The hot loops of a streaming kernel, in address order: innermost loops that read global
    memory with the kernel's widest per-thread access (loops that only store, such as the zero
    fill of an ignored row, count only where no loop reads), minus unroll remainders.

    The compiler unrolls a loop into a remainder loop and a loop doing c >= 2 iterations at once;
    the remainder moves a 1/c share of the other's global accesses, and no cross-thread reduction
    (``SHFL``, ``BAR``) and no other hot loop lies between the two. Such a remainder is dropped. The
    loops left are the kernel's passes over its rows (e.g. the policy row, then the reference row)."""
    cands = [lp for lp in innermost(find_loops(instrs)) if lp.moves_global]
    if any(lp.loads for lp in cands):
        cands = [lp for lp in cands if lp.loads]
    if not cands:
        return []
    width = max(max(list(lp.loads) + list(lp.stores)) for lp in cands)
    cands = [lp for lp in cands if width in lp.loads or width in lp.stores]

    def separated(a: Loop, b: Loop) -> bool:
        lo, hi = (a, b) if a.start < b.start else (b, a)
        between = [i for i in instrs if lo.end < i.addr < hi.start]
        if any(i.base in _REDUCTIONS for i in between):
            return True
        return any(c is not a and c is not b and lo.end < c.start and c.end < hi.start for c in cands)

    def remainder_of(small: Loop, big: Loop) -> bool:
        sl, bl = small.loads + small.stores, big.loads + big.stores
        if set(sl) != set(bl) or small.n_instr >= big.n_instr:
            return False
        ratios = {bl[w] / sl[w] for w in sl}
        if len(ratios) != 1:
            return False
        c = ratios.pop()
        return c >= 2 and c == int(c) and not separated(small, big)

    return [lp for lp in cands if not any(remainder_of(lp, other) for other in cands if other is not lp)]


@dataclasses.dataclass
class KernelProfile:
    """The main loops of one kernel and its resources."""

    name: str
    loops: list[Loop]
    regs: int = 0
    shared: int = 0  # static shared memory per block, bytes
    local: int = 0  # local memory per thread, bytes
    threads: int = 0  # threads per block (the launch bound where one is set)

    def per_element(self, dtype_bytes: int, rows: float) -> tuple[float, float, float, float]:
        """(instructions, MUFU ops, SFU-pipe ops, elements per iteration set) per logits element.

        ``rows``: rows of ``dtype_bytes`` elements the kernel moves per vocabulary entry (1 for a
        forward over one row, 2 for policy + reference or for a backward that reads one row and
        writes one). The main loops together move ``sum(elements)`` values per iteration set,
        i.e. ``sum(elements) / rows`` vocabulary entries. Exact for one main loop; for several
        passes it assumes each covers as many vocabulary entries per iteration as the others."""
        if not self.loops:
            raise ValueError(f"fastdpo: no main loop found in {self.name}")
        elems = sum(lp.elements(dtype_bytes) for lp in self.loops) / rows
        n = sum(lp.n_instr for lp in self.loops)
        return (n / elems, sum(lp.n_mufu for lp in self.loops) / elems,
                sum(lp.n_sfu for lp in self.loops) / elems, elems)


def profile_kernels(sass_text: str) -> dict[str, list[Loop]]:
    """Kernel name -> its main loops, for every kernel of a SASS listing."""
    return {name: main_loops(ins) for name, ins in parse_sass(sass_text).items()}


# --------------------------------------------------------------------------- roofline model


@dataclasses.dataclass(frozen=True)
class GPU:
    """Peak rates of one GPU model for the roofline model."""

    name: str
    hbm_tbs: float  # HBM bandwidth, TB/s
    sms: int
    clock_ghz: float  # boost clock
    schedulers: int = 4  # warp schedulers per SM, each issuing one warp instruction per clock
    sfu_per_clock: int = 16  # MUFU lanes per SM per clock (1/8 of the FP32 rate)
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_block: int = 1024  # the runtime reserves 1 KiB of shared memory per block

    @property
    def issue_rate(self) -> float:
        """Thread-instructions per second: SMs x schedulers x 32 lanes x clock."""
        return self.sms * self.schedulers * 32 * self.clock_ghz * 1e9

    @property
    def sfu_rate(self) -> float:
        return self.sms * self.sfu_per_clock * self.clock_ghz * 1e9


# H100 SXM5 and H200 SXM: 132 SMs at a 1.98 GHz boost clock; HBM3 3.35 TB/s, HBM3e 4.8 TB/s.
H100 = GPU("H100", 3.35, 132, 1.98)
H200 = GPU("H200", 4.8, 132, 1.98)


def resident_warps(regs: int, shared: int, threads: int, gpu: GPU = H100) -> int:
    """Warps per SM that fit at once for a kernel with ``regs`` registers per thread, ``shared``
    bytes of shared memory per block and ``threads`` per block (registers are allocated per warp
    in units of 256, shared memory in 128-byte units plus the per-block reservation)."""
    warps_per_block = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    # registers are split between the 4 schedulers' files; a block's warps spread over them
    warps_by_regs = (gpu.regs_per_sm // gpu.schedulers // per_warp) * gpu.schedulers
    blocks = min(gpu.max_blocks_per_sm, gpu.max_warps_per_sm // warps_per_block, warps_by_regs // warps_per_block)
    if shared:
        per_block = -(-shared // 128) * 128 + gpu.smem_reserved_per_block
        blocks = min(blocks, gpu.smem_per_sm // per_block)
    return max(0, blocks) * warps_per_block


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Per logits element: bytes moved from/to HBM, instructions issued, MUFU (and SFU-pipe) ops."""

    bytes_per_elem: float
    instr_per_elem: float
    mufu_per_elem: float
    sfu_per_elem: float | None = None  # MUFU + conversions at the SFU rate; defaults to MUFU only

    def times(self, gpu: GPU) -> dict[str, float]:
        """Seconds per element for memory, instruction issue and the special-function unit."""
        sfu = self.sfu_per_elem if self.sfu_per_elem is not None else self.mufu_per_elem
        return {"memory": self.bytes_per_elem / (gpu.hbm_tbs * 1e12), "issue": self.instr_per_elem / gpu.issue_rate,
                "sfu": sfu / gpu.sfu_rate}

    def ceilings(self, gpu: GPU) -> dict[str, float]:
        """Each compute ceiling as a fraction of the HBM rate (> 1: the kernel can keep up with HBM),
        the tighter one (``ceiling``) and which it is (``bound``)."""
        t = self.times(gpu)
        issue = t["memory"] / t["issue"] if t["issue"] else float("inf")
        sfu = t["memory"] / t["sfu"] if t["sfu"] else float("inf")
        return {"issue": issue, "sfu": sfu, "ceiling": min(issue, sfu), "bound": "issue" if issue <= sfu else "sfu"}


def roofline(profile: KernelProfile, dtype_bytes: int, bytes_per_elem: float) -> Roofline:
    """The roofline of a kernel moving ``bytes_per_elem`` HBM bytes per logits element."""
    instr, mufu, sfu, _ = profile.per_element(dtype_bytes, bytes_per_elem / dtype_bytes)
    return Roofline(bytes_per_elem, instr, mufu, sfu)


def nvcc_cubin(source: str, arch: str = "sm_90", flags: tuple[str, ...] = ("-O3",)) -> bytes:
    """Compile CUDA ``source`` to a cubin for ``arch`` with the toolkit's nvcc, cached on disk by a
    hash of the source, the flags and the compiler (for tests and experiments on small kernels)."""
    import hashlib

    from fastdpo import _build

    home = _build.cuda_home()
    nvcc = Path(home) / "bin" / "nvcc" if home else None
    if nvcc is None or not nvcc.is_file():
        raise FileNotFoundError("fastdpo: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    key = hashlib.sha256(f"{source}|{arch}|{flags}|{nvcc.resolve()}".encode()).hexdigest()[:20]
    out = _build.cache_root() / "cubins" / f"{key}.cubin"
    if out.is_file():
        return out.read_bytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.cu"
        src.write_text(source)
        _run([str(nvcc), "-cubin", f"-arch={arch}", *flags, str(src), "-o", str(Path(d) / "k.cubin")])
        data = (Path(d) / "k.cubin").read_bytes()
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return data
