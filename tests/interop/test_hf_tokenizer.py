"""gptrain tokenizers as Hugging Face tokenizer files and back (no transformers needed here)."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gptrain.errors import UserError
from gptrain.interop.hf_tokenizer import gpt2_vocab_merges, read_hf_tokenizer, write_hf_tokenizer
from gptrain.tokenizer import TokenizerConfig, build_tokenizer
from gptrain.tokenizer.char import CharTokenizer


def test_gpt2_files_rebuilt_from_the_ranks_are_openais():
    vocab, merges = gpt2_vocab_merges()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and len(merges) == 50000
    # Known entries of OpenAI's encoder.json and the first and last lines of its vocab.bpe.
    assert (vocab["!"], vocab["Ġ"], vocab["Ġthe"]) == (0, 220, 262)
    assert merges[:7] == (("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"), ("Ġt", "he"))
    assert merges[-1] == ("Ġg", "azed")
    assert all(vocab[a + b] == 256 + i for i, (a, b) in enumerate(merges))


def test_gpt2_is_recognised_from_either_file_set(tmp_path):
    gpt2 = build_tokenizer(TokenizerConfig(kind="gpt2"))
    write_hf_tokenizer(gpt2, tmp_path, 1024)
    assert read_hf_tokenizer(tmp_path).name == "gpt2"
    (tmp_path / "vocab.json").unlink()  # tokenizer.json alone
    assert read_hf_tokenizer(tmp_path).name == "gpt2"


def test_a_byte_level_bpe_without_the_separator_or_not_byte_level_is_refused(tmp_path):
    texts = ["the king and the queen"] * 20
    bpe = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=270), texts)
    spec = json.loads(bpe.to_json())
    spec["added_tokens"] = []
    vocab = spec["model"]["vocab"]
    vocab.pop("<|endoftext|>")
    spec["model"]["vocab"] = {token: i for i, token in enumerate(sorted(vocab, key=vocab.get))}  # ids 0..N-1
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="no <\\|endoftext\\|> token"):
        read_hf_tokenizer(tmp_path)
    word_piece = HFTokenizer(models.WordPiece({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    word_piece.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tokenizer.json").write_text(word_piece.to_str())
    with pytest.raises(UserError, match="WordPiece tokenizer.*byte-level BPE tokenizers only.*--tokenizer"):
        read_hf_tokenizer(tmp_path)


def test_no_tokenizer_files_is_none_and_half_a_pair_is_refused(tmp_path):
    assert read_hf_tokenizer(tmp_path) is None
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(UserError, match="not both vocab.json and merges.txt"):
        read_hf_tokenizer(tmp_path)


@pytest.mark.parametrize("has_unknown", [True, False])
def test_a_character_tokenizer_comes_back_as_itself(tmp_path, has_unknown):
    chars = CharTokenizer(list("abc \n\ufffd"), has_unknown=has_unknown)  # "\ufffd" in the alphabet: another unk name
    write_hf_tokenizer(chars, tmp_path, 16)
    back = read_hf_tokenizer(tmp_path)
    assert isinstance(back, CharTokenizer) and back.to_json() == chars.to_json()
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode("ab c\n\ufffd", add_special_tokens=False).ids == chars.encode("ab c\n\ufffd")
    if has_unknown:
        assert hf.encode("z").ids == [chars.unk_id]
