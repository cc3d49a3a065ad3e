"""Every family's tiny checkpoints (the first ones: Mistral, Qwen2, Qwen3, BERT, XLM-R; then MPNet, ModernBERT,
Gemma, SPLADE, bge-m3, FP8 checkpoints), the real all-MiniLM-L6-v2, and ONE torchrun job per tp that embeds all
of them: torch and gloo start three times instead of a dozen. tests/test_models.py, test_mpnet.py,
test_modernbert.py, test_gemma.py, test_splade.py, test_bge_m3.py, test_fp8_checkpoint.py and test_minilm.py read
their models' outputs from the session fixture `family_jobs` (tests/conftest.py); each file's docstring says what
its models are for."""

from dataclasses import dataclass

import tiny_gemma as tg
import tiny_models as tm
import tiny_modernbert as tmb
import tiny_splade as tsp
from dist_utils import embed_models
from tiny_fp8 import make_fp8_checkpoint
from tiny_m3 import make_bge_m3
from tiny_mpnet import make_mpnet

TPS = (1, 2, 4)
TEXTS = tm.MIXED_TEXTS
MPNET_TEXTS = tm.MIXED_TEXTS + [tm.LONG_TEXT]  # cut to 256 tokens: distances past the bias's 128
MODERNBERT_FULL_WINDOW = 1024  # local_attention that covers every text
SPLADE_TEXTS = tm.MIXED_TEXTS + [tm.LONG_TEXT]  # cut to 256 tokens
# all-MiniLM-L6-v2 (tests/test_minilm.py): scripts, emoji, an empty text, and texts past its 256 tokens
MINILM_TEXTS = tm.MIXED_TEXTS + [
    "A man is eating food.", "A man is riding a horse.", "The new movie is awesome!",
    "Die Katze sitzt auf der Matte.", "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El aprendizaje automático transforma la industria.", "Это предложение на русском языке.",
    "これは日本語の文です。", "这是一个中文句子。", "이것은 한국어 문장입니다.", "Ελληνικά γράμματα αβγ",
    "emoji 🚀🔥 and symbols ∑∫√", "", " ".join(["long"] * 400), tm.LONG_TEXT * 3,
    "Tabs\tand\nnewlines\r\nmixed", "UPPER CASE TEXT", "a" * 1000,
]
MINILM = {"name": "minilm", "flags": ["--truncate"], "texts": MINILM_TEXTS}  # no --model-path: the embedded default
# tests/test_models.py's checkpoints (classic_checkpoints), and the extra runs of them it reads
CLASSIC = ("mistral", "mistral_sharded", "qwen2", "qwen3", "bert", "bert_prefixed", "xlmr", "xlmr_prefixed",
           "bert_dense", "qwen3_dense")
MATRYOSHKA = '{"matryoshka_dimensions": [16, 32]}'


@dataclass(frozen=True)
class FamilyJobs:
    checkpoints: dict  # name -> model directory
    dirs: dict  # tp -> output directory (tests/embed_models.py's files)


def build_checkpoints(root) -> dict:
    gte = tmb.make_modernbert(str(root / "gte"), legacy_config=True)
    return {
        "mpnet": make_mpnet(str(root / "mpnet")),
        # the MPNetForMaskedLM layout: `mpnet.` keys and an lm_head to ignore
        "mpnet_prefixed": make_mpnet(str(root / "mpnet_prefixed"), seed=1, with_prefix=True),
        "gte": gte,
        "nomic": tmb.make_modernbert(str(root / "nomic"), seed=1, pooling="mean", masked_lm=True, bias=True),
        "gte_full": tmb.with_local_attention(gte, str(root / "gte_full"), MODERNBERT_FULL_WINDOW),
        "gemma2": tg.make_gemma2(str(root / "gemma2")),
        "embeddinggemma": tg.make_embeddinggemma(str(root / "embeddinggemma")),
        # gemma-3-1b layout: `model.` keys, an lm_head to skip, causal with a one-sided window
        "gemma3_causal": tg.make_embeddinggemma(str(root / "gemma3_causal"), seed=1,
                                                use_bidirectional_attention=False, architecture="Gemma3ForCausalLM"),
        "splade_bert": tsp.make_splade_bert(str(root / "splade_bert")),
        "splade_bert_untied": tsp.make_splade_bert(str(root / "splade_bert_untied"), seed=1,
                                                   tie_word_embeddings=False, pooling_strategy="sum"),
        "splade_distilbert": tsp.make_splade_distilbert(str(root / "splade_distilbert"), seed=2,
                                                        activation_function="log1p_relu"),
        "bge_m3": make_bge_m3(str(root / "bge_m3")),
        **fp8_checkpoints(root),
        **classic_checkpoints(root),
    }


