"""CUDA graphs for small batches (`--cuda-graph-max-tokens`): one short request is otherwise dominated by the
launches of a few hundred small kernels.

At startup the engine captures one graph per size in `graph_sizes` (powers of two from 16 up to the flag's
value). A graph holds a static batch of exactly `size` tokens in up to `slots` sequences. A batch of T tokens in
n sequences runs in the smallest graph with size >= T and slots > n:

    pad_batch:   the batch's sequences, then one padding sequence of size - T tokens (attention never crosses
                 sequences, so it changes nothing), then empty sequences up to `slots`
    copy:        the padded token ids and positions into the graph's static buffers
    replan:      the graph's attention plans (FlashInfer's CUDA-graph mode, tp_embed/layers/attention) for the
                 padded boundaries: host work, outside the graph
    replay:      the forward pass; the first T rows of the graph's output are the batch's hidden states

Larger batches, and those with more sequences than a graph has slots, run eagerly. The final layer is not
pruned in a graph (its rows would change with every batch). What a graph takes: models whose rank 0 pools
hidden states (not CLIP, classifiers or SPLADE), text only (no images, no segment ids, no token-head output),
attention in FlashInfer (head dims 64/128/256, no relative bias, no window on both sides) and tp 1: the
all-reduce inside a captured graph is not supported yet.

`capture` is the only CUDA-specific step; tests run everything else on the CPU with `capture_eagerly`, whose
"replay" runs the function again into the same output tensor.
"""

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from tp_embed.batch import Batch
from tp_embed.layers.attention import GraphPlans

MIN_GRAPH_TOKENS = 16


def graph_sizes(max_tokens: int) -> list[int]:
    """The token counts graphs are captured for: powers of two from 16 below max_tokens, then max_tokens."""
    sizes, size = [], MIN_GRAPH_TOKENS
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return sizes + [max_tokens] if max_tokens >= 1 else []


def pad_batch(batch: Batch, tokens: int, slots: int) -> Batch:
    """`batch` (on the CPU) padded to exactly `tokens` tokens in `slots` sequences: its own, one padding
    sequence of token id 0 at positions 0, 1, ... (when it has fewer tokens), then empty ones."""
    n, t = batch.num_seqs, batch.num_tokens
    if t > tokens or n + (t < tokens) > slots:
        raise ValueError(f"a batch of {t} tokens in {n} sequences does not fit {tokens} tokens in {slots} sequences")
    pad = tokens - t
    input_ids = torch.cat([batch.input_ids, torch.zeros(pad, dtype=batch.input_ids.dtype)])
    positions = torch.cat([batch.positions, torch.arange(pad, dtype=batch.positions.dtype)])
    cu_seqlens = torch.full((slots + 1,), tokens, dtype=torch.int32)
    cu_seqlens[:n + 1] = batch.cu_seqlens
    return Batch(input_ids, positions, cu_seqlens, max(batch.max_seqlen, pad))


def warm_up(model: Callable[[Batch], torch.Tensor], static: Batch, plans: GraphPlans, device: torch.device) -> None:
    """The eager run before a capture, recording the attention plans and building what the model builds lazily
    (rotary tables); on CUDA on a side stream, as torch.cuda.graph's documentation asks."""
    if device.type != "cuda":
        with plans.recording():
            model(static)
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), plans.recording():
        model(static)
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)


def forward_reusing(model: Callable[[Batch], torch.Tensor], static: Batch, plans: GraphPlans) -> torch.Tensor:
    """The graph's forward pass: the model on the static batch with the recorded attention plans."""
    with plans.reusing():
        return model(static)


def capture_cuda(fn: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture fn (already run once eagerly) into a CUDA graph in memory pool `pool`; returns (replay, output)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


def capture_eagerly(fn: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """The CPU tests' stand-in for `capture_cuda`: "replay" runs fn again into the same output tensor."""
    out = fn()
    return lambda: out.copy_(fn()), out


@dataclass
class Graph:
    size: int  # tokens
    slots: int  # sequences, the padding one included
    static: Batch  # token ids and positions on the device (the graph reads them), boundaries on the CPU
    plans: GraphPlans
    replay: Callable[[], None]
    output: torch.Tensor  # [size, hidden], rewritten by every replay


class CudaGraphs:
    """The captured graphs of one rank's model, smallest first; `run` replays the one that fits."""

    def __init__(self, model: Callable[[Batch], torch.Tensor], device: torch.device, max_tokens: int,
                 max_seqs: int, capture=capture_cuda, any_backend: bool = False):
        """model(batch) -> hidden states [num_tokens, hidden]. Captures from the largest size down, all in one
        memory pool (a smaller graph reuses the larger's memory: only one runs at a time). Raises
        GraphUnsupported (tp_embed.layers.attention) where the model's attention cannot be captured."""
        pool = torch.cuda.graph_pool_handle() if capture is capture_cuda else None
        self.graphs = []
        for size in reversed(graph_sizes(max_tokens)):
            slots = min(size, max_seqs) + 1  # + the padding sequence
            static = pad_batch(Batch.from_token_ids([[0] * size]), size, slots)
            static = Batch(static.input_ids.to(device), static.positions.to(device), static.cu_seqlens, size)
            plans = GraphPlans(slots, device, any_backend)
            warm_up(model, static, plans, device)
            replay, output = capture(functools.partial(forward_reusing, model, static, plans), pool)
            self.graphs.insert(0, Graph(size, slots, static, plans, replay, output))

    @property
    def max_tokens(self) -> int:
        return self.graphs[-1].size if self.graphs else 0

    def find(self, batch: Batch) -> Graph | None:
        """The smallest graph that takes `batch`, or None (it runs eagerly)."""
        if batch.output or batch.pixel_values is not None or batch.token_type_ids is not None:
            return None
        for graph in self.graphs:
            if graph.size >= batch.num_tokens and graph.slots > batch.num_seqs:
                return graph
        return None

    def run(self, graph: Graph, batch: Batch) -> torch.Tensor:
        """`batch` (on the CPU) through `graph`: its hidden states [num_tokens, hidden], a view of the graph's
        output that the next replay overwrites."""
        padded = pad_batch(batch, graph.size, graph.slots)
        graph.static.input_ids.copy_(padded.input_ids)
        graph.static.positions.copy_(padded.positions)
        graph.plans.replan(padded.cu_seqlens, padded.max_seqlen)
        graph.replay()
        return graph.output[:batch.num_tokens]
