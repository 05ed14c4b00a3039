"""HellaSwag: reading the JSONL, the download, llm.c's rendering and the three accuracies, any tokenizer."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_corpus_text
from local_http import serve_directory
from torch import nn

from gptrain.errors import UserError
from gptrain.eval.hellaswag import Item, evaluate_hellaswag, hellaswag_file, read_items, run_hellaswag
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer import TokenizerConfig, build_tokenizer, parse_tokenizer
from gptrain.tokenizer.base import encode_lenient

ITEMS = [
    Item(ctx="The king rode into town. He", endings=("sang a song.", "ate bread.", "fell asleep.", "wept."), label=1),
    Item(ctx="A fool danced", endings=("on the table.", "with the queen.", "alone.", "badly."), label=0),
    Item(ctx="My lord, the news", endings=("is grave.", "from Rome is good.", "came late.", "is none."), label=3),
    Item(ctx="She opened the door", endings=("and left.", "slowly.", "to the garden.", "with a key."), label=2),
    Item(ctx="Thou art", endings=("the king.", "a fool.", "my heart.", "mine own."), label=0),
]


def write_jsonl(path, items: list[Item]) -> None:
    """items in the official format, with the fields the reader ignores."""
    lines = [json.dumps({"ind": i, "activity_label": "Test", "ctx_a": it.ctx, "ctx_b": "", "ctx": it.ctx,
                         "split": "val", "split_type": "indomain", "endings": list(it.endings), "label": it.label,
                         "source_id": f"test~{i}"}) for i, it in enumerate(items)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class TableModel(nn.Module):
    """A stand-in GPT whose loss for each target id is table[id], so every score is known in advance."""

    def __init__(self, table: dict[int, float], vocab_size: int, block_size: int, default: float = 9.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        self.table = torch.full((vocab_size,), default)
        for i, loss in table.items():
            self.table[i] = loss
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def forward(self, idx_BT, targets_BT, reduction="mean"):
        assert reduction == "none" and idx_BT.shape == targets_BT.shape
        assert idx_BT.size(1) <= self.config.block_size
        self.calls.append((idx_BT.clone(), targets_BT.clone(), self.training))
        return torch.where(targets_BT == -1, 0.0, self.table[targets_BT.clamp(min=0)])


def char_tokenizer(text: str):
    return build_tokenizer(TokenizerConfig(kind="char"), [text])


def tiny_gpt(vocab_size: int, block_size: int = 64) -> GPT:
    return GPT(ModelConfig(n_embd=32, n_layer=2, n_head=2, block_size=block_size, vocab_size=vocab_size,
                           vocab_multiple=1))


def test_three_accuracies_match_a_count_by_hand():
    # Per-target losses: " " 0, "a" 1, "z" 0.25, "€" 0.5 (3 UTF-8 bytes); context characters 9 (never scored).
    # ending    tokens (" "+e)  sum   mean        per byte
    # "a"         2             1     0.5         1/2
    # "zzzzzzzz"  9             2     2/9=0.222   2/9=0.222
    # "€€€€"      5             2     0.4         2/13=0.154
    # "aa"        3             2     0.667       2/3
    # so the sum picks ending 0, the mean ending 1, the loss per byte ending 2.
    tok = char_tokenizer(" az€xy")
    table = {tok.encode(c)[0]: loss for c, loss in ((" ", 0.0), ("a", 1.0), ("z", 0.25), ("€", 0.5))}
    model = TableModel(table, tok.vocab_size, block_size=32)
    endings = ("a", "z" * 8, "€€€€", "aa")
    labels = [0, 0, 1, 2, 2, 2, 3]
    items = [Item(ctx="xy" * (i + 1), endings=endings, label=label) for i, label in enumerate(labels)]
    model.train()
    result = evaluate_hellaswag(model, tok, items, "cpu", batch_size=3)
    assert result["hellaswag_acc"] == pytest.approx(2 / 7)  # labels equal to 0
    assert result["hellaswag_acc_norm"] == pytest.approx(1 / 7)  # label 1
    assert result["hellaswag_acc_norm_bytes"] == pytest.approx(3 / 7)  # label 2
    for name in ("acc", "acc_norm", "acc_norm_bytes"):
        assert result[f"hellaswag_{name}_scored"] == result[f"hellaswag_{name}"]
    assert result["hellaswag_num_items"] == 7 and result["hellaswag_num_unencodable"] == 0
    assert result["hellaswag_num_truncated_contexts"] == result["hellaswag_num_truncated_endings"] == 0
    assert len(model.calls) == 3 and not any(is_training for _, _, is_training in model.calls)
    assert model.training  # restored after scoring
    # The rows are llm.c's: context ids, then the ids of " " + ending; only the ending's ids are targets.
    idx_BT, targets_BT, _ = model.calls[0]
    row = tok.encode("xy" + " zzzzzzzz")
    assert idx_BT[1, : len(row) - 1].tolist() == row[:-1]
    assert targets_BT[1].tolist() == [-1] + row[2:] + [-1] * (idx_BT.size(1) - len(row) + 1)


def train_to_prefer(model: GPT, tok, texts: list[str], num_steps: int = 200) -> None:
    """Fit the model to the given texts (a few Adam steps on the whole batch)."""
    rows = [tok.encode(text) for text in texts]
    T = max(len(r) for r in rows) - 1
    x_BT = torch.zeros(len(rows), T, dtype=torch.long)
    y_BT = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        x_BT[b, : len(r) - 1], y_BT[b, : len(r) - 1] = torch.tensor(r[:-1]), torch.tensor(r[1:])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(num_steps):
        loss = model(x_BT, y_BT)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_a_model_trained_on_the_right_endings_picks_them():
    # Each item's wrong endings are the other items' right ones: only the context tells them apart.
    right = {"the king rode": "to the castle.", "a fool sang": "of the moon.", "my lord spoke": "with grace.",
             "the queen wept": "for her son."}
    ctxs, ends = list(right), list(right.values())
    items = [Item(ctx=ctx, endings=tuple(ends[(2 * i - j) % 4] for j in range(4)), label=i)
             for i, ctx in enumerate(ctxs)]
    assert [it.endings[it.label] for it in items] == ends
    tok = char_tokenizer("".join(f"{c} {e}" for c, e in right.items()))
    model = tiny_gpt(tok.vocab_size, block_size=32)
    train_to_prefer(model, tok, [f"{c} {e}" for c, e in right.items()])
    result = evaluate_hellaswag(model, tok, items, "cpu", batch_size=2)
    assert result["hellaswag_acc"] == result["hellaswag_acc_norm"] == result["hellaswag_acc_norm_bytes"] == 1.0
    wrong = [Item(ctx=it.ctx, endings=it.endings, label=(it.label + 1) % 4) for it in items]
    result = evaluate_hellaswag(model, tok, wrong, "cpu", batch_size=2)
    assert result["hellaswag_acc"] == result["hellaswag_acc_norm"] == result["hellaswag_acc_norm_bytes"] == 0.0


def reference_accuracies(model: GPT, tok, items: list[Item]) -> list[float]:
    """acc, acc_norm, acc_norm_bytes computed one ending at a time from logits, the way llm.c does."""
    correct = [0, 0, 0]
    for item in items:
        ctx = encode_lenient(tok, item.ctx)
        scores = []
        for ending in item.endings:
            row = ctx + encode_lenient(tok, " " + ending)
            with torch.no_grad():
                logits_TV = model(torch.tensor([row]))[0]
            loss_T = F.cross_entropy(logits_TV[:-1], torch.tensor(row[1:]), reduction="none")[len(ctx) - 1 :]
            total = loss_T.sum().item()
            scores.append((total, total / len(loss_T), total / len((" " + ending).encode("utf-8"))))
        for k in range(3):
            correct[k] += min(range(4), key=lambda e, k=k: scores[e][k]) == item.label
    return [c / len(items) for c in correct]


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_every_tokenizer_kind_scores_as_the_one_ending_at_a_time_reference(kind):
    corpus = make_corpus_text(200)
    tok = build_tokenizer(TokenizerConfig(kind=kind, vocab_size=300), [corpus])
    # Characters the corpus never has: the char tokenizer maps them to its unknown id and still scores.
    items = [*ITEMS, Item(ctx="Café owners", endings=("smile.", "naïvely wait.", "sing — loudly.", "weep."), label=1)]
    assert not set("éï—") & set(corpus)
    model = tiny_gpt(tok.vocab_size)
    result = evaluate_hellaswag(model, tok, items, "cpu", batch_size=4)
    assert result["hellaswag_num_items"] == len(items) and result["hellaswag_num_unencodable"] == 0
    expected = reference_accuracies(model, tok, items)
    got = [result[f"hellaswag_{name}"] for name in ("acc", "acc_norm", "acc_norm_bytes")]
    assert got == pytest.approx(expected)


def test_an_old_char_tokenizer_counts_items_it_cannot_encode_as_wrong():
    tok = parse_tokenizer(json.dumps({"gptrain_tokenizer": "char", "chars": list(" abcx")}))
    assert tok.unk_id is None
    model = TableModel({tok.encode(c)[0]: loss for c, loss in ((" ", 0.0), ("a", 0.0), ("b", 1.0))},
                       tok.vocab_size, block_size=16)
    endings = ("a", "bb", "bbb", "bbbb")  # ending 0 is best by every measure
    items = [Item(ctx="x", endings=endings, label=0), Item(ctx="xé", endings=endings, label=0),
             Item(ctx="c", endings=(*endings[:3], "é"), label=0), Item(ctx="xx", endings=endings, label=0)]
    result = evaluate_hellaswag(model, tok, items, "cpu")
    assert result["hellaswag_num_items"] == 4 and result["hellaswag_num_unencodable"] == 2
    for name in ("acc", "acc_norm", "acc_norm_bytes"):
        assert result[f"hellaswag_{name}"] == 0.5 and result[f"hellaswag_{name}_scored"] == 1.0
    result = evaluate_hellaswag(model, tok, items[1:3], "cpu")
    assert result["hellaswag_acc"] == 0.0 and math.isnan(result["hellaswag_acc_scored"])
    assert len(model.calls) == 2  # the second evaluation still ran its one forward, a dummy


def test_long_contexts_and_endings_are_cut_to_the_window_and_counted():
    block_size = 16
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .")
    long_ending = "abcdefghijklmnopqrstuvwxyz abc"  # 31 tokens with its space
    exact = "abcdefghijklmno"  # 16 tokens with its space: fits after a one-token context
    items = [Item(ctx="the long context " * 3, endings=("a.", "b.", "cc.", "d."), label=0),
             Item(ctx="ab", endings=("a.", long_ending, "b.", "c."), label=1),
             Item(ctx="x", endings=(exact, "a.", "b.", "c."), label=0)]
    model = TableModel({}, tok.vocab_size, block_size=block_size)
    result = evaluate_hellaswag(model, tok, items, "cpu", batch_size=3)
    # The long ending leaves no room for its item's context: that context counts as cut too.
    assert result["hellaswag_num_truncated_contexts"] == 2 and result["hellaswag_num_truncated_endings"] == 1
    (idx_BT, targets_BT, _), = model.calls
    assert idx_BT.size(1) == block_size
    scored = [[t for t in row if t != -1] for row in targets_BT.tolist()]
    assert scored[0] == tok.encode(" a.")  # the cut context still leaves every ending token scored
    assert scored[5] == tok.encode(" " + long_ending)[-block_size:]  # the long ending's last window-full
    assert scored[8] == tok.encode(" " + exact)
    result = evaluate_hellaswag(tiny_gpt(tok.vocab_size, block_size), tok, items, "cpu", batch_size=2)
    assert result["hellaswag_num_truncated_contexts"] == 2 and result["hellaswag_num_truncated_endings"] == 1
    assert 0.0 <= result["hellaswag_acc"] <= 1.0


def test_two_ranks_give_the_one_rank_result_with_equal_forwards():
    tok = char_tokenizer(make_corpus_text(50) + ",'.")
    model = tiny_gpt(tok.vocab_size)
    one = evaluate_hellaswag(model, tok, ITEMS, "cpu", batch_size=2)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    shares: dict[int, torch.Tensor] = {}

    def keep(rank):
        return lambda counts: shares.__setitem__(rank, counts.clone())

    def add_other(rank):
        return lambda counts: counts.add_(shares[1 - rank])  # what all_reduce(SUM) leaves on each rank

    for rank in (0, 1):
        forwards.clear()
        evaluate_hellaswag(model, tok, ITEMS, "cpu", batch_size=2, rank=rank, world_size=2, reduce_sum=keep(rank))
        assert len(forwards) == 2  # rank 0 has 3 items, rank 1 has 2 and a dummy forward: same collectives
    for rank in (0, 1):
        result = evaluate_hellaswag(model, tok, ITEMS, "cpu", batch_size=2, rank=rank, world_size=2,
                                    reduce_sum=add_other(rank))
        assert result == one


@pytest.mark.parametrize("bad", ['{"ctx": "a", "endings": ["1", "2", "3"], "label": 0}',
                                 '{"ctx": "a", "endings": ["1", "2", "3", "4"]}',
                                 '{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 4}',
                                 '{"ctx": 3, "endings": ["1", "2", "3", "4"], "label": 0}',
                                 "not json", "[1, 2]"])
def test_a_bad_line_names_the_file_and_line(tmp_path, bad):
    path = tmp_path / "hs.jsonl"
    write_jsonl(path, ITEMS[:2])
    path.write_text(path.read_text() + "\n" + bad + "\n")  # a blank line 3, then the bad line 4
    with pytest.raises(UserError, match=r"hs\.jsonl: line 4 is not a HellaSwag item"):
        read_items(path)
    assert len(read_items(path, limit=2)) == 2  # reading stops before it


def test_read_items_reads_the_official_format_and_rejects_empty_or_missing_files(tmp_path):
    path = tmp_path / "hs.jsonl"
    write_jsonl(path, ITEMS)
    assert read_items(path) == ITEMS and read_items(path, limit=3) == ITEMS[:3]
    path.write_text("\n")
    with pytest.raises(UserError, match="holds no HellaSwag items"):
        read_items(path)
    with pytest.raises(UserError, match="does not exist"):
        hellaswag_file(tmp_path / "missing.jsonl")
    assert hellaswag_file(path) == path


def test_download_is_cached_and_works_offline_afterwards(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    write_jsonl(served / "hellaswag_val.jsonl", ITEMS)
    (served / "bad.jsonl").write_text((served / "hellaswag_val.jsonl").read_text() + '{"ctx": "x"}\n')
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GPTRAIN_OFFLINE", raising=False)
    logs: list[str] = []
    with serve_directory(served) as base:
        monkeypatch.setenv("GPTRAIN_HELLASWAG_URL", f"{base}/hellaswag_val.jsonl")
        path = hellaswag_file(log=logs.append)
        monkeypatch.setenv("GPTRAIN_HELLASWAG_URL", f"{base}/bad.jsonl")
        with pytest.raises(UserError, match=r"bad\.jsonl: line 6 is not a HellaSwag item"):
            read_items(hellaswag_file(log=logs.append))
        monkeypatch.setenv("GPTRAIN_HELLASWAG_URL", f"{base}/hellaswag_val.jsonl")
    assert path.is_relative_to(tmp_path / "cache" / "hellaswag") and read_items(path) == ITEMS
    assert len(logs) == 2  # one "downloading" line per file
    monkeypatch.setenv("GPTRAIN_OFFLINE", "1")
    assert hellaswag_file(log=logs.append) == path and len(logs) == 2  # the server is gone: from the cache


def test_run_hellaswag_reads_the_file_and_evaluates(tmp_path):
    path = tmp_path / "hs.jsonl"
    write_jsonl(path, ITEMS)
    tok = char_tokenizer(make_corpus_text(50) + ",'.")
    model = tiny_gpt(tok.vocab_size)
    result = run_hellaswag(model, tok, "cpu", file=path, limit=3, batch_size=2, log=lambda _: None)
    assert result == evaluate_hellaswag(model, tok, ITEMS[:3], "cpu")
    assert result["hellaswag_num_items"] == 3
