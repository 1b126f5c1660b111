"""An ESTIMATE, not a measurement: the Triton decoder's throughput on an H100, without a GPU.

    python examples/estimate_sm90.py [--baseline e47aaa0] [--dtype bf16 fp8_e4m3] [--symbols 262144]
                                     [--dump kv.safetensors ...] [--warps 1]

1. Instructions. The decode kernel of kernels/rans_triton.py is compiled for sm_90 with
   Triton's own toolchain (TTIR -> PTX -> ptxas -> cubin; nvdisasm for the SASS: no device
   needed), for each --dtype, and its step loop is split along the control flow: the
   path where every guess of a block hits, the fallback's entry, one gallop round, one
   bisection round (loop bodies from the back edges, the fallback from the forward branch
   that skips it; a CALL counts its subroutine). The baseline is the same file at
   ``--baseline`` (git show; default e47aaa0, the binary search; ``none`` skips it, e.g. in
   a shallow clone), compiled the same way as it was launched (4 warps, 128 lanes): its
   step loop is straight-line code, so its count is per symbol. The value-level decode
   kernel (what the codec runs: the same search with quantize_params fused) is compiled
   too; its hit path gets its own column and estimate. So is the table model's
   (``_decode_table_kernel``, 16-bit dtypes): its hit path and its escape branch. Each SASS
   instruction's source line (nvdisasm -g) splits the value-level hit paths into parts by
   the @triton.jit helper it comes from (quantize_params, the level-1 search, level 2, the
   guess, C, the rANS steps: ``hit_path_parts``). The table decoder reads its parameters
   from ``table_params`` (an elementwise kernel the codec runs once per distinct (mu,
   sigma): per channel under page_stats); its SASS per element is counted too
   (``params_cost``) and added per symbol or per channel.
2. Probes. How often guesses miss and how many C evaluations a miss costs are counted by
   the kernel itself (Decoder.decode(..., probes=...)) under TRITON_INTERPRET=1 on CPU:
   synthetic pages whose values are drawn from the model's own (mu, sigma) (as
   examples/bench_kernels.py), and real KV with the default page_stats predictor for every
   ``--dump`` (``speckv dump-kv`` files; the first ``--tokens`` tokens as one page).
3. The estimate. Blocks run in lockstep: a block pays the fallback's entry if any of its
   lanes misses, and as many gallop / bisection rounds as its worst lane. Expected
   instructions per symbol = hit path + P(block misses) x entry + E[max gallop rounds] x
   gallop round + E[max bisection rounds] x bisection round, for blocks of 32 lanes (one
   warp, what the launcher uses; 32 x --warps lanes if given). At 12-16 T thread-instructions
   per second (what integer loops of this kind issue on an H100, measured with CUDA C++ and
   ncu in the project's GPU notes; docs/BENCHMARKS.md "Coder on GPU") that is GB/s of raw
   KV. The baseline's ~2.15k instructions per bf16 symbol give 11-15 GB/s this way, where
   an H100 measured 14-16 GB/s for that kernel: the method's check.

Assumes issue-bound code (the budget), no divergence inside a warp beyond the block's
loops, and ignores memory (~32 B per symbol of int64 parameters and keys: ~1e11 symbols/s
at 3 TB/s, not the limit below ~150 GB/s of bf16).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUDGET = (12e12, 16e12)  # thread-instructions per second on an H100 (see the docstring)
WARP = 32
TABLE_DTYPES = ("bf16", "fp16")  # what the table model codes


def load_module(name: str, path: Path):
    """A kernel module from a file (the baseline revision's rans_triton)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- 1. Instructions ----------------------------------------------------------------------

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[\w$.]+):")
TARGET = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)\)?")
CALLEE = re.compile(r"CALL\.\S+\s+`?\(?([\w$.]+)\)?")


