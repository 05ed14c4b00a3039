"""llm.c's model and tokenizer files, both ways: train_gpt2.py's write_model / write_tokenizer layout, as
train_gpt2.c's gpt2_build_from_checkpoint and tokenizer_init read it (versions 3 fp32 and 5 bf16).

Dims: L layers, C width, H heads, V vocab, Vp padded vocab (llm.c: a multiple of 128), maxT context.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import gptrain
from gptrain.errors import UserError
from gptrain.files import atomic_path, write_atomic
from gptrain.interop import write_model_folder
from gptrain.model.gpt import ModelConfig
from gptrain.tokenizer import EOT_TEXT, Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from gptrain.api import Checkpoint

MODEL_MAGIC, TOKENIZER_MAGIC = 20240326, 20240328
VERSIONS = {"fp32": 3, "bf16": 5}  # 3: fp32, padded vocab; 5: bf16 (layernorms too), padded vocab
TOKENIZER_VERSION = 2  # 1 -> 2: the header holds the EOT id
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
VOCAB_MULTIPLE = 128  # train_gpt2.py's pad_vocab
# The names llm.c's trainers open by default (train_gpt2.c: gpt2_124M.bin; train_gpt2.cu: -e gpt2_124M_bf16.bin),
# whatever the model's size.
MODEL_FILES = {"fp32": "gpt2_124M.bin", "bf16": "gpt2_124M_bf16.bin"}
TOKENIZER_FILE = "gpt2_tokenizer.bin"
LLMC_CPU_T = 64  # train_gpt2.c's fixed sequence length (B=4, T=64), not checked against maxT there
UNKNOWN_TEXT = "\ufffd"  # what a character tokenizer's unknown id decodes to
OTHER_MAGICS = {TOKENIZER_MAGIC: "an llm.c tokenizer file", 20240327: "an llm.c debug state file (write_state)",
                20240520: "a token shard", 20240801: "a token shard"}
# One block's tensors in file order (each stacked over the L layers): llm.c's name, gptrain's name in
# block N, shape in multiples of C. llm.c stores weights as nn.Linear does (out x in), like gptrain.
BLOCK_TENSORS = [
    ("ln1w", "ln_1.weight", (1,)), ("ln1b", "ln_1.bias", (1,)),
    ("qkvw", "attn.c_attn.weight", (3, 1)), ("qkvb", "attn.c_attn.bias", (3,)),
    ("attprojw", "attn.c_proj.weight", (1, 1)), ("attprojb", "attn.c_proj.bias", (1,)),
    ("ln2w", "ln_2.weight", (1,)), ("ln2b", "ln_2.bias", (1,)),
    ("fcw", "mlp.c_fc.weight", (4, 1)), ("fcb", "mlp.c_fc.bias", (4,)),
    ("fcprojw", "mlp.c_proj.weight", (1, 4)), ("fcprojb", "mlp.c_proj.bias", (1,)),
]


@dataclass(frozen=True)
class LlmcHeader:
    version: int
    max_seq_len: int
    vocab_size: int
    num_layers: int
    num_heads: int
    channels: int
    padded_vocab_size: int

    @property
    def dtype(self) -> str:
        return "fp32" if self.version == VERSIONS["fp32"] else "bf16"

    def words(self) -> np.ndarray:
        header = np.zeros(HEADER_WORDS, dtype="<i4")
        header[:8] = [MODEL_MAGIC, self.version, self.max_seq_len, self.vocab_size, self.num_layers,
                      self.num_heads, self.channels, self.padded_vocab_size]
        return header


def tensor_layout(h: LlmcHeader) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the file in order, in gptrain's names and shapes (per-layer tensors one by one)."""
    C, L = h.channels, h.num_layers
    layout = [("transformer.wte.weight", (h.padded_vocab_size, C)), ("transformer.wpe.weight", (h.max_seq_len, C))]
    for _, name, mult in BLOCK_TENSORS:
        layout += [(f"transformer.h.{i}.{name}", tuple(m * C for m in mult)) for i in range(L)]
    return layout + [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]


def _num_values(h: LlmcHeader) -> int:
    return sum(int(np.prod(shape)) for _, shape in tensor_layout(h))


# ---------------------------------------------------------------------------------------------- export

