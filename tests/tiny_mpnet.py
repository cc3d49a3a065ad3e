"""A tiny RANDOM MPNet sentence-transformers checkpoint, built locally: all-mpnet-base-v2 in miniature.

`make_mpnet(path)` writes what sentence-transformers/all-mpnet-base-v2 ships:

    config.json + model.safetensors   MPNetModel: hidden 64, 4 heads, 2 layers, 32 relative-position buckets,
                                      vocabulary 501 (4 does not divide it), max_seq_length + 2 positions
                                      (they start after padding_idx 1); weights ~ N(0, 0.2) as tiny_models'
    tokenizer.json, tokenizer_config.json
                                      MPNetTokenizer: uncased WordPiece, `<s> a </s>`, <s>=0 <pad>=1 </s>=2
                                      <unk>=3, <mask> last; vocabulary built as tiny_models' BERT one
    modules.json, 1_Pooling (mean), 2_Normalize, sentence_bert_config.json, config_sentence_transformers.json

`with_prefix=True` writes the MPNetForMaskedLM layout instead: keys prefixed `mpnet.`, plus `lm_head.*`
tensors the embedder ignores, and "architectures": ["MPNetForMaskedLM"].
"""

import torch

import tiny_models as tm

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def build_mpnet_tokenizer(vocab_size: int = 450, model_max_length: int = tm.MAX_SEQ_LENGTH):
    """MPNetTokenizer over a WordPiece vocabulary built directly (specials, every character of tiny_models'
    corpus word-initial and "##", the most frequent words, then <mask>), so it is the same in every process."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import MPNetTokenizer

    counts = tm._word_counts(normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True),
                             pre_tokenizers.BertPreTokenizer())
    chars = sorted({c for w in counts for c in w})
    vocab = SPECIALS + chars + ["##" + c for c in chars]
    vocab += tm._top_words(counts, set(vocab), vocab_size - 1 - len(vocab)) + ["<mask>"]
    tokenizer = MPNetTokenizer(vocab={t: i for i, t in enumerate(vocab)}, unk_token="<unk>",
                               model_max_length=model_max_length)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2, 3]
    return tokenizer


def make_mpnet(
    path: str,
    seed: int = 0,
    *,
    with_prefix: bool = False,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = tm.ENCODER_VOCAB_SIZE,
    max_seq_length: int = tm.MAX_SEQ_LENGTH,
    std: float = tm.DEFAULT_STD,
    bias_std: float = 1.0,
) -> str:
    """all-mpnet-base-v2 style: MPNetModel (with its unused pooler), mean pooling + Normalize. Returns `path`.

    The relative position bias is drawn with `bias_std` (larger than the other weights' std) so that it moves
    the vectors well past the tests' bound: a server that dropped it would fail them."""
    from transformers import MPNetConfig, MPNetModel

    tokenizer = build_mpnet_tokenizer(model_max_length=max_seq_length)
    config = MPNetConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_seq_length + 2, hidden_act="gelu", layer_norm_eps=1e-5,
                         relative_attention_num_buckets=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         dtype="float32")
    torch.manual_seed(seed)
    model = MPNetModel(config).eval()
    tm._randomize(model, seed, std)
    with torch.no_grad():
        model.encoder.relative_attention_bias.weight.mul_(bias_std / std)
    tm._save(model, tokenizer, path)
    if with_prefix:
        extra = tm.mlm_head_tensors("lm_head.", "dense.", "layer_norm.", vocab_size, hidden_size, seed + 1, std)
        tm._prefix_checkpoint(path, "mpnet.", extra, ["MPNetForMaskedLM"])
    tm._write_st_files(path, hidden_size, "mean", max_seq_length, None, normalize=True)
    return path