def sass_of(rt, dtype: str, warps: int, lanes: int, values: bool = False, table: bool = False) -> str:
    """SASS of rt's decode kernel for sm_90 (compiled here, no device), COUNT_PROBES off,
    ``lanes`` per program of ``warps`` warps; with ``values``, of its value-level decode
    kernel instead (what the codec runs: quantize_params fused, storage patterns written);
    with ``table``, of its table-model decode kernel (value-level too)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sglang_speckv.kernels import entropy_model as em

    fn = rt._decode_table_kernel if table else rt._decode_values_kernel if values else rt._decode_kernel
    values = values or table
    consts = dict(zip(("BITS", "MAN_BITS", "BIAS", "FN_NAN"), em.DTYPE_SPECS[dtype]))
    consts.update(BLOCK_LANES=lanes, GALLOP_ROUNDS=getattr(rt, "GALLOP_ROUNDS", 0), COUNT_PROBES=False)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    types = {"q_ptr": "*fp32", "probes_ptr": "*i32"}
    if values:
        bits = "*i16" if em.symbol_bits(dtype) == 16 else "*u8"
        types.update(words_ptr="*i32", mu_ptr="*fp32", sigma_ptr="*fp32", out_bits_ptr=bits, cum1_ptr="*i32",
                     lookup_ptr="*i64", params_ptr="*i32", lane_ok_ptr="*u8")
    sig = {a: "constexpr" if a in consts else types.get(a, "*i64" if a.endswith("_ptr") else "i32")
           for a in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        # -g: each instruction's source line (Triton compiles with line info), for hit_path_parts
        return subprocess.run([str(nvdisasm), "-c", "-g", f.name], capture_output=True, text=True, check=True).stdout


def _parse(sass: str):
    """(instructions [(address, text)], labels {name: address}, count(lo, hi): instructions
    with lo <= address <= hi, a CALL counting its subroutine, branches [(address, target)])."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        if m := LABEL.match(line):
            pending.append(m.group(1))
        elif m := INSTR.search(line):
            addr = int(m.group(1), 16)
            labels.update({name: addr for name in pending})
            pending = []
            instrs.append((addr, m.group(2)))
    subroutine = {}  # callee label -> its instructions up to RET
    for name, start in labels.items():
        if name.startswith("$"):
            body = [t for a, t in instrs if a >= start]
            subroutine[name] = next(i for i, t in enumerate(body) if t.startswith("RET")) + 1

    def count(lo: int, hi: int) -> int:
        total = 0
        for a, t in instrs:
            if lo <= a <= hi:
                total += 1 + (subroutine.get(m.group(1), 0) if (m := CALLEE.search(t)) else 0)
        return total

    branches = [(a, labels[m.group(1)]) for a, t in instrs if (m := TARGET.search(t))]
    return count, branches


def _step_loop(branches):
    """The step loop (the longest back edge) and the forward branches inside it."""
    back = [(t, a) for a, t in branches if t < a]
    start, end = max(back, key=lambda b: b[1] - b[0])
    forward = [(a, t) for a, t in branches if start < a < end and t > a]
    return start, end, back, forward


def loop_costs(sass: str) -> dict[str, int]:
    """Instruction counts of the step loop's paths (see the module docstring)."""
    count, branches = _parse(sass)
    start, end, back, forward = _step_loop(branches)
    inner = sorted((t, a) for t, a in back if start < t and a < end)
    body = count(start, end)
    if not inner:
        return {"per symbol": body}
    if len(inner) != 2:
        raise SystemExit(f"expected two loops (gallop, bisection) inside the step loop, found {len(inner)}")
    skip, skip_to = max(forward, key=lambda b: b[1] - b[0])  # the `if` around the fallback
    region = count(skip + 1, skip_to - 1)
    rounds = [count(t, a) for t, a in inner]
    return {"hit path": body - region, "fallback entry": region - sum(rounds),
            "gallop round": rounds[0], "bisection round": rounds[-1]}