def classic_checkpoints(root) -> dict:
    """tests/test_models.py's models but "mistral" (fp8_checkpoints' tiny Mistral, the same checkpoint)."""
    return {
        "mistral_sharded": tm.make_mistral(str(root / "mistral_sharded"), max_shard_size="20KB", legacy_config=True),
        "qwen2": tm.make_qwen2_bidirectional(str(root / "qwen2")),
        "qwen3": tm.make_qwen3(str(root / "qwen3")),
        "bert": tm.make_bert(str(root / "bert")),
        "bert_prefixed": tm.make_bert(str(root / "bert_prefixed"), with_prefix=True),
        "xlmr": tm.make_xlm_roberta(str(root / "xlmr")),
        "xlmr_prefixed": tm.make_xlm_roberta(str(root / "xlmr_prefixed"), with_prefix=True),
        # sentence-transformers Dense modules after pooling: a tanh projection, and a stella-style linear one
        "bert_dense": tm.add_dense_module(tm.make_bert(str(root / "bert_dense"), seed=1), 32, "tanh"),
        "qwen3_dense": tm.add_dense_module(tm.make_qwen3(str(root / "qwen3_dense"), seed=1), 48, "identity"),
    }


def classic_specs(ck: dict) -> list[dict]:
    """tests/test_models.py's runs: every classic checkpoint (the decoders alone too), a prompt, a forced-causal
    Qwen2 and Matryoshka dimensions."""
    specs = [{"name": name, "flags": ["--model-path", ck[name]], "alone": name in ("mistral", "qwen2", "qwen3")}
             for name in CLASSIC]
    return specs + [
        {"name": "mistral_query", "flags": ["--model-path", ck["mistral"], "--prompt-name", "query"]},
        {"name": "qwen2_forced_causal",
         "flags": ["--model-path", ck["qwen2"], "--json-model-override-args", '{"is_causal": true}']},
        {"name": "qwen3_dim16",
         "flags": ["--model-path", ck["qwen3"], "--json-model-override-args", MATRYOSHKA, "--dimensions", "16"]},
    ]


def fp8_checkpoints(root) -> dict:
    """A tiny Mistral, and it saved in FP8 as llm-compressor and fbgemm save it (tests/test_fp8_checkpoint.py)."""
    mistral = tm.make_mistral(str(root / "mistral"))
    return {"mistral": mistral,
            "mistral_ct": make_fp8_checkpoint(mistral, str(root / "mistral_ct"), "compressed-tensors"),
            "mistral_fbgemm": make_fp8_checkpoint(mistral, str(root / "mistral_fbgemm"), "fbgemm_fp8")}


def model_specs(ck: dict, tp: int) -> list[dict]:
    def model(name, *flags, path=None, alone=False, **extra):
        return {"name": name, "flags": ["--model-path", ck[path or name], *flags], "alone": alone, **extra}

    specs = [
        model("mpnet", "--truncate", alone=True, texts=MPNET_TEXTS),
        model("mpnet_prefixed", "--truncate", texts=MPNET_TEXTS),
        model("gte", alone=True),
        model("nomic"),
        model("gemma2"),
        model("embeddinggemma", alone=True),
        model("gemma3_causal"),
        model("embeddinggemma_query", "--prompt-name", "query", path="embeddinggemma"),
        model("splade_bert", "--truncate", alone=True, texts=SPLADE_TEXTS),
        model("splade_bert_untied", "--truncate", texts=SPLADE_TEXTS),
        model("splade_distilbert", "--truncate", texts=SPLADE_TEXTS),
        model("bge_m3", token_outputs=["sparse", "colbert"]),
        model("mistral_fp8", "--quantization", "fp8", path="mistral"),
        model("mistral_ct"),
        model("mistral_fbgemm"),
        MINILM,
        *classic_specs(ck),  # "mistral" among them
    ]
    if tp == 1:  # ModernBERT with PyTorch's attention (the others take the compiled CPU kernel where it builds)
        specs.append(model("gte_torch", "--cpu-attention", "torch", path="gte"))
    if tp == 2:
        specs += [model("gte_full"),
                  model("gemma2_no_softcap", "--json-model-override-args", '{"attn_logit_softcapping": null}',
                        path="gemma2")]
    return specs


def run(tmp_path_factory) -> FamilyJobs:
    checkpoints = build_checkpoints(tmp_path_factory.mktemp("families"))
    dirs = {}
    for tp in TPS:
        dirs[tp] = str(tmp_path_factory.mktemp(f"families_tp{tp}"))
        embed_models(tp, dirs[tp], TEXTS, model_specs(checkpoints, tp))
    return FamilyJobs(checkpoints, dirs)
