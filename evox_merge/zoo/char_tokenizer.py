"""A real `PreTrainedTokenizerFast` over a small character vocabulary, for the test fixture and the offline zoo."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
DEFAULT_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?+-*/=()[]<>'\"_#|\n"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer: one token per character of `alphabet`, plus pad/bos/eos/unk.

    The vocabulary order is fixed by `alphabet`, so the same alphabet always gives the same token ids.
    """
    characters = list(dict.fromkeys(alphabet))
    vocab = {token: index for index, token in enumerate([PAD, BOS, EOS, UNK] + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side=padding_side,
    )
