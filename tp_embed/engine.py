"""The engine: every rank holds a model shard; rank 0 also tokenizes, packs batches, sends them to the
workers and pools.

    rank 0:   tokens -> pack_batches -> send_batch + model.forward -> pool -> float32 [n, hidden]
    rank k>0: worker_loop: recv -> model.forward (its shard, all-reduces with rank 0) -> repeat

Exactly one thread on rank 0 may call `forward_pooled` / `heartbeat` / `stop_workers`: collectives must
be issued in the same order on every rank.
"""

import collections
import concurrent.futures
import logging
import os
import threading
import time

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from tp_embed.batch import Batch
from tp_embed.config import ConfigError, ModelConfig, SentenceTransformersConfig, resolve_dtype
from tp_embed.distributed import all_reduce_min, init_distributed
from tp_embed.kernels import load_cpu_attention
from tp_embed.layers.linear import onednn_available, prepack_linears
from tp_embed.loader import init_dummy_weights, load_weights
from tp_embed.model_path import resolve_model_path
from tp_embed.models import build_model, build_processor
from tp_embed.pooling import pool
from tp_embed.protocol import Cmd, recv, recv_pooled, send_batch, send_command, send_pooled

logger = logging.getLogger("tp_embed")


class InputTooLongError(ValueError):
    def __init__(self, index: int, num_tokens: int, limit: int):
        self.index, self.num_tokens, self.limit = index, num_tokens, limit
        super().__init__(f"input {index} has {num_tokens} tokens, more than this model's context length of "
                         f"{limit} tokens; shorten it or ask for truncation (`truncate: true` or "
                         f"--allow-auto-truncate)")


class TextProcessor:
    """The model's own tokenizer as configured (its special tokens, e.g. the EOS that gte-Qwen2 and
    Qwen3-Embedding pool on), the context length and the sentence-transformers prompts."""

    def __init__(self, model_dir: str, config: ModelConfig, st: SentenceTransformersConfig,
                 context_length: int | None, trust_remote_code: bool):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if not self.tokenizer.is_fast:
            logger.warning("%s has no fast tokenizer; tokenization will be slow", model_dir)
        limit = config.max_input_tokens
        if context_length is not None:
            if context_length > limit:
                raise ConfigError(f"--context-length {context_length} exceeds the model's position limit {limit}")
            self.max_length = context_length
        elif st.max_seq_length:
            self.max_length = min(st.max_seq_length, limit)
        elif 0 < getattr(self.tokenizer, "model_max_length", 0) < 10 ** 7:
            self.max_length = min(self.tokenizer.model_max_length, limit)
        else:
            self.max_length = limit
        self.prompts = dict(st.prompts)
        self.default_prompt_name = st.default_prompt_name
        self.vocab_size = config.vocab_size

    def prompt(self, name: str | None) -> str:
        name = name if name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise KeyError(f"unknown prompt_name {name!r}; this model's prompts: {known}")
        return self.prompts[name]

    def encode(self, texts: list[str], truncate: bool, prompt: str = "") -> list[list[int]]:
        """Token ids per text, with the tokenizer's special tokens; raises InputTooLongError."""
        if prompt:
            texts = [prompt + t for t in texts]
        if truncate:
            return self.tokenizer(texts, add_special_tokens=True, truncation=True,
                                  max_length=self.max_length)["input_ids"]
        # verbose=False: transformers would warn that an input over model_max_length "will result in indexing
        # errors"; check_lengths answers that with a 400 instead
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        self.check_lengths(ids)
        return ids

    def check_lengths(self, sequences: list[list[int]]) -> None:
        for i, s in enumerate(sequences):
            if len(s) > self.max_length:
                raise InputTooLongError(i, len(s), self.max_length)