def export_llmc(checkpoint: str | Path | Checkpoint, out_dir: Path, dtype: str = "fp32") -> tuple[Path, Path]:
    """Write a gptrain checkpoint (a folder, run directory or api.Checkpoint) as llm.c's model file
    (gpt2_124M.bin, or gpt2_124M_bf16.bin) and tokenizer file (gpt2_tokenizer.bin) in out_dir, plus a
    `<model>.gptrain.json` saying where they came from. Returns (model file, tokenizer file)."""
    from gptrain.api import Checkpoint

    if dtype not in VERSIONS:
        raise UserError(f"llm.c model files hold fp32 or bf16 weights (got dtype {dtype!r})")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint, device="cpu")
    cfg = ckpt.model.config
    if not cfg.tie_weights:
        raise UserError(f"{ckpt.path}: the model has its own output head (model.tie_weights=false); llm.c's "
                        "GPT-2 always ties it to the token embedding, so it cannot hold this model")
    token_bytes = tokenizer_token_bytes(ckpt.tokenizer)  # refused before anything is written
    V = ckpt.tokenizer.vocab_size
    header = LlmcHeader(VERSIONS[dtype], cfg.block_size, V, cfg.n_layer, cfg.n_head, cfg.n_embd,
                        (V + VOCAB_MULTIPLE - 1) // VOCAB_MULTIPLE * VOCAB_MULTIPLE)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, tokenizer_path = out_dir / MODEL_FILES[dtype], out_dir / TOKENIZER_FILE
    with atomic_path(model_path) as tmp, open(tmp, "wb") as f:
        f.write(header.words().tobytes())
        for t in llmc_tensors(ckpt.model.state_dict(), header):
            f.write(_to_bytes(t, dtype))
    write_atomic(tokenizer_path, tokenizer_file_bytes(token_bytes, ckpt.tokenizer.eot_id))
    notes = [f"vocab rows padded with zeros from {V} to {header.padded_vocab_size}"]
    if not cfg.bias:
        notes.append("the model has no biases (model.bias=false); llm.c always has them: written as zeros")
    if dtype == "bf16":
        notes.append("weights rounded to bfloat16 (round to nearest even)")
    if cfg.block_size < LLMC_CPU_T:
        notes.append(f"context {cfg.block_size} < {LLMC_CPU_T}, train_gpt2.c's fixed T (it would read past the "
                     "position table): use train_gpt2.cu with -t at most the context")
    config, state = ckpt.config, ckpt.state
    provenance = {"gptrain_version": gptrain.__version__, "checkpoint": str(Path(ckpt.path).resolve()),
                  "run": config.name, "run_dir": config.run_dir, "step": ckpt.step, "data": config.data.source,
                  "dataset_dir": state.get("dataset_dir"), "tokenizer": ckpt.tokenizer.name,
                  "model_file": model_path.name, "version": header.version, "dtype": dtype,
                  "tokenizer_file": tokenizer_path.name, "vocab_size": V,
                  "padded_vocab_size": header.padded_vocab_size, "notes": notes}
    write_atomic(model_path.with_suffix(".gptrain.json"), json.dumps(provenance, indent=1, default=str) + "\n")
    return model_path, tokenizer_path


def llmc_tensors(state_dict: dict[str, torch.Tensor], h: LlmcHeader) -> list[torch.Tensor]:
    """gptrain's tensors in llm.c's file order: real vocab rows then zero rows up to Vp; missing biases as zeros."""
    out = []
    for name, shape in tensor_layout(h):
        if name == "transformer.wte.weight":
            wte = state_dict[name][: h.vocab_size]
            out.append(torch.cat([wte, wte.new_zeros(h.padded_vocab_size - h.vocab_size, h.channels)]))
        else:
            out.append(state_dict[name] if name in state_dict else torch.zeros(shape))
    return out


def _to_bytes(t: torch.Tensor, dtype: str) -> bytes:
    t = t.detach().cpu().contiguous()
    if dtype == "fp32":
        return t.to(torch.float32).numpy().astype("<f4", copy=False).tobytes()
    # numpy has no bfloat16: the bits go out as int16 (train_gpt2.py's write_bf16 does the same)
    return t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


def tokenizer_token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each id stands for, as llm.c's tokenizer file stores them (from tokenizer.json alone)."""
    spec = json.loads(tokenizer.to_json())
    kind = spec.get("gptrain_tokenizer")
    if kind == "gpt2":
        from gptrain.tokenizer.gpt2 import gpt2_encoding

        enc = gpt2_encoding()
        tokens = [enc.decode_single_token_bytes(i) for i in range(tokenizer.vocab_size)]
    elif kind == "char":
        extra = [EOT_TEXT] + ([UNKNOWN_TEXT] if spec.get("unknown") else [])
        tokens = [c.encode("utf-8") for c in list(spec["chars"]) + extra]
    else:
        tokens = _byte_level_tokens(spec, tokenizer.vocab_size)
    for i, b in enumerate(tokens):
        if not 0 < len(b) < 256:
            raise UserError(f"token {i} of the tokenizer is {len(b)} bytes long: llm.c's tokenizer file holds "
                            "tokens of 1 to 255 bytes")
    return tokens


def _byte_level_tokens(spec: dict, vocab_size: int) -> list[bytes]:
    decoder = spec.get("decoder") or {}
    model = spec.get("model") or {}
    if decoder.get("type") != "ByteLevel" or model.get("type") != "BPE":
        raise UserError("the tokenizer is not a byte-level BPE: llm.c's tokenizer file needs each token's bytes, "
                        "which only gpt2, char and byte-level BPE tokenizers define")
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    tokens: list[bytes | None] = [None] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = bytes(to_byte[c] for c in text) if all(c in to_byte for c in text) else None
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"].encode("utf-8")
    missing = [i for i, b in enumerate(tokens) if b is None]
    if missing:
        raise UserError(f"the tokenizer has no byte-level token for id {missing[0]}: llm.c's tokenizer file "
                        "needs the bytes of every id")
    return tokens  # type: ignore[return-value]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table, the alphabet byte-level BPE vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tokenizer_file_bytes(tokens: list[bytes], eot_id: int) -> bytes:
    """llm.c's tokenizer file: a 256-word header (magic, version 2, count, EOT id), then length-prefixed tokens."""
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:4] = [TOKENIZER_MAGIC, TOKENIZER_VERSION, len(tokens), eot_id]
    return header.tobytes() + b"".join(struct.pack("<B", len(b)) + b for b in tokens)


