"""--prompts: named prompts configured per deployment, over the model's config_sentence_transformers.json ones;
what prompt_name and Cohere's input_type then pick."""

import argparse
import json

import pytest

import tiny_models as tm
from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.cohere_embed import prompt_for
from tp_embed.config import EngineConfig
from tp_embed.engine import Engine


def parse(*flags) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return parse_with_config(p, list(flags))


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ('["query: "]', "a JSON object of prompt names"),
    ('{"query": 3}', "a JSON object of prompt names"),
    ('{"": "x"}', "a JSON object of prompt names"),
])
def test_bad_prompts_are_refused(value, message, capsys):
    with pytest.raises(SystemExit):
        parse("--prompts", value)
    assert message in capsys.readouterr().err


def test_prompts_join_the_models_and_cohere_input_types_pick_them(tmp_path):
    path = tm.make_bert(str(tmp_path / "bert"), prompts={"query": "q: ", "document": "d: "})
    prompts = {"search_query": "Represent this query: ", "document": "passage: "}
    args = parse("--model-path", path, "--prompts", json.dumps(prompts))
    assert args.prompts == prompts
    engine = Engine(EngineConfig.from_args(args), show_progress=False)
    text = engine.text
    assert text.prompts == {"query": "q: ", "document": "passage: ", "search_query": "Represent this query: "}
    assert prompt_for("search_query", text.prompts) == "search_query"  # its own name first
    assert prompt_for("search_document", text.prompts) == "document"  # --prompts replaced the model's text
    ids = text.encode(["hello"], truncate=False, prompt=text.prompt("search_query"))[0]
    assert ids == text.tokenizer(["Represent this query: hello"])["input_ids"][0]
    assert parse().prompts == {}
