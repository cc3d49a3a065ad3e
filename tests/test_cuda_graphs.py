"""CUDA graphs for small batches (tp_embed/cuda_graphs.py, --cuda-graph-max-tokens).

On the CPU every step but the capture itself runs with `capture_eagerly` standing in for a graph (its replay
runs the forward pass again into the same output tensor): the sizes, the padding sequence and the empty slots,
the static buffers, re-planning the recorded attention for each batch, and the engine's pooling of a graph's rows.
The families' outputs through a padded "graph" equal their eager outputs. GPU-marked tests capture real graphs."""

import logging

import pytest
import torch

import tiny_gemma as tg
import tiny_models as tm
import tiny_modernbert as tmb
from test_last_layer_pruning import make_engine
from tiny_mpnet import make_mpnet
from tp_embed.batch import Batch
from tp_embed.cuda_graphs import CudaGraphs, capture_eagerly, graph_sizes, pad_batch
from tp_embed.layers.attention import GraphUnsupported, flashinfer_available

CASES = {  # name -> (builder, --pooling or None for the model's own)
    "bert": (tm.make_bert, None),  # cls
    "qwen3": (tm.make_qwen3, None),  # last, causal, q/k norm
    "modernbert": (tmb.make_modernbert, None),  # local windows on both sides
    "embeddinggemma": (tg.make_embeddinggemma, "mean"),  # two rope tables, windows
}


def test_graph_sizes():
    assert graph_sizes(512) == [16, 32, 64, 128, 256, 512]
    assert graph_sizes(100) == [16, 32, 64, 100]
    assert graph_sizes(16) == [16] and graph_sizes(5) == [5] and graph_sizes(0) == []


