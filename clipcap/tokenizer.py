"""The caption tokenizer: a `tokenizers` JSON file carried inside every bundle.

Real models start from their GPT-2's tokenizer (its folder, via transformers); the bundle then
keeps its `tokenizer.json` so loading is offline and needs only the small `tokenizers` package.
"""
from __future__ import annotations

from pathlib import Path

from clipcap.config import BundleError

STOP_TEXT = "."  # the paper's stop token: a caption ends at its first full stop
INCOMPLETE = "\ufffd"  # what decoding makes of an incomplete UTF-8 sequence
MAX_CHARACTER_BYTES = 4  # the longest UTF-8 character


class CaptionTokenizer:
    def __init__(self, tokenizer, eos_token: str = "<|endoftext|>"):
        self._tok = tokenizer
        self.eos_token = eos_token

    @classmethod
    def from_file(cls, path: str | Path) -> "CaptionTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: tokenizer file not found")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(f"{path}: not a valid tokenizers JSON file ({error})") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CaptionTokenizer":
        """A model folder's own tokenizer (tokenizer.json, or GPT-2's vocab.json + merges.txt), via
        transformers, never from the hub (hub names resolve to a folder first: clipcap.hub)."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(hf.backend_tokenizer, eos_token=hf.eos_token or "<|endoftext|>")

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise BundleError(f"tokenizer has no token {token!r}")
        return token_id

    @property
    def eos_token_id(self) -> int:
        return self.token_id(self.eos_token)

    def stop_token_ids(self) -> list[int]:
        """'.' as in the paper, and end-of-text, which captions are trained to end with."""
        return [self.token_id(STOP_TEXT), self.eos_token_id]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        """The caption text. Byte-level BPE splits multi-byte UTF-8 characters (Vietnamese "ữ" is 3 bytes)
        across tokens, so a caption cut at the token limit can end inside one: the tokens holding that
        incomplete tail (at most 3) are dropped instead of decoding to U+FFFD."""
        end = len(token_ids)
        text = self._tok.decode(token_ids, skip_special_tokens=True)
        while text.endswith(INCOMPLETE) and len(token_ids) - end < MAX_CHARACTER_BYTES - 1:
            end -= 1
            text = self._tok.decode(token_ids[:end], skip_special_tokens=True)
        return text.strip()


def train_bpe(texts: list[str], vocab_size: int = 512, eos_token: str = "<|endoftext|>") -> CaptionTokenizer:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`: for small custom domains."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return CaptionTokenizer(tokenizer, eos_token=eos_token)
