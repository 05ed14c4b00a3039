import json

import pytest
from local_http import serve_directory  # tests/ is on sys.path: conftest.py lives there

from gptrain.errors import UserError
from gptrain.tokenizer import TokenizerConfig, build_tokenizer, gpt2_assets, load_tokenizer, parse_tokenizer
from gptrain.tokenizer.base import EOT_TEXT, encode_lenient, save_tokenizer

TEXT = "KING.\nWhat news from Rome? Thou art the king of all that doth lie before thee.\n"


def test_gpt2_known_ids():
    tok = build_tokenizer(TokenizerConfig(kind="gpt2"))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.decode([15496, 995, 50256]) == "Hello world" + EOT_TEXT


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_round_trip_and_save_load(kind, tmp_path):
    cfg = TokenizerConfig(kind=kind, vocab_size=300)
    tok = build_tokenizer(cfg, [TEXT * 20, "Ünïcödé ünïcode — ✓\n" * 5])
    for text in [TEXT, "Ünïcödé ✓"]:
        assert tok.decode(tok.encode(text)) == text
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.vocab_size == tok.vocab_size and again.eot_id == tok.eot_id
    assert tok.encode_batch([TEXT, "king"]) == [tok.encode(TEXT), tok.encode("king")]


def test_bpe_learns_merges_and_respects_vocab_size():
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), [TEXT * 50])
    assert tok.vocab_size <= 300
    assert len(tok.encode(TEXT)) < len(TEXT.encode()) / 2  # merges, not bytes


def test_char_tokenizer_rejects_unknown_characters_but_scores_them_as_unknown():
    tok = build_tokenizer(TokenizerConfig(kind="char"), ["abc"])
    assert tok.vocab_size == 5 and tok.eot_id == 3 and tok.unk_id == 4  # the unknown id is the last
    with pytest.raises(UserError, match="not in this character"):
        tok.encode("abz")  # a prompt with an unseen character is still a clear error
    assert encode_lenient(tok, "abz") == [0, 1, 4]


def test_old_char_tokenizer_without_unknown_id_loads_as_it_was():
    old = parse_tokenizer(json.dumps({"gptrain_tokenizer": "char", "chars": ["a", "b"]}))
    assert old.vocab_size == 3 and old.unk_id is None
    assert encode_lenient(old, "ab") == [0, 1] and encode_lenient(old, "az") is None


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_byte_lengths_count_the_utf8_bytes_of_the_text(kind):
    text = "Ünïcödé — ✓ the king\n"
    tok = build_tokenizer(TokenizerConfig(kind=kind, vocab_size=300), [text * 30])
    lengths = tok.byte_lengths()
    assert len(lengths) == tok.vocab_size and lengths[tok.eot_id] == 0
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_bad_tokenizer_configs():
    with pytest.raises(UserError):
        TokenizerConfig(kind="wordpiece")
    with pytest.raises(UserError):
        TokenizerConfig(kind="bpe", vocab_size=100)


def test_gpt2_encoding_download_from_local_server(tmp_path, monkeypatch):
    """The real download path, served from 127.0.0.1: verified by SHA-256, cached atomically."""
    served = tmp_path / "served"
    served.mkdir()
    good = gpt2_assets.encoding_path(should_download=False).read_bytes()
    (served / "r50k_base.tiktoken").write_bytes(good)
    (served / "corrupt.tiktoken").write_bytes(good[:-10])
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    with serve_directory(served) as base:
        with pytest.raises(UserError, match="wrong SHA-256"):
            gpt2_assets.download(f"{base}/corrupt.tiktoken")
        assert not (tmp_path / "cache" / "gpt2.tiktoken").exists()
        with pytest.raises(UserError, match="could not download"):
            gpt2_assets.download(f"{base}/missing.tiktoken")
        monkeypatch.setenv("GPTRAIN_GPT2_URL", f"{base}/r50k_base.tiktoken")
        path = gpt2_assets.encoding_path()
        assert path == tmp_path / "cache" / "gpt2.tiktoken" and path.read_bytes() == good