def _table_branches(sass: str):
    """count, the step loop and the table kernel's branches in it: the escape's `if` (the
    largest forward branch), level 1's bisection fallback (the first outside it: level 1
    comes first) and, where the dtype has impossible cells (fp16), level 2's general path
    for a program with a lane in one (the largest left outside both; never taken on a
    stream the encoder wrote), else None."""
    count, branches = _parse(sass)
    start, end, _, forward = _step_loop(branches)
    skip, skip_to = max(forward, key=lambda b: b[1] - b[0])  # the `if` around the escape
    outside = [(a, t) for a, t in forward if t <= skip or a >= skip_to]
    level1 = min(outside)  # the `if` around level 1's bisection
    rest = [(a, t) for a, t in outside if t <= level1[0] or a >= level1[1]]
    impossible = max(rest, key=lambda b: b[1] - b[0]) if rest else None
    return count, (start, end), (skip, skip_to), level1, impossible


def table_loop_costs(sass: str) -> dict[str, int]:
    """The table-model decode kernel's step loop: the hit path (no lane of the program takes
    the exact model's step, and level 1's lookup and step finish every lane: the parameters,
    level 1, level 2 (the offset's raw bits or a zero cell's point), two rANS steps), the
    escape branch's path when the exact model's guess hits for every lane that takes it (the
    branch less the search's fallback, which is the exact kernel's, rounds and all) and level
    1's fallback (the bisection, when a lane is short of its entry). One vote opens both
    branches (a program takes either: "rare"), and each begins with its own vote, which a
    rare program pays even where it takes only the other: "escape vote" and "level-1 vote"
    (0 where a branch is entered by its own vote alone). Level 2's general path for impossible
    cells (fp16) is left out: it runs only on corrupt streams."""
    count, (start, end), (skip, skip_to), (l1_skip, l1_to), impossible = _table_branches(sass)
    branches = _parse(sass)[1]
    region = count(skip + 1, skip_to - 1)
    level1 = count(l1_skip + 1, l1_to - 1)
    general = count(impossible[0] + 1, impossible[1] - 1) if impossible else 0
    nested = [(a, t) for a, t in branches if skip < a < t < skip_to]
    fb_skip, fb_to = max(nested, key=lambda b: b[1] - b[0])  # the exact search's fallback

    def vote(lo, hi):  # a branch's instructions before its inner `if` (that reaches its end)
        inner = [(a, t) for a, t in branches if lo < a < t == hi]
        return count(lo + 1, min(inner)[0]) if inner else 0

    return {"hit path": count(start, end) - region - level1 - general,
            "escape": region - count(fb_skip + 1, fb_to - 1),
            "level-1 fallback": level1, "escape vote": vote(skip, skip_to), "level-1 vote": vote(l1_skip, l1_to)}


# The parts of a value-level hit path, by the @triton.jit helpers its instructions come from
# (nvdisasm -g names the innermost source line; an instruction of the kernel's own line goes
# to the first helper that line calls, else to "loads, stores, loop, vote").
PARTS = {
    "quantize_params": ("_quantize", "_quantize_mu", "_param_r", "_round_half_even", "_pow2_f64"),
    "parameters (table_params' int32, unpacked)": ("_unpack_params",),
    "dense test": ("_dense",),
    "level 1 (row, lookup, one step)": ("_row_index", "_level1_entry", "_level1_bisect"),
    "level 2 (offset bits, zero-cell point)": ("_decode_level2", "_decode_level2_float", "_decode_level2_general",
                                               "_mu_cell", "_trunc_magnitude", "_zero_points", "_decode_point",
                                               "_ceil_shift", "_magnitude_fields"),
    "guess": ("_guess_key", "_nearest_key", "_pow2"),
    "C(guess), C(guess + 1)": ("_cdf_pair", "_cdf_from_boundary", "_cdf", "_value_units", "_phi", "_inverse"),
    "guess check, vote": ("_find_key",),
    "rANS state updates": ("_rans_pop", "_rans_x", "_rans_refill", "_rans_pop_bits"),
}
LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
CALL = re.compile(r"\b(_\w+)\(")