def test_pad_batch():
    batch = Batch.from_token_ids([[5, 6, 7], [8, 9]])
    padded = pad_batch(batch, 8, 4)
    assert padded.input_ids.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert padded.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert padded.cu_seqlens.tolist() == [0, 3, 5, 8, 8]  # the padding sequence, then an empty slot
    assert padded.input_ids.dtype == padded.positions.dtype == padded.cu_seqlens.dtype == torch.int32
    exact = pad_batch(batch, 5, 2)  # no padding needed: no padding sequence
    assert exact.cu_seqlens.tolist() == [0, 3, 5] and exact.num_tokens == 5
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(batch, 4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(batch, 8, 2)  # two sequences and the padding one need three slots


def eager_graphs(engine, max_tokens: int, max_seqs: int = 256) -> CudaGraphs:
    return CudaGraphs(lambda batch: engine.model(batch, engine.attention_backend), engine.device, max_tokens,
                      max_seqs, capture=capture_eagerly, any_backend=True)


@pytest.mark.parametrize("name", list(CASES))
def test_a_padded_graph_gives_the_eager_hidden_states(name, tmp_path):
    """Batches of several shapes through the graphs, one after another (each replan must take), against the
    model's eager forward pass on the same batch; then the engine's vectors with the graphs against without."""
    build, pooling = CASES[name]
    engine = make_engine("--model-path", build(str(tmp_path / name)), *(["--pooling", pooling] if pooling else []))
    graphs = eager_graphs(engine, 64, max_seqs=6)
    assert [(g.size, g.slots) for g in graphs.graphs] == [(16, 7), (32, 7), (64, 7)]
    seqs = engine.text.encode(tm.MIXED_TEXTS, truncate=True)
    shapes = [[seqs[0]], [seqs[3], seqs[1]], [s[:9] for s in seqs[:6]], [list(range(5, 69))], [seqs[2][:16]]]
    for sequences in shapes:
        batch = Batch.from_token_ids(sequences)
        graph = graphs.find(batch)
        assert graph is not None and graph.size == min(g.size for g in graphs.graphs if g.size >= batch.num_tokens)
        got = graphs.run(graph, batch)
        with torch.inference_mode():
            want = engine.model(batch, engine.attention_backend)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    eager = engine.embed(seqs)
    engine.graphs = graphs
    torch.testing.assert_close(engine.embed(seqs), eager, atol=1e-5, rtol=1e-5)


def test_what_runs_eagerly(tmp_path):
    engine = make_engine("--model-path", tm.make_bert(str(tmp_path / "bert")))
    graphs = eager_graphs(engine, 32, max_seqs=2)
    assert graphs.find(Batch.from_token_ids([[1] * 33])) is None  # past the largest graph
    assert graphs.find(Batch.from_token_ids([[1]] * 3)) is None  # more sequences than any graph's slots
    assert graphs.find(Batch.from_token_ids([[1]] * 2)).size == 16
    assert graphs.find(Batch.from_token_ids([[1] * 16] * 2)).size == 32  # 16 tokens, but no slot to pad in
    assert graphs.find(Batch.from_token_ids([[1, 2]], type_starts=[1])) is None  # segment ids
    assert graphs.find(Batch.from_token_ids([[1, 2]], output=1)) is None  # a token head's output


def test_only_flashinfer_attention_is_captured(tmp_path):
    """Without the CPU tests' any_backend, attention other than FlashInfer (here the CPU's; MPNet's relative
    bias anywhere) is refused before anything is captured."""
    engine = make_engine("--model-path", tm.make_bert(str(tmp_path / "bert")))
    with pytest.raises(GraphUnsupported, match="not FlashInfer"):
        CudaGraphs(lambda b: engine.model(b, engine.attention_backend), engine.device, 16, 4, capture=capture_eagerly)
    mpnet = make_engine("--model-path", make_mpnet(str(tmp_path / "mpnet")))
    with pytest.raises(GraphUnsupported, match="relative position bias"):
        eager_graphs(mpnet, 16)


def test_the_flag_on_the_cpu_warns_and_runs_eagerly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tp_embed"):
        engine = make_engine("--model-path", tm.make_bert(str(tmp_path / "bert")), "--cuda-graph-max-tokens", "64")
    assert engine.graphs is None
    assert "--cuda-graph-max-tokens 64: no CUDA graphs" in caplog.text and "need CUDA" in caplog.text


def test_the_flag_rejects_a_negative_size(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_engine("--cuda-graph-max-tokens", "-1")
    assert "--cuda-graph-max-tokens must be 0 (off) or more" in capsys.readouterr().err


needs_cuda_flashinfer = pytest.mark.skipif(not torch.cuda.is_available() or not flashinfer_available(),
                                           reason="needs a CUDA GPU with flashinfer installed")


@pytest.mark.gpu
@needs_cuda_flashinfer
@pytest.mark.parametrize("name", ["qwen3", "bert"])
def test_captured_graphs_match_eager_on_cuda(name, tmp_path):
    """Real CUDA graphs (head dim 64, so attention is FlashInfer's) on bf16: every graph's rows against the
    eager pass, and the engine's vectors with --cuda-graph-max-tokens against without."""
    build = {"qwen3": lambda p: tm.make_qwen3(p, head_dim=64),
             "bert": lambda p: tm.make_bert(p, hidden_size=128, num_attention_heads=2)}[name]
    path = build(str(tmp_path / name))
    # batches of at most 128 tokens, so the engine's own batches all run in graphs
    flags = ["--model-path", path, "--device", "cuda", "--max-batch-tokens", "128"]
    eager = make_engine(*flags)
    graphed = make_engine(*flags, "--cuda-graph-max-tokens", "128")
    assert graphed.graphs is not None and [g.size for g in graphed.graphs.graphs] == [16, 32, 64, 128]
    seqs = eager.text.encode(tm.MIXED_TEXTS, truncate=True)
    for sequences in ([seqs[0]], [s[:9] for s in seqs[:6]], [list(range(5, 133))], [s[:40] for s in seqs[:3]]):
        batch = Batch.from_token_ids(sequences)
        graph = graphed.graphs.find(batch)
        assert graph is not None
        got = graphed.graphs.run(graph, batch).float()
        with torch.inference_mode():
            want = graphed.model(batch.to("cuda"), graphed.attention_backend).float()
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min() > 0.999, (len(sequences), cos.min())
    a, b = eager.embed(seqs), graphed.embed(seqs)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999
