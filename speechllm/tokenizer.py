"""Qwen2.5 tokenizer (byte-level BPE from a Hugging Face tokenizer.json) plus our speech tokens.

Token ids equal transformers' Qwen2TokenizerFast: no BOS/EOS is ever added (Qwen has no BOS), and
added tokens such as <|im_start|> are matched in raw text before BPE. On top of the stock vocabulary
we add <audio> (where audio embeddings are spliced in) and the three turn-taking tags as special
tokens. `tokenizers` appends them after the highest id in use: 151665.. for Qwen2.5 (whose 151936
embedding rows leave 271 spare), 403.. for the test fixture; a token already present keeps its id.

Chat format is ChatML, "<|im_start|>{role}\n{content}<|im_end|>\n" per message, with no default
system turn (Qwen's template inserts one; we do not).
"""
import io
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .weights import ConversionError, read_json, write_bytes, write_json

AUDIO = "<audio>"
TAGS = ("<COMPLETE>", "<INCOMPLETE>", "<BACKCHANNEL>")
SPEECH_TOKENS = (AUDIO, *TAGS)


def format_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """[{"role": "user", "content": "..."}, ...] -> ChatML text, ending with an open assistant
    turn when add_generation_prompt."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _content(token) -> str | None:
    # tokenizer_config.json stores special tokens as a string or as {"content": ..., ...}.
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str = "<|endoftext|>",
                 pad_token: str | None = None, extra_special_tokens=SPEECH_TOKENS):
        self.tokenizer = tokenizer
        tokenizer.add_special_tokens(list(extra_special_tokens))  # no-op for tokens already there
        self.eos_token = eos_token
        self.pad_token = pad_token or eos_token
        for token in (eos_token, self.pad_token, "<|im_start|>", "<|im_end|>"):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"token {token!r} is not in the vocabulary")

    @classmethod
    def from_pretrained(cls, path, extra_special_tokens=SPEECH_TOKENS) -> "Tokenizer":
        """Read dir/tokenizer.json, and eos/pad tokens from dir/tokenizer_config.json if present."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        config = {}
        if (path / "tokenizer_config.json").is_file():
            config = read_json(path / "tokenizer_config.json")
        eos = _content(config.get("eos_token")) or "<|endoftext|>"
        try:
            tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for any broken file
            raise ConversionError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        try:
            return cls(tok, eos, _content(config.get("pad_token")), extra_special_tokens)
        except ValueError as e:  # a vocabulary without Qwen's chat tokens
            raise ConversionError(f"{path / 'tokenizer.json'}: {e}") from None

    def save_pretrained(self, path):
        """Write tokenizer.json (with the added tokens and their ids) and a tokenizer_config.json
        naming the eos and pad tokens."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_bytes(path / "tokenizer.json", self.tokenizer.to_str(pretty=True).encode())
        config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "add_bos_token": False,
                  "eos_token": self.eos_token, "pad_token": self.pad_token}
        write_json(path / "tokenizer_config.json", config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Like transformers, special tokens are kept by default (so tags stay visible)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(format_chat(messages, add_generation_prompt))

    def token_to_id(self, token: str) -> int:
        id_ = self.tokenizer.token_to_id(token)
        if id_ is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return id_

    def __len__(self) -> int:
        """Number of ids in use, i.e. highest id + 1 (ids can have gaps)."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def im_end_id(self) -> int:
        return self.token_to_id("<|im_end|>")

    @property
    def eos_ids(self) -> list[int]:
        """The configured eos token and <|im_end|> (the end of a chat turn)."""
        return sorted({self.token_to_id(self.eos_token), self.im_end_id})

    @property
    def pad_id(self) -> int:
        return self.token_to_id(self.pad_token)


def fit_embeddings(model, tokenizer: Tokenizer) -> int:
    """Make the model's embedding (and head) cover every token id; return the row count.

    Spare rows are used first: Qwen2.5 has 151936 rows for 151665 tokens, so the speech tokens land
    on existing rows 151665.. and nothing is resized (those rows keep whatever the checkpoint holds;
    a fine-tuned checkpoint has trained them). Only when an id falls past the last row does the
    matrix grow, new rows starting at the mean row (Qwen2ForCausalLM.grow_vocab). Never shrinks,
    unlike transformers' resize_token_embeddings(len(tokenizer))."""
    model.grow_vocab(len(tokenizer))
    return model.config.vocab_size


def train_tokenizer(texts, vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with Qwen's special tokens (<|endoftext|>, <|im_start|>,
    <|im_end|>) and ours: for small models trained from scratch, such as the synthetic-speech demo."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


def train_sentencepiece(texts, vocab_size: int) -> bytes:
    """A SentencePiece unigram model over `texts`, as bytes (a CTC head's pieces, for models trained
    from scratch): no BOS/EOS, unk 0, as NeMo's ASR tokenizers; fewer pieces than vocab_size when
    the texts hold fewer."""
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()