def hit_path_parts(rt, sass: str, kernel: str) -> dict[str, int]:
    """The hit path of a value-level decode kernel (the step loop less its largest forward
    branch: the search's fallback, or the table kernel's escape) split into PARTS by source
    line: an ESTIMATE of what each part costs (the compiler interleaves and shares
    instructions between parts; a CALL counts its subroutine as in loop_costs)."""
    import inspect

    source = Path(inspect.getsourcefile(rt._decode_kernel.fn)).read_text().splitlines()
    helpers = {}  # source line -> the @triton.jit function it belongs to
    for name, obj in vars(rt).items():
        if inspect.isfunction(getattr(obj, "fn", None)):
            lines, first = inspect.getsourcelines(obj.fn)
            helpers.update({first + i: name for i in range(len(lines))})
    part_of = {h: part for part, names in PARTS.items() for h in names}
    count, branches = _parse(sass)
    start, end, _, forward = _step_loop(branches)
    skip, skip_to = max(forward, key=lambda b: b[1] - b[0])
    skips = [(skip, skip_to)]
    if kernel == "_decode_table_kernel":  # and level 1's fallback (and fp16's impossible-cell branch)
        skips += [b for b in _table_branches(sass)[3:] if b]
    parts = dict.fromkeys([*PARTS, "loads, stores, loop, vote"], 0)
    line = 0
    for text in sass.splitlines():
        if m := LINE.search(text):
            line = int(m.group(2)) if m.group(1).endswith("rans_triton.py") else line  # triton's own: the caller's
        elif ((m := INSTR.search(text)) and start <= (a := int(m.group(1), 16)) <= end
              and not any(lo < a < hi for lo, hi in skips)):
            name = helpers.get(line, "")
            if name == kernel:
                name = next(iter(CALL.findall(source[line - 1])), "")
            parts[part_of.get(name, "loads, stores, loop, vote")] += count(a, a)
    return {k: v for k, v in parts.items() if v}


def params_cost(rt, dtype: str) -> float:
    """SASS instructions per element of the table decoder's parameter kernel
    (``_table_params_kernel``: quantize_params, the dense test, the row, packed), compiled
    as ``table_params`` launches it (BLOCK_ELEMS elements per program of 4 warps):
    straight-line code, so its whole SASS over the elements per thread. 0 for a revision
    without it (quantize_params in the decoder's step loop)."""
    if not hasattr(rt, "_table_params_kernel"):
        return 0.0
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sglang_speckv.kernels import entropy_model as em

    fn, warps = rt._table_params_kernel, 4
    _, man_bits, bias, _ = em.DTYPE_SPECS[dtype]
    consts = dict(MAN_BITS=man_bits, BIAS=bias, BLOCK=rt.BLOCK_ELEMS)
    sig = {a: "constexpr" if a in consts else {"mu_ptr": "*fp32", "sigma_ptr": "*fp32"}.get(
        a, "*i32" if a.endswith("_ptr") else "i32") for a in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    instrs = [m.group(2) for m in INSTR.finditer(sass) if not m.group(2).startswith("NOP")]
    return len(instrs) / (rt.BLOCK_ELEMS / (WARP * warps))


def triton_version() -> str:
    import triton

    return triton.__version__


def sass_costs(baseline: str, warps: int | None, dtypes: list[str]) -> dict:
    """loop_costs of this tree's decode kernel (``warps`` per program, default the launcher's)
    and of the baseline revision's (as it launched: 4 warps), per dtype."""
    from sglang_speckv.kernels import rans_triton as now

    warps = warps or now.DECODE_WARPS
    costs = {"now": {dtype: loop_costs(sass_of(now, dtype, warps, WARP * warps)) for dtype in dtypes}, "baseline": None}
    costs["values"] = {dtype: loop_costs(sass_of(now, dtype, warps, WARP * warps, values=True)) for dtype in dtypes}
    costs["table"], costs["parts"], costs["params"] = {}, {}, {}
    for dtype in dtypes:
        values_sass = sass_of(now, dtype, warps, WARP * warps, values=True)
        costs["parts"][dtype] = {"exact": hit_path_parts(now, values_sass, "_decode_values_kernel")}
        if dtype in TABLE_DTYPES:
            table_sass = sass_of(now, dtype, warps, WARP * warps, table=True)
            costs["table"][dtype] = table_loop_costs(table_sass)
            costs["parts"][dtype]["table"] = hit_path_parts(now, table_sass, "_decode_table_kernel")
            costs["params"][dtype] = params_cost(now, dtype)
    costs.update(block_lanes=WARP * warps, gallop_rounds=now.GALLOP_ROUNDS, triton=triton_version())
    if baseline != "none":
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{baseline}:kernels/rans_triton.py"],
                               capture_output=True, text=True)  # fmt: skip
        if shown.returncode:
            raise SystemExit(f"git show {baseline}: {shown.stderr.strip()} (a shallow clone? --baseline none skips it)")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "rans_triton_baseline.py").write_text(shown.stdout)
            old = load_module("rans_triton_baseline", Path(tmp) / "rans_triton_baseline.py")
            costs["baseline"] = {dtype: loop_costs(sass_of(old, dtype, 4, old.BLOCK_LANES)) for dtype in dtypes}
    return costs


