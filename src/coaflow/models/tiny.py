"""Build the ``tiny`` student: a Qwen3-architecture model from a config, with a byte-level BPE
tokenizer trained on the run's own corpus, saved as a normal HF folder.

No hub download is possible on the machines this runs on, and a model that learns in minutes on
two CPU cores has to be small; its tokenizer is trained on the very trajectories it will imitate,
so tags, tool names and JSON punctuation become single tokens and sequences stay short.

A model this small learns to *copy* (a name from the question into a search, a value from a page
into the answer, a number into a program) only when the copy is token for token. Byte-level BPE
breaks that three ways, which ``copy_friendly`` pre-tokenization removes: a name after a space
(`` Vekmer`` in prose) and after a quote (``"Vekmer`` in a JSON argument) are different tokens, so
the space before a capitalized word or a digit is split off as its own token; numbers merge
unevenly (`` 3,737,160`` -> `` 3`` ``,`` ``73`` ``7``...), so a number is cut into groups of three
digits from the right, each one token (``3`` ``,`` ``737`` ``,`` ``160``; ``3737160`` -> ``3``
``737`` ``160``; all 1,110 groups are in the vocabulary); and the team's role tags
(``<answer>``...) are single added tokens, like Qwen3's ``<think>``.

Why groups, not single digits: a small model copies by induction (find where the current token
occurred before, emit what followed it). Ten digit tokens repeat inside every long number, so
"what followed the last 8" is ambiguous and the copy derails; a group token rarely repeats within
a number, and a name is one token already.

    build_tiny("work/base", corpus_texts, TinyModel())
    AutoModelForCausalLM.from_pretrained("work/base"); AutoTokenizer.from_pretrained("work/base")
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from coaflow.models.prompt import END_OF_TURN as EOS_TOKEN
from coaflow.models.template import CHAT_TEMPLATE
from coaflow.schema.markup import (
    ANSWER,
    PLAN,
    REFLECTION,
    THINK,
    TOOL_CALL,
    TOOL_RESPONSE,
    span,
)
from coaflow.section import Section

# The tokens the chat template writes, each one id in a tiny tokenizer (ids 0.. in this order); a
# pretrained tokenizer brings its own (SmolLM2's spells the tags out in several tokens).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  *span(TOOL_CALL), *span(TOOL_RESPONSE), *span(THINK)]
PAD_TOKEN = "<|endoftext|>"

# Qwen3 treats im_start/im_end/endoftext as special (dropped by skip_special_tokens) and the
# tool/think tags as plain added tokens (kept in decoded text, so tool calls stay parseable).
CONTROL_TOKENS = SPECIAL_TOKENS[:3]
TAG_TOKENS = SPECIAL_TOKENS[3:]
# The team's role tags (coaflow.schema.markup): one token each, kept in decoded text.
ROLE_TAGS = [*span(PLAN), *span(REFLECTION), *span(ANSWER)]
# The space before an uppercase letter or a digit becomes its own token (see the module docstring).
COPY_SPLIT = r" (?=[A-Z0-9])"
# A run of digits cut into groups of three from the right: 3737160 -> 3 | 737 | 160.
DIGIT_GROUPS = r"\d{1,3}(?=(?:\d{3})*(?!\d))"
BUILD_INFO = "coaflow_tiny.json"


class TinyModel(Section):
    """Sizes of the tiny Qwen3 student (used when ``sft.model`` is ``tiny``)."""

    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary trained on the corpus "
                            "(special tokens come on top)")
    hidden_size: int = Field(128, ge=16, description="model width")
    intermediate_size: int = Field(384, ge=16, description="MLP width")
    num_hidden_layers: int = Field(2, ge=1, description="transformer blocks")
    num_attention_heads: int = Field(4, ge=1, description="query heads")
    num_key_value_heads: int = Field(2, ge=1, description="key/value heads (GQA)")
    head_dim: int = Field(32, ge=8, description="width of one attention head")
    max_position_embeddings: int = Field(4096, ge=128, description="longest sequence the RoPE "
                                         "tables cover")
    tie_word_embeddings: bool = Field(True, description="share input and output embeddings "
                                      "(most of a tiny model's weights are the embeddings)")
    copy_friendly: bool = Field(True, description="numbers cut into groups of three digits from "
                                "the right, the space before a capitalized word or a number as "
                                "its own token and role tags as single tokens, so copied names "
                                "and numbers are the same tokens everywhere")


def train_tokenizer(corpus: Iterable[str], vocab_size: int, copy_friendly: bool = False):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` with Qwen3's special
    tokens and coaflow's chat template; ``copy_friendly``: see the module docstring."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(COPY_SPLIT), behavior="isolated"),
        pre_tokenizers.Split(Regex(DIGIT_GROUPS), behavior="isolated"),
        byte_level]) if copy_friendly else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=list(CONTROL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    if copy_friendly:
        tok = _with_digit_groups(tok)
    tags = TAG_TOKENS + (ROLE_TAGS if copy_friendly else [])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 bos_token=None, unk_token=None, model_max_length=1 << 20,
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _with_digit_groups(tok):
    """``tok`` (a trained BPE) with every digit group of one to three digits a single token:
    the merges BPE learned between digits are replaced by a complete set (a+b for two digits,
    ab+c and a+bc for three), so every group, seen in the corpus or not, encodes the same way."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    model = spec["model"]
    vocab = model["vocab"]

    def pair(m):
        return m.split(" ") if isinstance(m, str) else m

    model["merges"] = [m for m in model["merges"] if not "".join(pair(m)).isdigit()]
    digits = [str(d) for d in range(10)]
    # every two-digit merge ranks before every three-digit one, and a three-digit group has a
    # merge from either half (BPE may pair "ab" or "bc" first, depending on the digits)
    new = [[a, b] for a in digits for b in digits] + \
        [m for a in digits for b in digits for c in digits for m in ([a + b, c], [a, b + c])]
    for a, b in new:
        if a + b not in vocab:  # new ids after the learned ones
            vocab[a + b] = len(vocab)
    model["merges"] += new
    return Tokenizer.from_str(json.dumps(spec))


def tiny_config(cfg: TinyModel, tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=10000.0,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN), bos_token_id=None,
    )


def build_tiny(out_dir: str | Path, corpus: Iterable[str], cfg: TinyModel, seed: int = 0) -> Path:
    """Train the tokenizer on ``corpus``, initialise a Qwen3 model of ``cfg``'s sizes, save both
    to ``out_dir`` (written to a temporary folder and renamed, so a killed build leaves nothing
    that looks whole). Returns ``out_dir``."""
    import shutil

    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    out = Path(out_dir)
    texts = [t for t in corpus if t]
    if not texts:
        raise ValueError("build_tiny: the corpus is empty; the tokenizer needs text to learn from")
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.copy_friendly)
    config = tiny_config(cfg, tokenizer)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    eos = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[1],
                                               do_sample=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / BUILD_INFO).write_text(json.dumps({
        "built_by": "coaflow.models.build_tiny", "seed": seed, "corpus_texts": len(texts),
        "parameters": sum(p.numel() for p in model.parameters()), **cfg.model_dump()}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
