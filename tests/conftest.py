"""Shared fixtures: the models the server tests start servers on (helpers live in tests/server_utils.py)."""

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # tests/ helpers and launch.py import as plain modules


def pytest_sessionstart(session):
    """Compile the CPU attention kernel once, here, before tests start ranks that would each compile it
    at the same time (it is cached per host; a failed build leaves the ranks on PyTorch's ops)."""
    from tp_embed.kernels import load_cpu_attention
    load_cpu_attention()


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> str:
    """A random MistralForCausalLM (hidden 64, 8 heads, 2 KV heads so tp=2 splits them, 2 layers) with
    sentence-transformers files: last-token pooling, Normalize, a "query" prompt."""
    from tiny_models import make_mistral
    return make_mistral(str(tmp_path_factory.mktemp("tiny-mistral")), num_key_value_heads=2)


@pytest.fixture(scope="session")
def minilm(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 served at tp=2 (is_matryoshka), shared by tests/test_server.py and test_server_tei.py."""
    from server_utils import ServerProcess

    log = tmp_path_factory.mktemp("logs") / "minilm.log"
    args = ["--tp", "2", "--json-model-override-args", '{"is_matryoshka": true}']
    with ServerProcess(args, nproc=2, log_path=log) as server:
        server.model_dir = minilm_dir
        yield server


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from tp_embed.model_path import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="session")
def family_jobs(tmp_path_factory):
    """Every family's tiny checkpoints and the real all-MiniLM-L6-v2 embedded at tp = 1, 2, 4 in one job per tp
    (tests/family_jobs.py)."""
    import family_jobs as jobs
    return jobs.run(tmp_path_factory)