def instruction_costs(baseline: str, warps: int | None, dtypes: list[str]) -> dict:
    """loop_costs of the baseline's and this tree's decode kernels, from a child process:
    Triton's own @jit helpers are interpreted or compiled for the whole process, fixed when
    triton is first imported, and this process interprets."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, __file__, "--sass-costs", "--baseline", baseline]
    command += (["--warps", str(warps)] if warps else []) + ["--dtype", *dtypes]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"compiling for sm_90 failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# ---- 2. Probes ----------------------------------------------------------------------------


def synthetic(dtype: str, n: int):
    """(storage bits [1, n], mu, sigma float32): values drawn around (mu, sigma)."""
    from sglang_speckv.kernels import entropy_model as em

    g = torch.Generator().manual_seed(0)
    scale = 16.0 if dtype.startswith("fp8") else 1.0
    mu = torch.randn(1, n, generator=g) * scale
    sigma = (torch.rand(1, n, generator=g) * 0.5 + 0.05) * scale
    values = (mu + sigma * torch.randn(1, n, generator=g)).to(em.TORCH_DTYPES[dtype])
    return values, mu, sigma


def from_dump(path: str, tokens: int):
    """The first ``tokens`` tokens of a dump as one canonical page [2, L, T, H, D], and
    page_stats' (mu, sigma) for it."""
    from safetensors.torch import load_file

    from sglang_speckv.kernels import entropy_model as em
    from sglang_speckv.predictors.base import PageMeta
    from sglang_speckv.predictors.page_stats import PageStatsPredictor

    tensors = load_file(path)
    k, v = tensors["k"][:, :, :tokens], tensors["v"][:, :, :tokens]  # [L, H, T, D]
    page = torch.stack([k, v]).permute(0, 1, 3, 2, 4).contiguous()  # [2, L, T, H, D]
    meta = PageMeta(em.DTYPE_NAMES[page.dtype], tuple(page.shape))
    predictor = PageStatsPredictor()
    if predictor.stages(meta) != [0, meta.numel]:
        raise SystemExit("page_stats was expected to have one stage")
    side = predictor.side_info(page.to(torch.float32), meta)
    mu, sigma = predictor.predict(meta, side, torch.full(page.shape, float("nan")), 0)
    return meta.dtype, page.reshape(1, -1), mu.reshape(1, -1), sigma.reshape(1, -1)


