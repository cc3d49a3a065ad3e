"""Each model family's spec (tp_embed/models/<family>.py): well formed, one dict entry per architecture,
checkpoint keys mapped as the family says, family flags refused where they do not apply, and the engine's
typed configuration covering its flags."""

import argparse
import dataclasses
import types

import pytest

from tp_embed.args import add_engine_args, parse_with_config
from tp_embed.config import POOLING_MODES, EngineConfig
from tp_embed.errors import ConfigError
from tp_embed.models import ARCHITECTURES, SPECS, bert, check_family_flags, clip, decoder, qwen2_vl
from tp_embed.models.spec import FAMILY_FLAGS


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_spec_is_well_formed(spec):
    assert spec.architectures and spec.name
    assert spec.default_pooling in POOLING_MODES or spec.default_pooling is None
    assert spec.flags <= set(FAMILY_FLAGS) and set(spec.flag_notes) <= set(FAMILY_FLAGS)
    assert callable(spec.build_config) and isinstance(spec.model_class, type)


def test_each_architecture_belongs_to_one_family():
    listed = [a for spec in SPECS for a in spec.architectures]
    assert len(listed) == len(set(listed)) == len(ARCHITECTURES)


def test_checkpoint_keys():
    assert decoder.SPEC.checkpoint.param_name("model.layers.0.self_attn.k_proj.weight") == \
        ("layers.0.self_attn.qkv_proj.weight", "k")
    assert decoder.SPEC.checkpoint.param_name("lm_head.weight") is None
    # BERT's old key style is BERT's alone
    assert bert.SPEC.checkpoint.param_name("bert.encoder.layer.1.attention.output.LayerNorm.gamma") == \
        ("layers.1.attention.LayerNorm.weight", None)
    assert bert.SPEC.checkpoint.param_name("pooler.dense.weight") is None
    assert clip.SPEC.checkpoint.param_name("text_model.encoder.layers.0.self_attn.q_proj.bias") == \
        ("text_model.encoder.layers.0.self_attn.qkv_proj.bias", "q")
    assert qwen2_vl.SPEC.checkpoint.param_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        ("layers.0.mlp.gate_up_proj.weight", 1)
    assert qwen2_vl.SPEC.checkpoint.param_name("model.visual.blocks.0.attn.qkv.weight") == \
        ("visual.blocks.0.attn.qkv.weight", None)


def options(**flags) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{"chat_template": None, "pooling": None, **flags})


def test_family_flags():
    check_family_flags(qwen2_vl.SPEC, options(chat_template="gme-qwen2-vl", pooling="last"), "gme")
    check_family_flags(decoder.SPEC, options(pooling="mean"), "m")
    with pytest.raises(ConfigError) as e:
        check_family_flags(decoder.SPEC, options(chat_template="gme-qwen2-vl"), "m")
    assert str(e.value) == ("--chat-template gme-qwen2-vl does not apply to m: it applies to Qwen2-VL (GME) models; "
                            "use prompt_name for instructions")
    with pytest.raises(ConfigError, match=r"--pooling cls does not apply to c: CLIP's towers pool themselves .* "
                                          r"leave --pooling out"):
        check_family_flags(clip.SPEC, options(pooling="cls"), "c")


def test_engine_config_reads_flags_only():
    """Every field of EngineConfig is a flag of add_engine_args (or the parsed --json-model-override-args),
    so from_args cannot miss one; a field added without its flag fails here."""
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = parse_with_config(p, ["--tp", "2", "--pooling", "mean", "--json-model-override-args", '{"a": 1}'])
    config = EngineConfig.from_args(args)
    assert (config.tp, config.pooling, config.model_overrides) == (2, "mean", {"a": 1})
    dests = {a.dest for a in p._actions} | {"model_overrides"}
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= dests
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tp = 4
