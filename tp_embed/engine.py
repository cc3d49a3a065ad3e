"""The engine: every rank holds a model shard; rank 0 also tokenizes, packs batches, sends them to the
workers and pools.

    rank 0:   tokens -> pack -> send_batch + model.forward -> pool -> float32 [n, hidden]
    rank k>0: worker_loop: recv -> model.forward (its shard, all-reduces with rank 0) -> repeat

Exactly one thread on rank 0 may call `forward_pooled` / `heartbeat` / `stop_workers`: collectives must
be issued in the same order on every rank.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time

import torch
from tqdm import tqdm

from tp_embed.batch import Batch
from tp_embed.config import ConfigError, EngineConfig, SentenceTransformersConfig, resolve_dtype
from tp_embed.cuda_graphs import CudaGraphs
from tp_embed.distributed import all_reduce_min, init_distributed
from tp_embed.kernels import load_cpu_attention
from tp_embed.layers import fused
from tp_embed.layers.attention import GraphUnsupported
from tp_embed.layers.fp8 import fp8_supported
from tp_embed.layers.fp8_checkpoint import checkpoint_fp8, quantization_config
from tp_embed.layers.linear import onednn_available, prepack_linears, quantize_linears
from tp_embed.loader import init_dummy_weights, load_weights
from tp_embed.model_path import resolve_model_path
from tp_embed.models import build_model, check_family_flags, load_config
from tp_embed.models.spec import ProcessorSetup
from tp_embed.packing import pack
from tp_embed.pooling import pool
from tp_embed.protocol import Cmd, recv, recv_pooled, send_batch, send_command, send_pooled
from tp_embed.st_modules import DenseStack
from tp_embed.text import TextProcessor
from tp_embed.token_heads import TokenHeads

logger = logging.getLogger("tp_embed")


def fit_batch_tokens(requested: int, free_bytes: float, bytes_per_token: float, headroom: float = 0.85) -> int:
    """The largest batch budget <= requested whose activations fit in headroom x the free memory."""
    if bytes_per_token <= 0:
        return requested
    return max(1, min(requested, int(free_bytes * headroom / bytes_per_token)))


class Engine:
    """One rank's shard of the model; on a group's rank 0 also the tokenizer, the batch budgets, pooling and
    the family's multimodal processor. Rank 0's engine thread is the `BatchRunner` processors see."""

    def __init__(self, options: EngineConfig, show_progress: bool = True):
        self.options = options
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(options.num_threads or max(1, (os.cpu_count() or 1) // local_world))
        self.dist = init_distributed(options.tp, options.device, options.dist_backend, options.dist_timeout,
                                     options.dp)
        self.is_driver = self.dist.tp_rank == 0
        self.model_dir, self.model_name = resolve_model_path(options.model_path)
        self.spec, self.config = load_config(self.model_dir, options.tp, options.trust_remote_code,
                                             options.model_overrides, self.model_name)
        check_family_flags(self.spec, options, self.model_name)
        self.device = self.dist.device
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.load_model(show_progress and self.is_driver)
        self.attention_backend = self.choose_attention()
        self.max_batch_tokens = options.max_batch_tokens or (16384 if self.device.type == "cuda" else 8192)
        if self.device.type == "cuda":
            self.max_batch_tokens = self.fit_batch_to_memory(self.max_batch_tokens)
        self.max_batch_seqs = options.max_batch_seqs
        st = SentenceTransformersConfig.read(self.model_dir)
        self.pooling = None  # the model pools itself: its forward returns one vector per input
        if self.spec.default_pooling is not None:
            self.pooling = options.pooling or st.pooling or self.spec.default_pooling
        # sentence-transformers' Dense modules after pooling, on each group's rank 0 (which pools)
        self.dense = None
        if self.is_driver and self.pooling is not None:
            self.dense = DenseStack.load(self.model_dir, st.dense, self.config.embedding_size, self.device)
        if options.long_inputs == "chunk" and self.pooling is None:
            raise ConfigError(f"--long-inputs chunk combines the pooled vectors of an input's windows, and "
                              f"{self.model_name} ({', '.join(self.tasks)}) pools its own outputs: use "
                              f"--long-inputs error or truncate")
        # bge-m3's sparse and ColBERT heads, where the directory has them (tp_embed/token_heads.py)
        self.token_heads = None
        if self.is_driver and self.pooling is not None:
            self.token_heads = TokenHeads.load(self.model_dir, self.config.hidden_size, self.device)
        has_st = os.path.isfile(os.path.join(self.model_dir, "modules.json"))
        self.normalize = options.normalize if options.normalize is not None else (st.normalize or not has_st)
        hf = self.config.hf_config
        self.matryoshka_dimensions = getattr(hf, "matryoshka_dimensions", None)
        self.is_matryoshka = bool(getattr(hf, "is_matryoshka", False))
        self.graphs = self.capture_graphs()
        self.text = self.processor = None
        if self.is_driver:
            self.text = self.build_text(st)
            # multimodal families bring a processor for images (None: text only)
            if self.spec.processor is not None:
                self.processor = self.spec.processor(
                    ProcessorSetup(self.model_dir, self.model_name, self.config, self.text, options))

    def load_model(self, show_progress: bool) -> None:
        """Build this rank's shard, fill it (checkpoint or --load-format dummy), and pack its linear layers
        for oneDNN where --cpu-matmul asks (float32 on the CPU only: elsewhere nothing is packed)."""
        t0 = time.perf_counter()
        fp8_format = None
        if self.options.load_format != "dummy":
            fp8_format = checkpoint_fp8(quantization_config(self.config.hf_config), self.model_name)
        quantize = self.options.quantization == "fp8" or fp8_format is not None
        why = fp8_supported(self.device) if quantize else None
        if why is not None:  # before any weight is read
            if self.options.quantization == "fp8":
                raise ConfigError(f"--quantization fp8: {why}")
            logger.warning("%s is an FP8 checkpoint (%s), but %s: serving its weights dequantized in %s",
                           self.model_name, fp8_format, why, self.dtype)
            quantize = False
        fused.set_enabled(self.options.fused_ops != "off")
        self.model = build_model(self.spec, self.config, self.dtype, self.device)
        if self.options.load_format == "dummy":
            self.load_stats = init_dummy_weights(self.model)
        else:
            self.load_stats = load_weights(self.model, self.spec.checkpoint, self.model_dir, show_progress, fp8_format)
        if quantize:
            quantize_linears(self.model)
        self.load_seconds = time.perf_counter() - t0
        packed = self.options.cpu_matmul == "onednn" and onednn_available() and prepack_linears(self.model) > 0
        self.cpu_matmul = "onednn" if packed else "torch"

    def build_text(self, st: SentenceTransformersConfig) -> TextProcessor:
        text = TextProcessor(self.model_dir, st, self.config.max_input_tokens, self.options.context_length,
                             self.options.trust_remote_code)
        text.prompts.update(self.options.prompts)  # --prompts over the model's own
        if text.max_length > self.max_batch_tokens:
            # an input must fit one batch: longer ones are refused (or truncated when asked), never looped on
            logger.warning("context length %d exceeds the batch budget of %d tokens; inputs are limited to %d",
                           text.max_length, self.max_batch_tokens, self.max_batch_tokens)
            text.max_length = self.max_batch_tokens
        return text

    def choose_attention(self) -> str:
        """--attention-backend, or "cpu_kernel" where --cpu-attention lets the compiled CPU kernel take it."""
        wanted, backend = self.options.cpu_attention, self.options.attention_backend
        if self.device.type != "cpu" or self.dtype != torch.float32 or backend != "auto" or wanted == "torch":
            return backend
        error = load_cpu_attention()
        if error is None:
            return "cpu_kernel"
        if wanted == "kernel":
            raise ConfigError(f"--cpu-attention kernel: the CPU attention kernel could not be built: {error}")
        if self.is_driver:
            logger.warning("the CPU attention kernel could not be built (%s); attending with PyTorch's ops, "
                           "which are slower on short inputs (install a C++ compiler, or pass "
                           "--cpu-attention torch to silence this)", error)
        return backend

    @torch.inference_mode()
    def fit_batch_to_memory(self, requested: int, probe_tokens: int = 2048) -> int:
        """The profiling pass, on every rank at once with the same dummy batch: run `probe_tokens`
        tokens, measure the peak memory the forward pass adds per token, and cap the batch budget so a
        full batch fits in what is free after loading. The ranks agree on the smallest budget."""
        # several sequences, so the probe takes the packed path that full batches take
        seq_len = min(256, self.config.max_input_tokens)
        num_seqs = max(2, probe_tokens // seq_len)
        batch = Batch.from_token_ids([[0] * seq_len] * num_seqs, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.model(batch, self.attention_backend)
        torch.cuda.synchronize(self.device)
        per_token = (torch.cuda.max_memory_allocated(self.device) - base) / batch.num_tokens
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = all_reduce_min(fit_batch_tokens(requested, free, per_token))
        if budget < requested:
            logger.warning("--max-batch-tokens %d does not fit in GPU memory (%.1f GiB free, %.0f KiB per "
                           "token); using %d", requested, free / 2 ** 30, per_token / 1024, budget)
        return budget

    @torch.inference_mode()
    def capture_graphs(self) -> CudaGraphs | None:
        """--cuda-graph-max-tokens: this rank's CUDA graphs for small batches (tp_embed/cuda_graphs.py), or None
        (off, or the setup cannot take them: a warning says why)."""
        max_tokens = min(self.options.cuda_graph_max_tokens, self.max_batch_tokens)
        if not max_tokens:
            return None
        why = None
        if self.device.type != "cuda":
            why = "they need CUDA"
        elif self.dist.tp_size > 1:
            why = "they run at tp 1 only for now (an all-reduce inside a captured graph is not supported)"
        elif self.pooling is None:
            why = f"{self.model_name} pools its own outputs ({', '.join(self.tasks)})"
        if why is None:
            t0 = time.perf_counter()
            try:
                graphs = CudaGraphs(lambda batch: self.model(batch, self.attention_backend), self.device,
                                    max_tokens, self.max_batch_seqs)
            except GraphUnsupported as e:
                why = str(e)
            except RuntimeError as e:  # a capture CUDA refused: serve eagerly rather than not at all
                why = f"the capture failed: {e}"
            else:
                if self.is_driver:
                    logger.info("captured %d CUDA graphs for batches of up to %d tokens in %.1f s",
                                len(graphs.graphs), graphs.max_tokens, time.perf_counter() - t0)
                return graphs
        if self.is_driver:
            logger.warning("--cuda-graph-max-tokens %d: no CUDA graphs, every batch runs eagerly: %s",
                           self.options.cuda_graph_max_tokens, why)
        return None

    @property
    def embedding_size(self) -> int:
        """Size of the vectors this engine returns (before Matryoshka truncation): the model's, or that of its
        last sentence-transformers Dense module."""
        return self.config.embedding_size if self.dense is None else self.dense.out_features

    @property
    def tasks(self) -> tuple[str, ...]:
        """What this model serves: embed, score, rerank, classify, sparse (ModelConfig.tasks), and on rank 0
        its token heads' outputs (sparse, colbert)."""
        heads = self.token_heads.outputs if self.token_heads is not None else ()
        return self.config.tasks + tuple(h for h in heads if h not in self.config.tasks)

    def forward_pooled(self, sequences: list[list[int]], type_starts: list[int] | None = None) -> torch.Tensor:
        """Rank 0: one packed batch of token sequences -> pooled float32 [n, hidden] on CPU (a head's
        logits [n, num_labels]); `type_starts` gives each pair's second segment (Batch.from_token_ids)."""
        return self.forward_batch(Batch.from_token_ids(sequences, type_starts=type_starts))

    @torch.inference_mode()
    def forward_batch(self, batch: Batch) -> torch.Tensor:
        """Rank 0: send `batch` (built on the CPU) to the workers, run this rank's shard (in a CUDA graph where
        one takes it, tp_embed/cuda_graphs.py), and pool.

        Models that pool themselves (the family's default_pooling is None: CLIP's towers end in their own
        pooling and projection) return one vector per item; the others return hidden states that `pool`
        reduces per sequence.
        """
        send_batch(batch)
        graph = None if self.graphs is None else self.graphs.find(batch)
        if graph is not None:  # a CUDA graph runs it (no last-layer pruning): the device needs only the boundaries
            out, rows = self.graphs.run(graph, batch), None
            batch = dataclasses.replace(batch, cu_seqlens=batch.cu_seqlens.to(self.device))
        else:
            batch = batch.to(self.device)
            rows = self.pooled_rows(batch)
            out = self.run_model(batch, rows)
        if batch.output:  # a token head's row for every token
            return self.token_heads(out, batch.output).cpu()
        if self.pooling is None:
            return out.float().cpu()
        pooled = out.float() if rows is not None else pool(out, batch.cu_seqlens, self.pooling)
        return (pooled if self.dense is None else self.dense(pooled)).cpu()

    def forward_tokens(self, sequences: list[list[int]], output: int) -> torch.Tensor:
        """Rank 0: one packed batch -> the token head `output`'s float32 [num_tokens, width] on CPU."""
        return self.forward_batch(Batch.from_token_ids(sequences, output=output))

    def pooled_rows(self, batch: Batch) -> torch.Tensor | None:
        """The rows cls or last pooling reads, where the model can stop its final layer at them (last-layer
        pruning: that layer's attention output projection and MLP run on one row per input); else None.
        Every rank of the group computes the same rows from the batch."""
        if not self.spec.prunes_last_layer or self.pooling not in ("cls", "last") or batch.output:
            return None
        cu = batch.cu_seqlens.long()
        return cu[:-1] if self.pooling == "cls" else cu[1:] - 1

    def run_model(self, batch: Batch, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return self.model(batch, self.attention_backend)
        return self.model(batch, self.attention_backend, rows=rows)

    def embed(self, sequences: list[list[int]], lanes: list | None = None,
              show_progress: bool = False, type_starts: list[int] | None = None) -> torch.Tensor:
        """Rank 0: pooled float32 [n, hidden] (or a head's logits) for any number of sequences, in their order.

        Sorting by length before packing keeps batches of similar lengths together (less attention
        padding on the SDPA path); results are put back in input order. `lanes` (`groups()`, with data
        parallelism) compute batches at once; the default is this engine's group alone.
        """
        def run_batch(idx: list[int], lane) -> torch.Tensor:
            starts = None if type_starts is None else [type_starts[i] for i in idx]
            return lane.forward_pooled([sequences[i] for i in idx], starts)

        return self.embed_by_length([len(s) for s in sequences], run_batch, lanes, show_progress)

    def embed_by_length(self, lengths: list[int], run_batch, lanes: list | None = None,
                        show_progress: bool = False) -> torch.Tensor:
        """Rank 0: float32 [n, hidden] for n inputs of these token lengths, in input order. Inputs are
        sorted by length, packed by the batch budget, and each batch goes to run_batch(indices, lane),
        which returns its rows. With several lanes each has a thread that takes the next batch while
        the others compute; an error in one is raised once the others have stopped."""
        lanes = lanes or [self]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        batches = collections.deque(
            [order[j] for j in group]
            for group in pack([lengths[i] for i in order], self.max_batch_tokens, self.max_batch_seqs))
        out = torch.empty(len(lengths), self.embedding_size, dtype=torch.float32)
        lock = threading.Lock()
        progress = tqdm(total=len(lengths), unit="input", desc="embedding", disable=not show_progress,
                        dynamic_ncols=True)

        def drain(lane) -> None:
            while True:
                with lock:
                    if not batches:
                        return
                    idx = batches.popleft()
                rows = run_batch(idx, lane)
                with lock:
                    out[idx] = rows
                    progress.update(len(idx))

        try:
            if len(lanes) == 1:
                drain(lanes[0])
            else:
                with concurrent.futures.ThreadPoolExecutor(len(lanes), thread_name_prefix="tp-embed-lane") as pool:
                    for future in [pool.submit(drain, lane) for lane in lanes]:
                        future.result()
        finally:
            progress.close()
        return out

    def prepare_items(self, items: list, truncate: bool | None = None, text: TextProcessor | None = None) -> list:
        """Rank 0, any thread: multimodal Items (text, image or both) -> the model family's prepared
        inputs (token ids, image patches, positions), one per item, through its processor (built by
        the family's spec). `text` is the calling thread's TextProcessor (default the engine's);
        `truncate` None follows --allow-auto-truncate. Raises ValueError naming a bad item."""
        if self.processor is None:
            raise ValueError(f"{self.model_name} takes text only")
        truncate = self.options.allow_auto_truncate if truncate is None else truncate
        return self.processor.prepare_items(text or self.text, items, truncate)

    def prepared_tokens(self, prepared: list) -> int:
        """The tokens prepared inputs take in batches (image tokens included)."""
        return sum(map(self.processor.cost, prepared))

    def embed_prepared(self, prepared: list) -> torch.Tensor:
        """Rank 0, the engine thread: one float32 vector per prepared input, in order; the processor
        packs them into batches and calls `forward_batch` for each."""
        return self.processor.embed_prepared(self, prepared)

    def embed_items(self, items: list, truncate: bool | None = None) -> torch.Tensor:
        """Rank 0: one float32 vector per multimodal Item, in order (prepare_items, then embed_prepared)."""
        return self.embed_prepared(self.prepare_items(items, truncate))

    def warmup(self) -> None:
        if self.is_driver:
            self.forward_pooled([[0] * 8, [0] * 3])

    def heartbeat(self) -> None:
        send_command(Cmd.NOOP)

    def stop_workers(self) -> None:
        send_command(Cmd.STOP)

    def run(self) -> None:
        """What a rank other than global rank 0 does until it is told to stop: lead its group (the
        tp rank 0 of a data-parallel group g >= 1) or follow its leader."""
        if self.is_driver and self.dist.dp_rank > 0:
            self.leader_loop()
        else:
            self.worker_loop()

    def groups(self) -> list:
        """Global rank 0's handles on every data-parallel group, its own group first."""
        return [self] + [RemoteGroup(self, g) for g in range(1, self.dist.dp_size)]

    def leader_loop(self) -> None:
        """Leader of group g >= 1: take batches from global rank 0 over the pair group, run them on
        this group exactly as rank 0 runs its own (broadcast to the group, forward, pool), and send the
        pooled rows back. Heartbeats and STOP are relayed to the group."""
        group, leader = self.dist.leader_group, self.dist.rank
        while True:
            cmd, batch = recv(group=group, src=0)
            if cmd != Cmd.FORWARD:
                send_command(cmd)
                if cmd == Cmd.STOP:
                    return
                continue
            send_pooled(self.forward_batch(batch.to("cpu")), group, leader)

    @torch.inference_mode()
    def worker_loop(self) -> None:
        """Ranks 1..N-1: run every batch rank 0 sends until it sends STOP."""
        while True:
            cmd, batch = recv()
            if cmd == Cmd.STOP:
                return
            if cmd == Cmd.FORWARD:
                batch = batch.to(self.device)
                self.run_model(batch, self.pooled_rows(batch))


class RemoteGroup:
    """Global rank 0's handle on data-parallel group g >= 1: the same calls as Engine's, carried out by
    that group's leader over their pair group. Only the engine thread that owns this handle uses it."""

    def __init__(self, engine: Engine, dp_rank: int):
        self.engine, self.dp_rank = engine, dp_rank
        self.group = engine.dist.leader_groups[dp_rank - 1]
        self.leader = dp_rank * engine.dist.tp_size
        self.max_batch_tokens, self.max_batch_seqs = engine.max_batch_tokens, engine.max_batch_seqs

    def forward_pooled(self, sequences: list[list[int]], type_starts: list[int] | None = None) -> torch.Tensor:
        send_batch(Batch.from_token_ids(sequences, type_starts=type_starts), self.group, 0)
        return recv_pooled(len(sequences), self.engine.embedding_size, self.group, self.leader)

    def forward_tokens(self, sequences: list[list[int]], output: int) -> torch.Tensor:
        send_batch(Batch.from_token_ids(sequences, output=output), self.group, 0)
        num_tokens = sum(map(len, sequences))
        return recv_pooled(num_tokens, self.engine.token_heads.width(output), self.group, self.leader)

    def heartbeat(self) -> None:
        send_command(Cmd.NOOP, self.group, 0)

    def stop_workers(self) -> None:
        send_command(Cmd.STOP, self.group, 0)
