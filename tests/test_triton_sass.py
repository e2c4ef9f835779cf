"""benchmarks/triton_sass.py: our kernel's Triton IR compiled to SASS offline by standalone Triton.

The parsing runs everywhere, on a stored listing (notes/sass/: 4/4 at bf16 precision, batch 32 x 16K, compiled by
Triton 3.8 for sm_90 on 2026-12-04; the tool printed a 724-instruction main loop with 16 HGMMA for it). The whole
pipeline (lowering, standalone compile, cuobjdump) runs only where .venv-triton exists
(scripts/setup_triton_offline.sh), so CI, which does not build it, skips that test.
"""

from __future__ import annotations

import gzip
import pathlib

import pytest
from _bench import load_benchmark

from kvtuner_jax.specs import KVSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
triton_sass = load_benchmark("triton_sass.py")
LISTING = ROOT / "notes" / "sass" / "triton38_sm90_4x4_bf16_b32_16k.sass.gz"


def test_main_loop_of_a_stored_listing():
    ins = triton_sass.instructions(gzip.decompress(LISTING.read_bytes()).decode())
    addrs = [a for a, _, _ in ins]
    assert addrs == sorted(addrs) and len(set(addrs)) == len(addrs) and addrs[1] - addrs[0] == 16  # one per 16 bytes
    loop = triton_sass.main_loop(ins)
    ops = triton_sass.opcode_counts(loop)
    assert len(loop) == 724 and ops["HGMMA"] == 16  # 2 dots per side of [64 tokens, 64 bytes] x [64, 16] rows
    assert loop[-1][1].startswith("BRA") and int(loop[-1][2].split()[0], 16) == loop[0][0]  # back to the loop's top


def test_sass_digest_ignores_addresses_not_instructions():
    """The digest of a stored listing is unchanged when every address moves (a kernel placed elsewhere) and changes
    when one instruction's predicate or one operand does."""
    text = gzip.decompress(LISTING.read_bytes()).decode()
    base = triton_sass.sass_digest(text)
    lines = text.splitlines()
    moved = "\n".join(x.replace("/*0", "/*f", 1) if triton_sass._ADDR.search(x) else x for x in lines)
    assert moved != text and triton_sass.sass_digest(moved) == base
    i = next(k for k, x in enumerate(lines) if " FFMA " in x)
    pred = lines[:i] + [lines[i].replace(" FFMA ", " @P0 FFMA ", 1)] + lines[i + 1 :]
    assert triton_sass.sass_digest("\n".join(pred)) != base
    reg = lines[:i] + [lines[i].replace("R", "R1", 1)] + lines[i + 1 :]
    assert triton_sass.sass_digest("\n".join(reg)) != base


def test_resources_are_read_from_cuobjdump():
    text = " Function kv_paged_attention_k4t_v4t:\n  REG:204 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:656 TEXTURE:0\n"
    assert triton_sass.resources(text) == {"REG": 204, "STACK": 0, "SHARED": 1024, "LOCAL": 0}


@pytest.mark.skipif(not triton_sass.TRITON_PY.exists(), reason="needs .venv-triton (scripts/setup_triton_offline.sh)")
def test_offline_compile_counts_the_f16_option_s_dots(tmp_path):
    """8/8 at bf16 precision: two HGMMA groups per side and block as nibbles, one as f16 operands (default)."""
    import triton_ir_ops  # on sys.path through triton_sass

    tok8 = KVSpec(bits=8, axis="token", group_size=128)
    counts = []
    for tuning in ({"precision": "bf16", "eight_bit": "nibbles"}, {"precision": "bf16"}):
        ttir = triton_ir_ops.triton_module(tok8, tok8, shape=triton_ir_ops.BENCH_SHAPE, **tuning)
        sass, usage = triton_sass.compile_sass(ttir, tmp_path, 4, 2)
        counts.append(triton_sass.opcode_counts(triton_sass.main_loop(triton_sass.instructions(sass)))["HGMMA"])
        assert usage["LOCAL"] == 0
    assert counts == [32, 16]


def test_schedule_rows_are_weighted_by_layers(monkeypatch, capsys):
    """`--configs schedule`: each distinct layer kind of the 3.25-bit schedule measured once, then the loop length
    weighted by how many layers have it (measure stubbed: lengths 1000 + 10 * K bits + V bits)."""
    import attention  # on sys.path through triton_sass

    pairs, defaults, _ = attention.schedule_pairs()
    seen = []

    def fake(name, k_spec, v_spec, t, tag, keep, digest=False, shape=None):
        seen.append((name, k_spec.bits, v_spec.bits, k_spec.axis, v_spec.axis))
        return 1000 + 10 * k_spec.bits + v_spec.bits

    monkeypatch.setattr(triton_sass, "measure", fake)
    triton_sass.main(["--configs", "schedule", "--tunings", '[{"precision":"bf16"}]'])
    want = sum(1000 + 10 * kb + vb for kb, vb in pairs) / len(pairs)
    assert f'schedule | {{"precision":"bf16"}} | | | {want:.0f} (weighted by layers)' in capsys.readouterr().out
    assert sorted((kb, vb) for _, kb, vb, _, _ in seen) == sorted(set(pairs))  # each kind once
    assert {(ka, va) for *_, ka, va in seen} == {(defaults["k_axis"], defaults["v_axis"])}
