"""gptrain's tokenizers as Hugging Face tokenizer files and back: GPT-2's vocab.json/merges.txt rebuilt from
the tiktoken ranks gptrain installs (no download), a trained BPE's own tokenizer.json, a character
tokenizer as a WordLevel model over single characters. transformers is never imported here."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from gptrain.errors import UserError
from gptrain.tokenizer.base import EOT_TEXT, Tokenizer
from gptrain.tokenizer.bpe import BPETokenizer
from gptrain.tokenizer.char import CharTokenizer
from gptrain.tokenizer.gpt2 import GPT2Tokenizer, gpt2_encoding

GPT2_VOCAB_SIZE = 50257
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
CHAR_UNKNOWN = "\ufffd"  # what gptrain's char tokenizer decodes its unknown id to


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (openai/gpt-2 encoder.py), the alphabet of vocab.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    stand_ins = printable + [256 + i for i in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, stand_ins, strict=True)}


def _spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _split_in_two(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token`: tiktoken's BPE run on its bytes with only lower ranks allowed."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = enumerate(zip(parts, parts[1:], strict=False))
        found = [(ranks[a + b], i) for i, (a, b) in pairs if ranks.get(a + b, limit) < limit]
        if not found:
            break
        i = min(found)[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"GPT-2 token {token!r} is not the merge of two tokens")
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def gpt2_vocab_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """GPT-2's vocab.json and merges.txt (50,000 merges, merge i making token 256 + i) from the ranks file."""
    ranks = gpt2_encoding()._mergeable_ranks  # the verified gpt2.tiktoken that gptrain installs
    vocab = {_spell(token): rank for token, rank in ranks.items()} | {EOT_TEXT: GPT2_VOCAB_SIZE - 1}
    by_rank = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    merges = tuple(tuple(map(_spell, _split_in_two(ranks, token))) for _, token in by_rank)
    return vocab, merges


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> HFTokenizer:
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, as tiktoken's
    hf.decoder = decoders.ByteLevel()
    if EOT_TEXT in vocab:
        hf.add_special_tokens([EOT_TEXT])
    return hf


def _char_word_level(tokenizer: CharTokenizer) -> HFTokenizer:
    """One piece per character (Split on any single code point), each looked up in a WordLevel vocabulary."""
    vocab = {c: i for i, c in enumerate(tokenizer.chars)} | {EOT_TEXT: tokenizer.eot_id}
    unknown = None
    if tokenizer.unk_id is not None:
        unknown = CHAR_UNKNOWN if CHAR_UNKNOWN not in vocab else "<|unk|>"
        vocab[unknown] = tokenizer.unk_id
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=unknown))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()  # no spaces between the pieces
    hf.add_special_tokens([EOT_TEXT])
    return hf


def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> str:
    """Hugging Face tokenizer files for tokenizer in folder (AutoTokenizer gives gptrain's ids); its description."""
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    settings = {"model_max_length": max_length, "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab, merges = gpt2_vocab_merges()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        hf, settings["tokenizer_class"] = _byte_level_bpe(vocab, list(merges)), "GPT2Tokenizer"
        description = "gpt2 (OpenAI's GPT-2 BPE, 50257 ids)"
    elif isinstance(tokenizer, BPETokenizer):
        hf, settings["tokenizer_class"] = HFTokenizer.from_str(tokenizer.to_json()), "PreTrainedTokenizerFast"
        description = f"{tokenizer.name} (a byte-level BPE trained by gptrain)"
    elif isinstance(tokenizer, CharTokenizer):
        hf, settings["tokenizer_class"] = _char_word_level(tokenizer), "PreTrainedTokenizerFast"
        special["unk_token"] = hf.id_to_token(tokenizer.unk_id) if tokenizer.unk_id is not None else EOT_TEXT
        description = f"{tokenizer.name} (one id per character, a WordLevel model in tokenizer.json)"
    else:
        raise UserError(f"the {tokenizer.name} tokenizer has no Hugging Face form that gptrain can write")
    (folder / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    config = settings | special
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False),
                                                    encoding="utf-8")
    return description


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if any(len(p) != 2 for p in pairs):
        raise UserError(f"{path} is not a merges.txt (every line should be two tokens)")
    return pairs


def _tokenizer_json_vocab_merges(spec: dict) -> tuple[dict[str, int], list[tuple[str, str]]] | None:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return dict(model.get("vocab", {})), merges


