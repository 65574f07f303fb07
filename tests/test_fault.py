"""Fault injection: a save killed with SIGKILL at any moment leaves the old complete output or the new complete
one (never a partial or missing one), and at most one temp directory, which the next save removes.

A helper process (the "zygote") imports localify and loads the two model versions once; for every kill it
forks a child that saves one version over the output, and kills that child (SIGKILL) either after a delay
(a sweep over the measured save duration) or at a named stage of the save (deterministic). The test then
loads the output and compares its outputs with those of both versions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import localify

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL"),
              pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # a helper process: ~5 s of imports

ARCH = dict(depth=2, num_classes=10)  # deit_tiny's width (192): a ~5 MB file, a save of a few ms to tens of ms
X = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

ZYGOTE = textwrap.dedent(r"""
    import json, os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    import localify
    import localify._io as io

    models = [localify.load(sys.argv[1]), localify.load(sys.argv[2])]
    io._versions()  # import timm and transformers here, not in every child

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def after(fn):
        def wrapped(*args, **kwargs):
            fn(*args, **kwargs)
            die()
        return wrapped

    def arm(stage):  # runs in the child: SIGKILL at one named point of the save
        if stage == "before-write":  # the temp directory exists, nothing written in it
            io._write_safetensors = die
        elif stage == "written":  # safetensors wrote the whole file inside the temp directory, not yet moved
            io._fsync = die
        elif stage == "half-written":  # a truncated file inside the temp directory
            real = io._write_safetensors
            def half(tensors, path, metadata):
                real(tensors, path, metadata)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                die()
            io._write_safetensors = half
        elif stage == "replaced":  # the file form: moved over the output, temp directory not yet removed
            os.replace = after(os.replace)
        elif stage == "swapped":  # the directory form: exchanged with the output, old one not yet removed
            io._swap_in = after(io._swap_in)
        elif stage != "none":
            raise SystemExit(f"unknown stage {stage}")

    print("ready", flush=True)
    for line in sys.stdin:
        version, delay, stage, out = line.rstrip("\n").split(" ", 3)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                arm(stage)
                start = time.perf_counter()
                localify.save(models[int(version)], out, force=True)
                os.write(w, str(time.perf_counter() - start).encode())
            finally:
                os._exit(0)
        os.close(w)
        if float(delay) >= 0:
            time.sleep(float(delay))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        seconds = os.read(r, 64).decode()
        os.close(r)
        print(json.dumps({"seconds": float(seconds) if seconds else None, "killed": os.WIFSIGNALED(status),
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
""")


class Zygote:
    """The helper process: ``save(out, version, delay=, stage=)`` runs one save in a forked child."""

    def __init__(self, tmp: Path, seeds: list[Path]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, *map(str, seeds)], cwd=tmp, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def save(self, out: Path, version: int, *, delay: float = -1.0, stage: str = "none") -> dict:
        self.proc.stdin.write(f"{version} {delay} {stage} {out}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the helper process died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()  # nothing to clean up in it; its exit would only unload torch
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two versions of one converted model saved as seeds, with their reference outputs."""
    seeds = tmp_path_factory.mktemp("seeds")
    torch.manual_seed(0)
    model = localify.create_model("deit_tiny", **ARCH).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(model)
    refs = []
    for i in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            refs.append(model(X))
        localify.save(model, seeds / f"v{i}.safetensors")
    assert not torch.equal(refs[0], refs[1])
    return [seeds / "v0.safetensors", seeds / "v1.safetensors"], refs


@pytest.fixture(scope="module")
def zygote(versions, tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"), versions[0])
    yield z
    z.close()


def _temps(out: Path) -> list[str]:
    """Everything beside the output; only localify temp directories of that output are allowed there."""
    others = sorted(p.name for p in out.parent.iterdir() if p.name != out.name)
    pattern = re.compile(re.escape(f".{out.name}.localify-tmp-") + r"\d+-[0-9a-f]+(-old)?")
    strays = [n for n in others if not pattern.fullmatch(n)]
    assert not strays, f"files other than localify temp directories next to the output: {strays}"
    return others


def _version_of(out: Path, refs: list[torch.Tensor]) -> int:
    with torch.no_grad():
        y = localify.load(out)(X)
    matches = [i for i, r in enumerate(refs) if torch.equal(y, r)]
    assert len(matches) == 1, "the output is neither the old nor the new model"
    return matches[0]


@pytest.mark.parametrize("form", ["out.safetensors", "outdir"])
def test_kill_at_named_stages(tmp_path, versions, zygote, form) -> None:
    """SIGKILL at each stage of a save: before the rename the old output stays, after it the new one is
    there; either way one temp directory is left, and the next save removes it."""
    refs = versions[1]
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / form
    z = zygote
    assert z.save(out, 0)["code"] == 0
    assert _version_of(out, refs) == 0 and _temps(out) == []
    stages = ["before-write", "half-written", "written", "replaced" if form.endswith(".safetensors") else "swapped"]
    prev = 0
    for stage in stages:
        res = z.save(out, 1 - prev, stage=stage)
        assert res["killed"], f"stage {stage}: the save was not killed"
        want = 1 - prev if stage in ("replaced", "swapped") else prev
        assert _version_of(out, refs) == want, f"stage {stage}"
        prev = want
        assert len(_temps(out)) == 1, f"stage {stage}: {_temps(out)}"
    res = z.save(out, 0)
    assert not res["killed"] and res["code"] == 0
    assert _version_of(out, refs) == 0 and _temps(out) == []  # the stale temp directory is gone


def test_kill_sweep_over_the_save(tmp_path, versions, zygote) -> None:
    """SIGKILL at 24 moments spread over a save's measured duration (and past it): after every kill the
    output is the old or the new complete file, and at most one temp directory is left."""
    refs = versions[1]
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out.safetensors"
    z = zygote
    duration = min(z.save(out, i % 2)["seconds"] for i in range(5))  # the save itself, in the child
    assert z.save(out, 0)["code"] == 0
    outcomes, prev, n = [], 0, 24
    for i in range(n):
        res = z.save(out, 1 - prev, delay=duration * 1.5 * i / (n - 1))
        now = _version_of(out, refs)  # raises unless the old or the new complete model
        assert len(_temps(out)) <= 1, _temps(out)
        outcomes.append(("new" if now != prev else "old") + ("" if res["killed"] else "-finished"))
        prev = now
    z.save(out, 0)
    assert _temps(out) == [] and _version_of(out, refs) == 0
    print(f"save {duration * 1e3:.1f} ms; outcomes {outcomes}")
