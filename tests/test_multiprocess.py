"""Two processes on localhost (jax.distributed, gloo CPU collectives) generate what one process on one device does.

The 2-process run uses a data=2 x model=2 mesh over 2 CPU devices per process: the model axis stays inside a process
and the data axis crosses processes, so each process feeds only its own batch rows, its pages and slots, and the
logits come back replicated on both. The model has 3 KV heads (padded to 4 over the model axis) and a mixed
manifest; 3 prompts over 2 data shards leave one padding row. Greedy decoding on the same random weights must give
identical tokens: the sharded run only reorders float32 sums (relative differences ~1e-7), far below the logit
gaps of a random model's argmax.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvtuner_jax import distributed
from kvtuner_jax.errors import KVTunerError

WORKER = Path(__file__).with_name("_mp_worker.py")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_like_one(tmp_path):
    single = tmp_path / "single.json"
    port = _free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(outs[i]), "--mesh=data=2,model=2"]
            + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            env=_env(2),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    # The single-process reference runs while the pair runs (the pair waits on collectives much of the time).
    ref = subprocess.run(
        [sys.executable, str(WORKER), str(single)],
        env=_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-5000:]
    want = json.loads(single.read_text())
    got = [json.loads(o.read_text()) for o in outs]
    assert want["process_count"] == 1 and want["mesh"] is None and want["kv_heads"] == 3
    for i, g in enumerate(got):
        assert g["process_index"] == i and g["process_count"] == 2
        assert g["device_count"] == 4 and g["local_device_count"] == 2
        assert g["mesh"] == {"data": 2, "model": 2} and g["kv_heads"] == 4  # 3 KV heads padded to 4
        assert g["tokens"] == want["tokens"], (i, g["tokens"], want["tokens"])
    assert all(len(t) == 6 for t in want["tokens"])


def test_start_up_arguments_are_checked(monkeypatch):
    """Bad multi-host settings fail with the flag at fault, before JAX starts anything; single-host is a no-op."""
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() is False  # nothing asked for: single process, no coordinator needed
    assert distributed.initialize(num_processes=1) is False
    with pytest.raises(KVTunerError, match="--coordinator_address"):
        distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(KVTunerError, match="--process_id=2"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(KVTunerError, match="JAX_NUM_PROCESSES"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(KVTunerError, match="--coordinator_address"):
        distributed.initialize()
