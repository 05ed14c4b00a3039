"""Named model sizes (DESIGN.md §5). A preset is a set of dotted config values; flags still override."""

from __future__ import annotations

from dataclasses import dataclass

from gptrain.errors import UserError


@dataclass(frozen=True)
class Preset:
    n_embd: int
    n_layer: int
    n_head: int
    block_size: int
    vocab: int | str  # an int: a BPE of that size trained on the corpus; "gpt2": GPT-2's tokenizer
    origin: str

    def values(self) -> dict[str, object]:
        values: dict[str, object] = {
            "model.n_embd": self.n_embd,
            "model.n_layer": self.n_layer,
            "model.n_head": self.n_head,
            "model.block_size": self.block_size,
        }
        if self.vocab == "gpt2":
            values["tokenizer.kind"] = "gpt2"
        else:
            values |= {"tokenizer.kind": "bpe", "tokenizer.vocab_size": self.vocab}
        return values


_FESTE = "feste (a Rust GPT-2 trainer)"
_BLOG = "feste's blog"
PRESETS: dict[str, Preset] = {
    "tiny": Preset(128, 2, 2, 256, "gpt2", "a Rust/Burn GPT-2 trainer's 'tiny' (~13M with its untied head)"),
    "small": Preset(256, 4, 4, 256, "gpt2", "the same trainer's 'small' (~26M)"),
    "feste-tiny": Preset(64, 2, 1, 64, 512, f"{_FESTE}, Shakespeare example 05 (~50K)"),
    "feste-small": Preset(128, 3, 1, 128, 1024, f"{_FESTE}, example 06 (~200K)"),
    "feste-medium": Preset(256, 4, 4, 256, 1536, f"{_FESTE}, example 07 (~4M)"),
    "feste-gpt2": Preset(768, 12, 12, 512, 20534, f"{_FESTE}, example 08 (~163M untied)"),
    "pocket-bard": Preset(256, 6, 8, 448, 8192, f"{_BLOG} (~9M); 8 heads, as 12 do not divide 256"),
    "cyclops": Preset(64, 2, 1, 64, 8192, f"{_BLOG}: one head"),
    "spider": Preset(64, 2, 8, 64, 8192, f"{_BLOG}: many heads"),
    "wide": Preset(256, 4, 4, 1024, 8192, f"{_BLOG}: wide"),
    "narrow": Preset(128, 6, 1, 1024, 8192, f"{_BLOG}: narrow"),
    "short-context": Preset(256, 4, 4, 128, 8192, f"{_BLOG}: short context"),
    "long-context": Preset(256, 4, 4, 1024, 8192, f"{_BLOG}: long context"),
    "tinystories": Preset(256, 6, 8, 448, 8192, f"{_BLOG}: pre-train on TinyStories, fine-tune on Shakespeare"),
    "gpt2": Preset(768, 12, 12, 1024, "gpt2", "OpenAI GPT-2 124M; llm.c d12"),
    "gpt2-medium": Preset(1024, 24, 16, 1024, "gpt2", "OpenAI GPT-2 350M; llm.c d24"),
    "gpt2-large": Preset(1280, 36, 20, 1024, "gpt2", "OpenAI GPT-2 774M; llm.c d36"),
    "gpt2-xl": Preset(1600, 48, 25, 1024, "gpt2", "OpenAI GPT-2 1558M; llm.c d48"),
}
ALIASES = {"d12": "gpt2", "d24": "gpt2-medium", "d36": "gpt2-large", "d48": "gpt2-xl"}


def get_preset(name: str) -> Preset:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        known = ", ".join([*PRESETS, *ALIASES])
        raise UserError(f"unknown preset {name!r}: choose one of {known} (see `gptrain presets`)")
    return PRESETS[key]