def probe_stats(rt, values, mu, sigma, dtype: str, groups: tuple[int, ...]) -> dict:
    """Decode one page with the interpreted kernel, counting probes; per lockstep group size:
    P(the group misses), E[max gallop rounds], E[max bisection rounds]; and the miss rate."""
    from sglang_speckv.kernels import entropy_model as em
    from sglang_speckv.kernels import rans_reference as ref

    n = values.shape[1]
    num_lanes = 4096  # probes do not depend on the lane count; fewer steps run faster here
    keys = em.keys_from_bits(em.storage_bits(values), dtype)
    mu_q, e, r = em.quantize_params(mu, sigma)
    cum = em.cdf(keys, mu_q, e, r, dtype)
    words, lane_words = ref.encode(cum, em.cdf(keys + 1, mu_q, e, r, dtype) - cum, num_lanes)
    dec = rt.Decoder(words, lane_words, n, dtype)
    probes = torch.zeros(2, 1, n, dtype=torch.int32)
    got = dec.decode(mu_q, e, r, probes=probes)
    if not (torch.equal(got, keys) and dec.finish().all()):
        raise SystemExit("round trip FAILED")
    out = {"miss": float((probes.sum(0) > 0).double().mean()), "n": n}
    for size in groups:  # lanes g .. g + size - 1 at one step hold consecutive symbols
        m = n // size * size
        gallop = probes[0, 0, :m].view(-1, size).amax(1).double()
        bisect = probes[1, 0, :m].view(-1, size).amax(1).double()
        out[size] = ((gallop + bisect > 0).double().mean().item(), gallop.mean().item(), bisect.mean().item())
    return out


def escape_stats(values, mu, sigma, dtype: str, size: int) -> tuple[float, float, float, float, float]:
    """The table model's rate of exact-model steps on one page (ESC, or a symbol that is not
    dense) and P(a program of ``size`` lanes has such a lane at a step), then the same for
    level 1's fallback (a dense lane whose slot is past the entry after START's lookup and
    START_STEPS steps; its slot drawn uniformly from its level-1 step, as a coded state's
    slot is), from table_model.symbol_steps and level1_start (torch; lanes g .. g + size - 1
    at one step hold consecutive symbols); last P(a program has either)."""
    from sglang_speckv.kernels import entropy_model as em
    from sglang_speckv.kernels import rans_triton as rt
    from sglang_speckv.kernels import table_model as tm

    keys = em.keys_from_bits(em.storage_bits(values), dtype)
    mu_q, e, r = em.quantize_params(mu, sigma)
    cum, freq, scale = tm.symbol_steps(keys, mu_q, e, r, dtype, em.W_WIDE, em.KAPPA)
    escaped = (scale[0] == em.PROB_BITS).any(-1)  # [n]: ESC (level 2) or not dense (level 1)
    g = torch.Generator().manual_seed(0)
    slot = cum[0, :, 0] + (torch.rand(escaped.shape, generator=g, dtype=torch.float64) * freq[0, :, 0]).long()
    row = tm.row_index(mu_q, r)[0]
    cum1, start = tm.level1_table(em.W_WIDE, em.KAPPA), tm.level1_start(em.W_WIDE, em.KAPPA).long()
    entry = start[row, slot.clamp(0, (1 << tm.PT) - 1) >> (tm.PT - tm.START_BITS)]
    steps = torch.searchsorted(cum1[row], slot[:, None].clamp(0, (1 << tm.PT) - 1), right=True)[:, 0] - 1 - entry
    short = tm.dense(mu_q, e, r, dtype)[0] & (steps > rt.START_STEPS)
    m = escaped.numel() // size * size
    return (float(escaped.double().mean()), float(escaped[:m].view(-1, size).any(1).double().mean()),
            float(short.double().mean()), float(short[:m].view(-1, size).any(1).double().mean()),
            float((escaped | short)[:m].view(-1, size).any(1).double().mean()))


