"""Helpers for tests that run tp-embed under torchrun on CPU (gloo), or its offline entry point's steps in the
test's own process."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def offline_compute(flags: list[str], data: list | None = None):
    """What `python -m tp_embed.offline *flags` would write, computed in this process (no interpreter, torch or
    gloo to start): its parser, then `load_input` (unless `data` gives the inputs), an engine and `compute`.
    Raises what the command reports (ValueError, InputTooLongError, ...)."""
    from tp_embed import offline
    from tp_embed.args import parse_with_config
    from tp_embed.config import EngineConfig
    from tp_embed.engine import Engine

    args = parse_with_config(offline.build_parser(), flags)
    data = offline.load_input(args) if data is None else data
    engine = Engine(EngineConfig.from_args(args), show_progress=False)
    return offline.compute(engine, args, data, [engine]).numpy()


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def embed_models(tp: int, out_dir: str, texts: list[str], models: list[dict]) -> None:
    """Run tests/embed_models.py under torchrun at `tp`; raises with the job's stderr on failure."""
    run_script("embed_models.py", tp, out_dir, {"texts": texts, "models": models})


def score_models(tp: int, out_dir: str, models: list[dict]) -> None:
    """Run tests/score_models.py under torchrun at `tp` (pairs scored, texts classified per model)."""
    run_script("score_models.py", tp, out_dir, {"models": models})


def run_script(script: str, tp: int, out_dir: str, spec: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "spec.json")
    with open(path, "w") as f:
        json.dump({"tp": tp, "out_dir": out_dir, **spec}, f)
    proc = run(torchrun_cmd(tp, os.path.join(ROOT, "tests", script), path))
    if proc.returncode != 0:
        raise AssertionError(f"{script} at tp={tp} failed:\n{proc.stderr[-4000:]}")


def cosines(a, b):
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def load_output(outputs: dict, tp: int, name: str, suffix: str = "npy"):
    """What tests/embed_models.py wrote for model `name` in the job at `tp` (outputs: tp -> directory)."""
    import numpy as np

    return np.load(os.path.join(outputs[tp], f"{name}.{suffix}"))


def assert_matches_reference(ours, reference, label: str, bound: float = 0.99999) -> None:
    """Same shape, cosine >= bound for every vector, and unit norms (the served vectors are normalized)."""
    import numpy as np

    assert ours.shape == reference.shape, f"{label}: shape {ours.shape} != {reference.shape}"
    cos = cosines(ours, reference)
    assert cos.min() >= bound, f"{label}: min cosine {cos.min():.7f} at text {cos.argmin()}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
