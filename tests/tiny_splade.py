"""Tiny RANDOM SPLADE checkpoints, built locally, saved as sentence-transformers saves a SparseEncoder.

`make_splade_bert(path)` and `make_splade_distilbert(path)` write what naver/splade-* and OpenSearch's neural
sparse encoders ship:

    config.json + model.safetensors   BertForMaskedLM (keys `bert.*`, `cls.predictions.*`) or
                                      DistilBertForMaskedLM (`distilbert.*`, `vocab_transform`, `vocab_layer_norm`,
                                      `vocab_projector`): hidden 64, 4 heads, 2 layers, weights ~ N(0, 0.2) as
                                      tiny_models' (`_randomize`); tied decoders are not saved (transformers
                                      leaves them out), an untied one is, with its own bias
    tokenizer.json, tokenizer_config.json
                                      tiny_models' uncased WordPiece (450 entries, [PAD]=0 [CLS]=2 [SEP]=3)
    modules.json, 1_SpladePooling/config.json, sentence_bert_config.json, config_sentence_transformers.json
                                      SparseEncoder.save of MLMTransformer + SpladePooling(pooling_strategy,
                                      activation_function)

The vocabulary (450 for BERT, tiny_models' 501 for DistilBERT) is not a multiple of 4, so tp 4 pads it (and
tp 2 pads 501). The decoder's bias is shifted by `bias_shift` (default -3): most logits are then negative and
relu makes most of each vector exactly zero, as in a real SPLADE model (here 77-97% of it). An untied
BERT decoder's bias differs from the unused `cls.predictions.bias` (shifted, the second not), so a loader that
read the wrong one would give far denser vectors.
"""

import os

import torch

import tiny_models as tm

VOCAB_SIZE = 450  # the tokenizer's; 4 does not divide it
BIAS_SHIFT = -3.0


def make_splade_bert(path: str, seed: int = 0, *, tie_word_embeddings: bool = True, pooling_strategy: str = "max",
                     activation_function: str = "relu", vocab_size: int = VOCAB_SIZE,
                     bias_shift: float = BIAS_SHIFT, std: float = tm.DEFAULT_STD) -> str:
    """naver/splade style: BertForMaskedLM + SpladePooling. Returns `path`."""
    from transformers import BertForMaskedLM

    config = tm.bert_config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=tm.MAX_SEQ_LENGTH,
                            tie_word_embeddings=tie_word_embeddings)
    model = BertForMaskedLM(config).eval()
    tm._randomize(model, seed, std)
    with torch.no_grad():
        model.cls.predictions.decoder.bias.add_(bias_shift)  # the same tensor as cls.predictions.bias when tied
    return _save_sparse_encoder(model, path, pooling_strategy, activation_function)


def make_splade_distilbert(path: str, seed: int = 0, *, pooling_strategy: str = "max",
                           activation_function: str = "relu", vocab_size: int = tm.ENCODER_VOCAB_SIZE,
                           bias_shift: float = BIAS_SHIFT, std: float = tm.DEFAULT_STD) -> str:
    """OpenSearch style: DistilBertForMaskedLM (tied vocab_projector) + SpladePooling. Returns `path`."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    config = DistilBertConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                              max_position_embeddings=tm.MAX_SEQ_LENGTH, activation="gelu", pad_token_id=0,
                              dtype="float32")
    model = DistilBertForMaskedLM(config).eval()
    tm._randomize(model, seed, std)
    with torch.no_grad():
        model.vocab_projector.bias.add_(bias_shift)
    return _save_sparse_encoder(model, path, pooling_strategy, activation_function)


def _save_sparse_encoder(model, path: str, pooling_strategy: str, activation_function: str) -> str:
    """The masked LM saved with transformers, then wrapped and saved by sentence-transformers as a SparseEncoder
    of MLMTransformer + SpladePooling (its module files written over the same directory)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    transformers_dir = path + ".transformers"
    tm._save(model, tm.build_bert_tokenizer(model_max_length=tm.MAX_SEQ_LENGTH), transformers_dir)
    mlm = MLMTransformer(transformers_dir, max_seq_length=tm.MAX_SEQ_LENGTH)
    pooling = SpladePooling(pooling_strategy=pooling_strategy, activation_function=activation_function)
    SparseEncoder(modules=[mlm, pooling], device="cpu").save(path)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    return path


def sparse_encode(path: str, texts: list[str]):
    """`SparseEncoder(path).encode(texts)` as a dense float32 numpy array [len(texts), vocab_size]."""
    import numpy as np
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(path, device="cpu", local_files_only=True)
    out = model.encode(list(texts), convert_to_sparse_tensor=True, show_progress_bar=False)
    return np.asarray(out.to_dense(), dtype=np.float32)
