"""launch.py's command line: every flag documented, SGLang's names accepted, presets loaded."""

import os

import pytest

import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_flag_has_help_text():
    for action in launch.build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings


@pytest.mark.parametrize("module", ["tp_embed.launch", "tp_embed.offline", "tp_embed"])
def test_version_flag(module):
    import subprocess
    import sys

    from tp_embed import __version__
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"tp-embed {__version__}\n"), done.stderr


def test_sglang_flag_names_parse():
    from tp_embed.args import parse_with_config
    args = parse_with_config(launch.build_parser(), [
        "--model-path", "m", "--tp", "2", "--host", "0.0.0.0", "--port", "8000", "--dtype", "bfloat16",
        "--served-model-name", "e5", "--api-key", "k", "--json-model-override-args", '{"is_matryoshka": true}',
        "--allow-auto-truncate", "--chat-template", "t", "--is-embedding"])
    assert (args.tp, args.host, args.port, args.served_model_name, args.api_key) == (2, "0.0.0.0", 8000, "e5", "k")
    assert args.model_overrides == {"is_matryoshka": True} and args.allow_auto_truncate
    assert parse_with_config(launch.build_parser(), ["--tp-size", "4"]).tp == 4


def test_a_preset_sets_defaults_and_flags_override_it():
    from tp_embed.args import parse_with_config
    preset = os.path.join(REPO, "configs", "e5-mistral-7b-instruct.json")
    args = parse_with_config(launch.build_parser(), ["--config", preset, "--context-length", "512"])
    assert (args.model_path, args.pooling, args.context_length) == ("intfloat/e5-mistral-7b-instruct", "last", 512)


@pytest.mark.parametrize("flag, value", [("--max-queued-tokens", "0"), ("--request-timeout", "0"),
                                         ("--shutdown-timeout", "-1"), ("--tokenizer-workers", "0")])
def test_bad_server_limits_are_rejected(flag, value, capsys):
    from tp_embed.args import parse_with_config
    with pytest.raises(SystemExit):
        parse_with_config(launch.build_parser(), [flag, value])
    assert flag in capsys.readouterr().err


def test_a_loading_server_answers_503_and_still_serves_metrics():
    """The HTTP app before the engine thread has built the engine (it is never started here)."""
    import asyncio

    import httpx

    from tp_embed.args import parse_with_config
    from tp_embed.metrics import Metrics
    from tp_embed.server import EmbeddingServer, build_app

    server = EmbeddingServer(parse_with_config(launch.build_parser(), ["--api-key", "k"]), Metrics())

    async def main():
        server.loop = asyncio.get_running_loop()
        transport = httpx.ASGITransport(app=build_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     headers={"Authorization": "Bearer k"}) as c:
            return (await c.get("/health"), await c.post("/v1/embeddings", json={"input": "a"}),
                    await c.get("/v1/models"), await c.get("/metrics"))

    health, embeddings, models, metrics = asyncio.run(main())
    assert (health.status_code, health.json()) == (503, {"status": "loading"})
    for r in (embeddings, models):
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_not_ready"
        assert "loading" in r.json()["error"]["message"]
    assert metrics.status_code == 200 and "tp_embed_ready 0.0" in metrics.text


def test_flags_are_read_without_importing_torch():
    """Everything launch.py runs before setup_host_allocator (which may re-execute the rank) leaves
    torch and transformers unimported, so a re-executed rank loads them once."""
    import subprocess
    import sys
    code = ("import sys, launch, tp_embed.command\n"  # the tp-embed command, which stays up, too
            "from tp_embed.args import parse_with_config\n"
            "args = parse_with_config(launch.build_parser(), ['--config', 'configs/all-MiniLM-L6-v2.json'])\n"
            "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
