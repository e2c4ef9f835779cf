"""Our GPU attention kernel compiled to SASS on a machine without a GPU: registers, spills and the main loop's
instruction mix per config and tuning, at the benchmark's shape (batch 32 x 16K, page 64, Llama-3.1-8B attention).

The Pallas lowering's Triton IR (benchmarks/triton_ir_ops.py) is compiled for sm_90 by *standalone* Triton 3.8 in
.venv-triton (`bash scripts/setup_triton_offline.sh`; Python 3.11), whose bundled ptxas and cuobjdump give the SASS.
That is not the compiler JAX runs: XLA compiles the same IR with its own Triton pipeline (on the H200, Nsight
counted 167 registers and no FFMA for 4/4 on 2026-12-01, where this gives 204 and 56 FFMA). So the numbers compare
variants of one kernel with each other, as evidence before a GPU can time them, not absolute costs.

    PYTHONPATH=. .venv/bin/python benchmarks/triton_sass.py --configs kivi4/2 \\
        --tunings '[{"precision":"bf16"},{"precision":"bf16","_variant":"novhalf,vselect"}]'

`--digest` adds a hash of the whole SASS listing without its addresses: equal digests on two commits mean a refactor
left the compiled kernel identical, instruction for instruction (the Triton IR fingerprint of triton_ir_ops.py is
stricter: it also changes when only the IR's op order does).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
TRITON_PY = ROOT / ".venv-triton" / "bin" / "python"
SHOWN = ("HGMMA", "WAIT", "HMMA", "LOP3", "PRMT", "SHF", "F2FP", "HFMA2", "HADD2", "FFMA", "FMUL", "FADD", "MUFU",
         "FMNMX", "SHFL", "STS", "LDS", "LDSM", "LDG", "BAR", "IMAD")  # fmt: skip
_RUN = dict(check=True, capture_output=True, text=True)
_ADDR = re.compile(r"/\*[0-9a-f]{4,}\*/")
_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of each instruction in a `cuobjdump --dump-sass` listing."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_INSTR.match, sass.splitlines()) if m]


def main_loop(ins: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the longest loop: from the target of a backward branch to that branch."""
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    best = []
    for i, (a, op, rest) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in index:
            body = ins[index[int(target.group(1), 16)] : i + 1]
            best = body if len(body) > len(best) else best
    return best


def sass_digest(sass: str) -> str:
    """16 hex digits identifying a SASS listing up to its addresses and file names (the instructions, in order)."""
    lines = (_ADDR.sub("", x).split() for x in sass.splitlines() if _ADDR.search(x))
    text = "\n".join(" ".join(x) for x in lines)  # predicates and operands kept, addresses dropped
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def opcode_counts(ins) -> collections.Counter:
    """Opcodes without modifiers, plus "WAIT": the warpgroup MMA waits (`WARPGROUP.DEPBAR`) among them."""
    counts = collections.Counter(op.split(".")[0] for _, op, _ in ins)
    counts["WAIT"] = sum(op.startswith("WARPGROUP.DEPBAR") for _, op, _ in ins)
    return counts


def resources(text: str) -> dict:
    """REG / STACK / SHARED / LOCAL of the (one) kernel in a `cuobjdump --dump-resource-usage` listing."""
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_sass(
    ttir: str, workdir: pathlib.Path, num_warps: int, num_stages: int, max_registers: int | None = None
) -> tuple[str, dict]:
    """(SASS listing, resource usage) of TTIR text compiled by standalone Triton in .venv-triton (its TritonGPU IR is
    left in workdir as kernel.ttgir). max_registers: the kernel's register cap, as Triton's maxnreg option (the
    captured TTIR predates the module attribute that `triton_params` sets)."""
    if not TRITON_PY.exists():
        raise SystemExit("benchmarks/triton_sass.py needs .venv-triton: run `bash scripts/setup_triton_offline.sh`")
    src = workdir / "kernel.ttir"
    src.write_text(ttir)
    helper = ROOT / "benchmarks" / "_triton_compile.py"
    cmd = [str(TRITON_PY), str(helper), str(src), str(num_warps), str(num_stages)]
    out = subprocess.run(cmd + ([str(max_registers)] if max_registers else []), **_RUN).stdout
    cubin = str(workdir / "kernel.cubin")
    cuobjdump = str(pathlib.Path(json.loads(out.splitlines()[-1])["bin"]) / "cuobjdump")
    sass = subprocess.run([cuobjdump, "--dump-sass", cubin], **_RUN).stdout
    return sass, resources(subprocess.run([cuobjdump, "--dump-resource-usage", cubin], **_RUN).stdout)