# ---------------------------------------------------------------------------------------------- import

def import_llmc(model_file: Path, out: Path, tokenizer_file: Path | None = None) -> Path:
    """A gptrain checkpoint folder at out from an llm.c model file (version 3 fp32 or 5 bf16, widened to
    fp32). The tokenizer: an llm.c tokenizer file or a gptrain tokenizer.json, else GPT-2's when V is 50257."""
    model_file = Path(model_file)
    header = read_header(model_file)
    weights = read_weights(model_file, header)
    tokenizer, tokenizer_source = _resolve_tokenizer(tokenizer_file, header, model_file)
    model_cfg = ModelConfig(n_embd=header.channels, n_layer=header.num_layers, n_head=header.num_heads,
                            block_size=header.max_seq_len, vocab_size=header.vocab_size, bias=True)
    provenance = {"format": "llm.c", "file": str(model_file.resolve()), "version": header.version,
                  "dtype": header.dtype, "padded_vocab_size": header.padded_vocab_size, "tokenizer": tokenizer_source}
    if header.dtype == "bf16":
        provenance["note"] = "bf16 weights widened to fp32"
    return write_model_folder(out, model_cfg, weights, tokenizer, provenance)


def read_header(path: Path) -> LlmcHeader:
    """The model file's header, checked: magic, version, sizes, and a file length that fits them."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"llm.c model file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder: give the llm.c model .bin file") from None
    if len(raw) < HEADER_BYTES:
        raise UserError(f"{path} is {len(raw)} bytes: too short for an llm.c model file's {HEADER_BYTES}-byte header")
    words = np.frombuffer(raw, dtype="<i4")
    magic, version = int(words[0]), int(words[1])
    if magic != MODEL_MAGIC:
        what = OTHER_MAGICS.get(magic, "not an llm.c model file")
        raise UserError(f"{path} is {what} (magic {magic}; an llm.c model file has {MODEL_MAGIC})")
    if version not in VERSIONS.values():
        raise UserError(f"{path} is an llm.c model file of version {version}: gptrain reads versions 3 (fp32) "
                        "and 5 (bf16), which train_gpt2.py and train_gpt2.cu write")
    h = LlmcHeader(version, *(int(w) for w in words[2:8]))
    fields = {"maxT": h.max_seq_len, "V": h.vocab_size, "L": h.num_layers, "H": h.num_heads, "C": h.channels,
              "Vp": h.padded_vocab_size}
    described = ", ".join(f"{k}={v}" for k, v in fields.items())
    if min(fields.values()) < 1 or h.channels % h.num_heads or h.vocab_size > h.padded_vocab_size:
        raise UserError(f"{path} has an impossible llm.c header ({described})")
    expected = HEADER_BYTES + _num_values(h) * (4 if h.dtype == "fp32" else 2)
    if size < expected:
        raise UserError(f"{path} is truncated: {size:,} bytes, but its header ({described}, {h.dtype}) needs "
                        f"{expected:,}")
    if size > expected:
        raise UserError(f"{path} has {size - expected:,} bytes more than its header ({described}, {h.dtype}) "
                        "describes: not an llm.c model file of this layout")
    return h


def read_weights(path: Path, h: LlmcHeader) -> dict[str, torch.Tensor]:
    """Every tensor of the file in gptrain's names, as fp32 (bf16 widened exactly)."""
    count = _num_values(h)
    if h.dtype == "fp32":
        values = np.fromfile(path, dtype="<f4", count=count, offset=HEADER_BYTES)
        flat = torch.from_numpy(values.astype(np.float32, copy=False))
    else:
        bits = np.fromfile(path, dtype="<i2", count=count, offset=HEADER_BYTES).astype(np.int16, copy=False)
        flat = torch.from_numpy(bits).view(torch.bfloat16).to(torch.float32)
    weights, start = {}, 0
    for name, shape in tensor_layout(h):
        n = int(np.prod(shape))
        weights[name] = flat[start : start + n].view(shape)
        start += n
    return weights


