"""`gptrain export` and `gptrain import`: models to and from Hugging Face transformers, llm.c and nanoGPT
(the formats live in gptrain/interop/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptrain.errors import UserError

EXPORT_FORMATS = ("hf", "llmc")
IMPORT_FORMATS = ("hf", "llmc", "nanogpt")


def add_interop_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint for Hugging Face transformers (hf) or llm.c (llmc)",
                       description="hf: a folder transformers.GPT2LMHeadModel.from_pretrained and "
                       "AutoTokenizer.from_pretrained load without gptrain (safetensors, config.json, "
                       "tokenizer files, a model card). llmc: llm.c's model file (gpt2_124M.bin layout) and "
                       "tokenizer file. See docs/interop.md.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT", help="a checkpoint folder or a run directory")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, metavar="DIR", help="hf: a folder that does not exist yet (or is empty); "
                   "llmc: the folder for gpt2_124M.bin (or _bf16.bin) and gpt2_tokenizer.bin, files of those names "
                   "replaced")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="llmc only: version 3 (fp32, what llm.c's CPU trainer reads) or 5 (bf16)")
    p = sub.add_parser("import", help="make a gptrain checkpoint from a Hugging Face, llm.c or nanoGPT model",
                       description="hf: a local folder or a Hub name (safetensors only, through huggingface_hub: "
                       "its cache, HF_HUB_OFFLINE and HF_ENDPOINT apply). llmc: llm.c's model .bin (version 3 or "
                       "5). nanogpt: nanoGPT's ckpt.pt (read with weights_only=True). `--init-from` and "
                       "`generate --checkpoint` take an hf folder or Hub name directly.")
    p.add_argument("--format", required=True, choices=IMPORT_FORMATS)
    p.add_argument("--from", dest="source", required=True, metavar="PATH_OR_NAME")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint folder to write")
    p.add_argument("--tokenizer", metavar="FILE", help="a gptrain tokenizer.json, for models without a usable "
                   "tokenizer of their own (needed unless the vocabulary is GPT-2's)")
    p.add_argument("--llmc-tokenizer", metavar="FILE", help="llmc only: llm.c's tokenizer .bin")


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.format == "hf":
        if args.dtype != "fp32":
            raise UserError("--dtype applies to --format llmc only (hf exports are fp32)")
        from gptrain.interop.hf import export_hf

        written = [export_hf(args.checkpoint, out)]
    else:
        from gptrain.interop.llmc import export_llmc

        written = list(export_llmc(args.checkpoint, out, dtype=args.dtype))
    print("exported: " + ", ".join(str(p) for p in written))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.llmc_tokenizer and args.format != "llmc":
        raise UserError("--llmc-tokenizer applies to --format llmc only")
    if args.format == "hf":
        from gptrain.interop.hf import import_hf

        folder = import_hf(args.source, out, tokenizer=args.tokenizer)
    elif args.format == "llmc":
        from gptrain.interop.llmc import import_llmc

        if args.tokenizer and args.llmc_tokenizer:
            raise UserError("give --tokenizer or --llmc-tokenizer, not both")
        tokenizer_file = args.llmc_tokenizer or args.tokenizer
        folder = import_llmc(Path(args.source), out, Path(tokenizer_file) if tokenizer_file else None)
    else:
        from gptrain.interop.nanogpt import import_nanogpt

        folder = import_nanogpt(Path(args.source), out, tokenizer=args.tokenizer)
    print(f"imported: {folder} (fine-tune it with: gptrain train --init-from {folder} --data ...)")
    return 0


INTEROP_COMMANDS = {"export": cmd_export, "import": cmd_import}
