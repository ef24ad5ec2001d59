"""CLIP's tokenizer from a Stable Diffusion directory's `tokenizer/` folder (vocab.json,
merges.txt, tokenizer_config.json), built with the `tokenizers` library exactly as
transformers builds its `CLIPTokenizer` (NFC, whitespace runs to one space, lower case; CLIP's
word regex, byte-level symbols; BPE with the `</w>` end-of-word suffix; start and end tokens
around every prompt; the special tokens matched first), without transformers or torch.

Prompts are truncated to `model_max_length` (77) tokens, the end token kept, and padded with
the folder's padding token (SD 1.x: the end token; SD 2.x: "!"), as the pipelines call it.
"""

import json
import os
from collections.abc import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ddpm.errors import UserError

FILES = ("vocab.json", "merges.txt")
# CLIP's pre-tokenization (transformers' CLIPTokenizer): special tokens, contractions, runs of
# letters, single digits, runs of other non-space characters.
_WORDS = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+"""
)
_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "model_max_length": 77,
}


def _token(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else value


class ClipTokenizer:
    """`ClipTokenizer(folder)(prompts)` -> token ids [N, max_length] int32."""

    def __init__(self, folder: str):
        for name in FILES:
            if not os.path.isfile(os.path.join(folder, name)):
                raise UserError(
                    f"{folder}: no {name}; a Stable Diffusion tokenizer folder holds "
                    f"{' and '.join(FILES)} (and tokenizer_config.json)"
                )
        settings = dict(_DEFAULTS)
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path) as f:
                    saved = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"{config_path}: unreadable ({e})") from None
            settings.update({k: saved[k] for k in _DEFAULTS if saved.get(k) is not None})
        bos, eos, unk, pad = (
            _token(settings[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        )
        self.max_length = int(settings["model_max_length"])
        if not 2 < self.max_length <= 1024:  # a "no limit" sentinel (1e30) is not a CLIP length
            raise UserError(f"{config_path}: model_max_length={self.max_length} (CLIP: 77)")
        try:
            bpe = BPE.from_file(
                os.path.join(folder, FILES[0]),
                os.path.join(folder, FILES[1]),
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=unk,
            )
        except Exception as e:  # the library's own message names what it could not parse
            raise UserError(f"{folder}: vocab.json / merges.txt do not load ({e})") from None
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        ids = {}
        for name, token in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)):
            ids[name] = tok.token_to_id(token)
            if ids[name] is None:
                raise UserError(f"{folder}: {name} {token!r} is not in vocab.json")
        # As transformers does, the special tokens are matched in the text before anything else:
        # SD 2's padding token "!" makes every "!" of a prompt that token, without "</w>".
        tok.add_special_tokens(list(dict.fromkeys((bos, eos, unk, pad))))
        tok.post_processor = processors.RobertaProcessing(
            (eos, ids["eos_token"]), (bos, ids["bos_token"]), trim_offsets=False
        )
        tok.enable_truncation(self.max_length)
        tok.enable_padding(length=self.max_length, pad_id=ids["pad_token"], pad_token=pad)
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self.vocab_size = tok.get_vocab_size()
        self._tokenizer = tok

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids of `prompts`, each [start, ..., end, pad...] of `max_length`: [N, L]."""
        encodings = self._tokenizer.encode_batch(list(prompts))
        return np.asarray([e.ids for e in encodings], np.int32).reshape(-1, self.max_length)