def main(argv=None) -> None:
    import attention  # benchmarks/attention.py: the config names and the schedule
    import triton_ir_ops

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="4/4,8/8,kivi4/2", help="attention.py's config names, or schedule")
    ap.add_argument("--tunings", default='[{"precision":"bf16"}]', help="JSON list of kernel keyword dicts")
    ap.add_argument("--keep", default=None, help="directory to keep each TTIR, TritonGPU IR and SASS listing in")
    ap.add_argument("--digest", action="store_true", help="also print a hash of each kernel's whole SASS listing")
    ap.add_argument("--page", type=int, default=64, help="page size (the engine's default is 32); context stays 16K")
    args = ap.parse_args(argv)
    shape = dict(triton_ir_ops.BENCH_SHAPE, page=args.page, pages_per_seq=16384 // args.page)
    shape["pool_pages"] = shape["pool_pages"] * 64 // args.page
    print(
        "config | tuning | registers | stack | loop instructions | "
        + " | ".join(SHOWN)
        + (" | SASS digest" if args.digest else "")
    )
    for c in args.configs.split(","):
        for t in json.loads(args.tunings):
            tag = json.dumps(t, separators=(",", ":"))
            if c != "schedule":
                measure(c, *attention.spec_pair(c), t, tag, args.keep, args.digest, shape)
                continue
            # The 3.25-bit schedule: each distinct layer kind once, then the loop length weighted by its layers.
            pairs, defaults, _ = attention.schedule_pairs()
            total = 0
            for (kb, vb), n in sorted(collections.Counter(pairs).items()):
                loop = measure(
                    f"schedule k{kb}/v{vb} x{n}",
                    *attention.schedule_spec(kb, vb, defaults),
                    t,
                    tag,
                    args.keep,
                    args.digest,
                    shape,
                )
                if loop is None:
                    break
                total += n * loop
            else:
                print(f"schedule | {tag} | | | {total / len(pairs):.0f} (weighted by layers)", flush=True)


def measure(
    name: str, k_spec, v_spec, t: dict, tag: str, keep: str | None, digest: bool = False, shape: dict | None = None
) -> int | None:
    """Prints one row (registers, spill stack, main-loop instructions and mix) and returns the loop's length, or None
    where Triton cannot compile the variant (the row says why). shape: tests/_lowering.py's keywords (default: the
    benchmark's batch 32 x 16K at page 64)."""
    import triton_ir_ops

    ttir = triton_ir_ops.triton_module(k_spec, v_spec, shape=shape or triton_ir_ops.BENCH_SHAPE, **t)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            warps, stages, cap = t.get("num_warps", 4), t.get("num_stages", 2), t.get("max_registers")
            sass, usage = compile_sass(ttir, pathlib.Path(tmp), warps, stages, cap)
            ttgir = (pathlib.Path(tmp) / "kernel.ttgir").read_text()
        except subprocess.CalledProcessError as e:  # a variant Triton cannot compile: say why, go on
            why = (e.stderr or "").strip().splitlines()[-3:]
            print(f"{name} | {tag} | compile failed: {' / '.join(why)}")
            return None
    if keep:
        stem = pathlib.Path(keep) / re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_{json.dumps(t)}").strip("_")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".ttir").write_text(ttir)
        stem.with_suffix(".sass").write_text(sass)
        stem.with_suffix(".ttgir").write_text(ttgir)
    loop = main_loop(instructions(sass))
    ops = opcode_counts(loop)
    cells = " | ".join(str(ops.get(k, 0)) for k in SHOWN) + (f" | {sass_digest(sass)}" if digest else "")
    print(f"{name} | {tag} | {usage.get('REG')} | {usage.get('STACK')} | {len(loop)} | {cells}", flush=True)
    return len(loop)


if __name__ == "__main__":
    main()