def is_gpt2(vocab: dict[str, int], merges: list[tuple[str, str]]) -> bool:
    """Whether vocab and merges are GPT-2's: the same 50257 ids, and merge i makes token 256 + i as in
    OpenAI's files (compared by what each merge makes, so a merges.txt that spells pairs differently passes)."""
    if len(merges) != GPT2_VOCAB_SIZE - 257 or vocab.get(EOT_TEXT, GPT2_VOCAB_SIZE - 1) != GPT2_VOCAB_SIZE - 1:
        return False  # decided without the ranks file, which another tokenizer's import does not need
    gpt2_vocab, gpt2_merges = gpt2_vocab_merges()
    if {k: v for k, v in vocab.items() if k != EOT_TEXT} != {k: v for k, v in gpt2_vocab.items() if k != EOT_TEXT}:
        return False
    return len(merges) == len(gpt2_merges) and all(vocab.get(a + b) == 256 + i for i, (a, b) in enumerate(merges))


def read_hf_tokenizer(folder: Path) -> Tokenizer | None:
    """gptrain's tokenizer for the Hugging Face tokenizer files in folder: GPT-2's are gptrain's gpt2 kind;
    another byte-level BPE with <|endoftext|> becomes a gptrain BPE; None when folder has no tokenizer files."""
    found = {name for name in TOKENIZER_FILES if (folder / name).is_file()}
    if not found:
        return None
    spec = _read_json(folder / "tokenizer.json") if "tokenizer.json" in found else None
    if {"vocab.json", "merges.txt"} <= found:
        vocab_merges = _read_json(folder / "vocab.json"), _read_merges(folder / "merges.txt")
    elif spec is not None:
        vocab_merges = _tokenizer_json_vocab_merges(spec)
    else:
        raise UserError(f"{folder} has {', '.join(sorted(found))} but not both vocab.json and merges.txt: "
                        "pass a gptrain tokenizer.json (--tokenizer) for this model")
    if vocab_merges is not None and is_gpt2(*vocab_merges):
        return GPT2Tokenizer()
    if spec is not None and (chars := char_tokenizer_of(spec)) is not None:
        return chars
    if spec is not None:
        return _bpe_from_tokenizer_json(folder / "tokenizer.json", spec)
    try:
        return BPETokenizer(_byte_level_bpe(*vocab_merges))
    except UserError as e:
        raise UserError(f"{folder}: {e}") from None


def char_tokenizer_of(spec: dict) -> CharTokenizer | None:
    """gptrain's character tokenizer back from the WordLevel tokenizer.json export_hf writes for one (ids:
    the characters, then <|endoftext|>, then the unknown id); None for any other tokenizer.json."""
    model = spec.get("model") or {}
    kinds = (model.get("type"), (spec.get("pre_tokenizer") or {}).get("type"), (spec.get("decoder") or {}).get("type"))
    vocab: dict[str, int] = model.get("vocab") or {}
    eot = vocab.get(EOT_TEXT)
    unknown = model.get("unk_token") if model.get("unk_token") in vocab else None  # tokenizers' default: "<unk>"
    if kinds != ("WordLevel", "Split", "Fuse") or eot is None or sorted(vocab.values()) != list(range(len(vocab))):
        return None
    chars = sorted(vocab, key=vocab.get)[:eot]
    is_unknown_last = unknown is None and len(vocab) == eot + 1 or vocab.get(unknown) == eot + 1 == len(vocab) - 1
    if not is_unknown_last or any(len(c) != 1 for c in chars):
        return None
    return CharTokenizer(chars, has_unknown=unknown is not None)


def _bpe_from_tokenizer_json(path: Path, spec: dict) -> Tokenizer:
    """A gptrain BPE holding this tokenizer.json when it is a byte-level BPE (every text has ids) with
    <|endoftext|>; a UserError saying which part does not fit otherwise."""
    kind = (spec.get("model") or {}).get("type")
    decoder = (spec.get("decoder") or {}).get("type")
    if kind != "BPE" or decoder != "ByteLevel":
        raise UserError(f"{path} is a {kind} tokenizer with a {decoder} decoder; gptrain holds byte-level BPE "
                        "tokenizers only: pass a gptrain tokenizer.json (--tokenizer) for this model")
    try:
        return BPETokenizer(HFTokenizer.from_file(str(path)))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # the Rust side raises a plain Exception for a file it cannot read
        raise UserError(f"{path} is not a tokenizer.json that Hugging Face tokenizers can read ({e})") from None