def pack_batches(lengths: list[int], max_batch_tokens: int, max_batch_seqs: int) -> list[list[int]]:
    """Group sequence indices, in order, into batches of at most max_batch_tokens tokens and
    max_batch_seqs sequences. A sequence longer than the budget gets a batch of its own."""
    batches, current, tokens = [], [], 0
    for i, n in enumerate(lengths):
        if current and (tokens + n > max_batch_tokens or len(current) == max_batch_seqs):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        batches.append(current)
    return batches


def fit_batch_tokens(requested: int, free_bytes: float, bytes_per_token: float, headroom: float = 0.85) -> int:
    """The largest batch budget <= requested whose activations fit in headroom x the free memory."""
    if bytes_per_token <= 0:
        return requested
    return max(1, min(requested, int(free_bytes * headroom / bytes_per_token)))


class Engine:
    def __init__(self, args, show_progress: bool = True):
        self.args = args
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(args.num_threads or max(1, (os.cpu_count() or 1) // local_world))
        self.dist = init_distributed(args.tp, args.device, args.dist_backend, args.dist_timeout, args.dp)
        self.is_driver = self.dist.tp_rank == 0
        self.model_dir, self.model_name = resolve_model_path(args.model_path)
        self.config = ModelConfig.from_pretrained(self.model_dir, args.tp, args.trust_remote_code,
                                                  args.model_overrides, self.model_name)
        if args.chat_template is not None and self.config.family != "qwen2_vl":
            raise ConfigError(f"--chat-template {args.chat_template} applies to Qwen2-VL (GME) models; "
                              f"{self.model_name} takes no chat template (use prompt_name for instructions)")
        if args.pooling is not None and self.config.family == "clip":
            raise ConfigError(f"--pooling {args.pooling} does not apply to {self.model_name}: CLIP's towers pool "
                              "themselves (the text tower at its end-of-text token, the vision tower at its class "
                              "token) before their projections; leave --pooling out")
        self.device = self.dist.device
        self.dtype = resolve_dtype(args.dtype, self.device)
        t0 = time.perf_counter()
        self.model = build_model(self.config, self.dtype, self.device)
        if args.load_format == "dummy":
            self.load_stats = init_dummy_weights(self.model)
        else:
            self.load_stats = load_weights(self.model, self.model_dir, show_progress and self.is_driver)
        self.load_seconds = time.perf_counter() - t0
        # prepack_linears takes the float32 layers on the CPU only: elsewhere nothing is packed
        packed = args.cpu_matmul == "onednn" and onednn_available() and prepack_linears(self.model) > 0
        self.cpu_matmul = "onednn" if packed else "torch"
        self.attention_backend = self.choose_attention(args)
        self.max_batch_tokens = args.max_batch_tokens or (16384 if self.device.type == "cuda" else 8192)
        if self.device.type == "cuda":
            self.max_batch_tokens = self.fit_batch_to_memory(self.max_batch_tokens)
        self.max_batch_seqs = args.max_batch_seqs
        self.st = SentenceTransformersConfig.read(self.model_dir)
        decoder_like = self.config.family in ("decoder", "qwen2_vl")
        self.pooling = args.pooling or self.st.pooling or ("last" if decoder_like else "cls")
        has_st = os.path.isfile(os.path.join(self.model_dir, "modules.json"))
        self.normalize = args.normalize if args.normalize is not None else (self.st.normalize or not has_st)
        hf = self.config.hf_config
        self.matryoshka_dimensions = getattr(hf, "matryoshka_dimensions", None)
        self.is_matryoshka = bool(getattr(hf, "is_matryoshka", False))
        self.text = (TextProcessor(self.model_dir, self.config, self.st, args.context_length,
                                   args.trust_remote_code) if self.is_driver else None)
        if self.text is not None and self.text.max_length > self.max_batch_tokens:
            # an input must fit one batch: longer ones are refused (or truncated when asked), never looped on
            logger.warning("context length %d exceeds the batch budget of %d tokens; inputs are limited to %d",
                           self.text.max_length, self.max_batch_tokens, self.max_batch_tokens)
            self.text.max_length = self.max_batch_tokens
        # multimodal families bring a processor for images (None: text only)
        self.processor = build_processor(self) if self.is_driver else None

    def choose_attention(self, args) -> str:
        """--attention-backend, or "cpu_kernel" where --cpu-attention lets the compiled CPU kernel take it."""
        wanted = args.cpu_attention
        if (self.device.type != "cpu" or self.dtype != torch.float32 or args.attention_backend != "auto"
                or wanted == "torch"):
            return args.attention_backend
        error = load_cpu_attention()
        if error is None:
            return "cpu_kernel"
        if wanted == "kernel":
            raise ConfigError(f"--cpu-attention kernel: the CPU attention kernel could not be built: {error}")
        if self.is_driver:
            logger.warning("the CPU attention kernel could not be built (%s); attending with PyTorch's ops, "
                           "which are slower on short inputs (install a C++ compiler, or pass "
                           "--cpu-attention torch to silence this)", error)
        return args.attention_backend

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

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward_pooled(self, sequences: list[list[int]]) -> torch.Tensor:
        """Rank 0: one packed batch of token sequences -> pooled float32 [n, hidden] on CPU."""
        return self.forward_batch(Batch.from_token_ids(sequences))

    @torch.inference_mode()
    def forward_batch(self, batch: Batch) -> torch.Tensor:
        """Rank 0: send `batch` (built on the CPU) to the workers, run this rank's shard, and pool.

        Models that pool themselves (CLIP's towers end in their own pooling and projection) return
        one vector per item; the others return hidden states that `pool` reduces per sequence.
        """
        send_batch(batch)
        batch = batch.to(self.device)
        out = self.model(batch, self.attention_backend)
        if getattr(self.model, "pools_itself", False):
            return out.float().cpu()
        return pool(out, batch.cu_seqlens, self.pooling).cpu()

    def embed(self, sequences: list[list[int]], lanes: list | None = None,
              show_progress: bool = False) -> torch.Tensor:
        """Rank 0: pooled float32 [n, hidden] for any number of sequences, in their order.

        Sorting by length before packing keeps batches of similar lengths together (less attention
        padding on the SDPA path); results are put back in input order. `lanes` (`groups()`, with data
        parallelism) compute batches at once; the default is this engine's group alone.
        """
        return self.embed_by_length([len(s) for s in sequences],
                                    lambda idx, lane: lane.forward_pooled([sequences[i] for i in idx]),
                                    lanes, show_progress)

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
            for group in pack_batches([lengths[i] for i in order], self.max_batch_tokens, self.max_batch_seqs))
        out = torch.empty(len(lengths), self.hidden_size, dtype=torch.float32)
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
        `build_processor`). `text` is the calling thread's TextProcessor (default the engine's);
        `truncate` None follows --allow-auto-truncate. Raises ValueError naming a bad item."""
        if self.processor is None:
            raise ValueError(f"{self.model_name} takes text only")
        truncate = self.args.allow_auto_truncate if truncate is None else truncate
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
                self.model(batch.to(self.device), self.attention_backend)


class RemoteGroup:
    """Global rank 0's handle on data-parallel group g >= 1: the same calls as Engine's, carried out by
    that group's leader over their pair group. Only the engine thread that owns this handle uses it."""

    def __init__(self, engine: Engine, dp_rank: int):
        self.engine, self.dp_rank = engine, dp_rank
        self.group = engine.dist.leader_groups[dp_rank - 1]
        self.leader = dp_rank * engine.dist.tp_size
        self.max_batch_tokens, self.max_batch_seqs = engine.max_batch_tokens, engine.max_batch_seqs

    def forward_pooled(self, sequences: list[list[int]]) -> torch.Tensor:
        send_batch(Batch.from_token_ids(sequences), self.group, 0)
        return recv_pooled(len(sequences), self.engine.hidden_size, self.group, self.leader)

    def heartbeat(self) -> None:
        send_command(Cmd.NOOP, self.group, 0)

    def stop_workers(self) -> None:
        send_command(Cmd.STOP, self.group, 0)