# ---- 3. The estimate ----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="e47aaa0", help="git revision of the binary-search kernel, or none")
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp8_e4m3"], help="dtypes of the synthetic pages")
    parser.add_argument("--symbols", type=int, default=1 << 18, help="symbols of each synthetic page")
    parser.add_argument("--dump", nargs="*", default=[], help="speckv dump-kv files (real KV, page_stats)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens of each dump to decode")
    parser.add_argument("--warps", type=int, help="warps per decode program (default: the launcher's DECODE_WARPS)")
    parser.add_argument("--sass-costs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.sass_costs:  # the child process of instruction_costs: compiled kernels, no interpreter
        print(json.dumps(sass_costs(args.baseline, args.warps, args.dtype)))
        return
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (its own @jit helpers too)
    from sglang_speckv.kernels import rans_triton as rt

    rt.DECODE_LANES = 4096  # one interpreted program per 4096 lanes: per-lane probes are the same
    # (name, dtype, values, mu, sigma, symbols per distinct (mu, sigma) as the codec sees them)
    sources = [(f"synthetic Gaussian, {args.symbols} symbols", dtype, *synthetic(dtype, args.symbols), 1)
               for dtype in args.dtype]
    for path in args.dump:
        dtype, values, mu, sigma = from_dump(path, args.tokens)
        sources.append((f"{Path(path).name}, {values.shape[1]} symbols, page_stats", dtype, values, mu, sigma,
                        args.tokens))  # one (mu, sigma) per channel, broadcast over the tokens
    dtypes = list(dict.fromkeys(dtype for _, dtype, *_ in sources))

    costs = instruction_costs(args.baseline, args.warps, dtypes)
    base, now, values_now, table_now = costs["baseline"], costs["now"], costs["values"], costs["table"]
    groups = (costs["block_lanes"],)
    table_rows = []

    def per_symbol_base(dtype: str) -> str:
        return str(base[dtype]["per symbol"]) if base else "-"

    print(f"SASS instructions of the decode step loop, sm_90 (Triton {costs['triton']}, "
          f"{costs['block_lanes']} lanes per program, GALLOP_ROUNDS {costs['gallop_rounds']}):\n")
    print(f"| dtype | baseline {args.baseline} per symbol | hit path | fallback entry | gallop round "
          "| bisection round | value-level hit path (codec) |")
    print("|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        c = now[dtype]
        print(f"| {dtype} | {per_symbol_base(dtype)} | {c['hit path']} | {c['fallback entry']} | "
              f"{c['gallop round']} | {c['bisection round']} | {values_now[dtype]['hit path']} |")
    print("\n(The value-level kernel shares the search (_find_key) and adds quantize_params and the "
          "value written to its hit path; only that is shown.)")
    columns = [(dtype, model) for dtype in dtypes for model in ("exact", "table") if model in costs["parts"][dtype]]
    names = list(dict.fromkeys(k for d, m in columns for k in costs["parts"][d][m]))
    print("\nThe value-level hit paths by part (hit_path_parts: each SASS instruction's source line, its "
          "@triton.jit helper; the compiler interleaves and shares work between parts, so the split is "
          "approximate; the table model's hit path: no lane of the program takes the exact model's step):\n")
    print("| part | " + " | ".join(f"{d} {'T2 table' if m == 'table' else 'exact'} model" for d, m in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for part in [*names, "total"]:
        cells = [costs["parts"][d][m].get(part, 0) if part != "total" else sum(costs["parts"][d][m].values())
                 for d, m in columns]
        print(f"| {part} | " + " | ".join(str(c) if c else "" for c in cells) + " |")

    print("\nESTIMATE (no GPU): probes counted by the kernel under TRITON_INTERPRET=1, instructions from "
          "the sm_90 SASS above, GB/s of raw KV at 12-16 T thread-instructions/s:\n")
    print("| data | dtype | lane miss rate | lanes per block | P(block misses) | E[max gallop] | E[max bisect] "
          "| instr/symbol | est. GB/s | value-level instr/symbol | est. GB/s | baseline instr/symbol "
          "| baseline est. GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dtype, values, mu, sigma, share in sources:
        stats = probe_stats(rt, values, mu, sigma, dtype, groups)
        c, size_b = now[dtype], values.element_size()

        def gbs(instr: float) -> str:
            return "-".join(f"{rate / instr * size_b / 1e9:.0f}" for rate in BUDGET)

        for size in groups:
            p, gallop, bisect = stats[size]
            instr, instr_v = (k["hit path"] + p * k["fallback entry"] + gallop * k["gallop round"]
                              + bisect * k["bisection round"] for k in (c, values_now[dtype]))
            gbs_base = gbs(base[dtype]["per symbol"]) if base else "-"
            print(f"| {name} | {dtype} | {stats['miss']:.5f} | {size} | {p:.4f} | {gallop:.3f} | {bisect:.3f} "
                  f"| {instr:.0f} | {gbs(instr)} | {instr_v:.0f} | {gbs(instr_v)} | {per_symbol_base(dtype)} "
                  f"| {gbs_base} |")
            if dtype in table_now:
                q, esc, q1, short, rare = escape_stats(values, mu, sigma, dtype, size)
                t = table_now[dtype]
                instr_t = (t["hit path"] + esc * t["escape"] + short * t["level-1 fallback"]
                           + (rare - esc) * t["escape vote"] + (rare - short) * t["level-1 vote"])
                pack = costs["params"][dtype]
                per_symbol, shared = instr_t + pack, instr_t + pack / share
                table_rows.append(f"| {name} | {dtype} | {q:.5f} | {size} | {esc:.4f} | {q1:.5f} | {short:.4f} "
                                  f"| {rare:.4f} | {instr_t:.0f} | {share} | {shared:.0f} | {gbs(shared)} "
                                  f"| {per_symbol:.0f} | {gbs(per_symbol)} | {instr_v:.0f} | {gbs(instr_v)} |")
        sys.stdout.flush()

    if table_rows:
        print("\nThe table model T2 (kernels/table_model.py; _decode_table_kernel, value-level), "
              "SASS instructions of its step loop: hit path (no lane of the program takes the exact model's "
              "step, level 1's lookup and step finish every lane) / escape path (it does, for ESC or a symbol "
              "that is not dense, its guesses hitting) / level-1 fallback (the row's bisection), and of "
              "those two the votes a program pays when it takes the other branch alone: "
              + ", ".join(f"{d} {c['hit path']} / {c['escape']} / {c['level-1 fallback']} "
                          f"(votes {c['escape vote']} / {c['level-1 vote']})" for d, c in table_now.items())
              + "; table_params (the parameter kernel) per element: "
              + ", ".join(f"{d} {c:.0f}" for d, c in costs["params"].items()))
        print("\nESTIMATE (no GPU): exact-model steps (ESC or not dense) from table_model.symbol_steps, "
              "level-1 fallbacks from level1_start on slots drawn in each symbol's level-1 step, "
              "decode instr/symbol = hit path + P(block escapes) x escape path (a missed guess there adds the "
              "exact kernel's fallback: not counted) + P(block's level 1 falls back) x level-1 fallback "
              "+ the other branch's vote where a block takes one branch alone; "
              "plus table_params' instructions once per distinct (mu, sigma) (the codec's route: per channel "
              "under page_stats, i.e. per `--tokens` symbols; the int32 broadcast copy, memory-bound, not "
              "counted), or once per symbol (per-symbol predictions); the exact model's value-level kernel "
              "beside it:\n")
        print("| data | dtype | exact-step rate | lanes per block | P(block escapes) | level-1 fallback rate "
              "| P(block's level 1 falls back) | P(block takes either) | decode instr/symbol "
              "| symbols per (mu, sigma) | + table_params: instr/symbol | est. GB/s "
              "| params per symbol: instr/symbol | est. GB/s | exact value-level instr/symbol | est. GB/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(table_rows))

if __name__ == "__main__":
    main()