def _resolve_tokenizer(tokenizer_file: Path | None, h: LlmcHeader, model_file: Path) -> tuple[Tokenizer, str]:
    if tokenizer_file is None:
        if h.vocab_size != 50257:
            raise UserError(f"{model_file} has a vocabulary of {h.vocab_size} tokens, not GPT-2's 50257: pass "
                            "--tokenizer (its llm.c tokenizer .bin, or the gptrain tokenizer.json it was trained with)")
        from gptrain.tokenizer.gpt2 import GPT2Tokenizer

        tokenizer, source = GPT2Tokenizer(), "gpt2 (vocabulary of 50257)"
    elif _is_llmc_tokenizer(Path(tokenizer_file)):
        tokenizer, source = tokenizer_from_llmc(Path(tokenizer_file)), f"llm.c tokenizer {tokenizer_file}"
    else:
        tokenizer, source = load_tokenizer(tokenizer_file), str(tokenizer_file)
    if tokenizer.vocab_size != h.vocab_size:
        raise UserError(f"the tokenizer ({source}) has {tokenizer.vocab_size} ids but {model_file} has a "
                        f"vocabulary of {h.vocab_size}: pass the tokenizer the model was trained with")
    return tokenizer, source


def _is_llmc_tokenizer(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == struct.pack("<i", TOKENIZER_MAGIC)
    except OSError as e:
        raise UserError(f"cannot read tokenizer file {path} ({e.strerror})") from None


def read_llmc_tokenizer(path: Path) -> tuple[list[bytes], int]:
    """The tokens (bytes) and EOT id of an llm.c tokenizer file (version 1: GPT-2's, EOT 50256; version 2)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read llm.c tokenizer file {path} ({e.strerror})") from None
    if len(data) < HEADER_BYTES:
        raise UserError(f"{path} is too short for an llm.c tokenizer file's {HEADER_BYTES}-byte header")
    magic, version, count, eot = (int(w) for w in np.frombuffer(data[:16], dtype="<i4"))
    if magic != TOKENIZER_MAGIC or version not in (1, 2):
        raise UserError(f"{path} is not an llm.c tokenizer file of version 1 or 2 (magic {magic}, version {version})")
    eot = 50256 if version == 1 else eot
    tokens, pos = [], HEADER_BYTES
    for i in range(count):
        length = data[pos] if pos < len(data) else 0
        if pos + 1 + length > len(data) or length == 0:
            raise UserError(f"{path} is truncated or damaged at token {i} of {count}")
        tokens.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length
    if pos != len(data):
        raise UserError(f"{path} is damaged: {len(data) - pos} bytes after its last token")
    if not 0 <= eot < count:
        raise UserError(f"{path} is damaged: its EOT id {eot} is not among its {count} tokens")
    return tokens, eot


def tokenizer_from_llmc(path: Path) -> Tokenizer:
    """The gptrain tokenizer an llm.c tokenizer file stands for: GPT-2's exact tokens, or a character
    tokenizer (one character per id, then <|endoftext|>, then an optional unknown id). A file holds no
    merge rules, so any other BPE cannot be rebuilt from it."""
    tokens, eot = read_llmc_tokenizer(path)
    if len(tokens) == 50257 and eot == 50256:
        from gptrain.tokenizer.gpt2 import GPT2Tokenizer, gpt2_encoding

        enc = gpt2_encoding()
        if all(enc.decode_single_token_bytes(i) == b for i, b in enumerate(tokens)):
            return GPT2Tokenizer()
    from gptrain.tokenizer.char import CharTokenizer

    chars, tail = [_one_char(b) for b in tokens[:eot]], tokens[eot + 1 :]
    if (None not in chars and len(set(chars)) == len(chars) and tokens[eot] == EOT_TEXT.encode()
            and tail in ([], [UNKNOWN_TEXT.encode()])):
        return CharTokenizer(chars, has_unknown=bool(tail))  # type: ignore[arg-type]
    raise UserError(f"{path} holds {len(tokens)} tokens that are neither GPT-2's nor one character each; llm.c's "
                    "tokenizer file has no merge rules to rebuild a BPE from: pass --tokenizer with the gptrain "
                    "tokenizer.json the model was trained with")


def _one_char(b: bytes) -> str | None:
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(text) == 1 else None
