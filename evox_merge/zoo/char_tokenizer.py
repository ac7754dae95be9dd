"""A real `PreTrainedTokenizerFast` over a small character vocabulary, for the test fixture and the offline zoo."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
DEFAULT_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?+-*/=()[]<>'\"_#|\n"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, padding_side: str = "right",
                         append_eos: bool = False) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer: one token per character of `alphabet`, plus pad/bos/eos/unk.

    `append_eos`: text encoded with special tokens ends with EOS, as T5's tokenizer does (the ``t5`` zoo preset:
    the encoder then sees where its input ends).

    The vocabulary order is fixed by `alphabet`, so the same alphabet always gives the same token ids.
    """
    characters = list(dict.fromkeys(alphabet))
    vocab = {token: index for index, token in enumerate([PAD, BOS, EOS, UNK] + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    if append_eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side=padding_side,
    )
