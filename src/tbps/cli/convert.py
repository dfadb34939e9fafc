"""`tbps convert`: a released model (IRRA, RDE, TBPS-CLIP) or stock CLIP weights as a tbps checkpoint."""

from __future__ import annotations

import argparse

# format -> (where its authors publish it, what their inference does); written out here to keep torch
# out of `tbps --help` (the readers are tbps.models.convert.formats.READERS)
FORMATS: dict[str, tuple[str, str]] = {
    "irra": (
        "IRRA (CVPR'23), github.com/anosorae/IRRA: a best.pth per dataset (linked from its README)",
        "CLIP ViT-B/16 (QuickGELU) at 384x128; image: projected CLS token; caption: projected end-of-text "
        "token; the raw caption into CLIP's BPE tokenizer (no punctuation stripping, no word limit), 77 "
        "tokens; resize to 384x128 bicubic, CLIP mean/std; its ID classifier and MLM modules are dropped",
    ),
    "rde": (
        "RDE (CVPR'24), github.com/QinYang79/RDE: checkpoints on Hugging Face (links in its README)",
        "IRRA's encoders plus token-selection embeddings (TSE): a pair scores the mean of the global cosine "
        "and the TSE cosine (the 30% most attended tokens of the last layer through a small MLP, "
        "max-pooled); stored as one vector [global, TSE] / sqrt(2); preprocessing as IRRA",
    ),
    "tbps-clip": (
        "TBPS-CLIP (AAAI'24), github.com/Flame-Chasers/TBPS-CLIP: the files its main.py saves "
        "({'model': state_dict}; the README version read here links no trained weights)",
        "its own CLIP ViT-B/16 at 224x224; projected CLS / end-of-text tokens; captions lower-cased, "
        ".!\"()*#:;~ replaced by spaces, cut to 77 words; resize bicubic, ImageNet mean/std",
    ),
    "openai": (
        "OpenAI CLIP: ViT-B-16.pt, ViT-B-32.pt, RN50.pt, ... (URLs in github.com/openai/CLIP, clip/clip.py)",
        "zero-shot CLIP from the TorchScript archive (its tensors read without running it) or a state dict; "
        "resize the short side bicubic then centre-crop, CLIP mean/std, the raw caption into CLIP's BPE",
    ),
    "open_clip": (
        "open_clip (github.com/mlfoundations/open_clip): SRC is a pretrained tag (open_clip downloads it; "
        "needs internet) or a local weights file in open_clip's layout; --arch names the architecture",
        "zero-shot CLIP: open_clip's model, eval transform (mean/std, interpolation, resize mode) and "
        "tokenizer of that architecture/tag",
    ),
}


def _formats_help() -> str:
    import textwrap

    lines = ["formats:"]
    for name, (where, what) in FORMATS.items():
        lines.append(f"  {name}")
        for label, text in (("published", where), ("inference", what)):
            lines += textwrap.wrap(f"{label}: {text}", 100, initial_indent="    ", subsequent_indent="      ")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a released model (IRRA, RDE, TBPS-CLIP) or CLIP weights to a tbps checkpoint",
        description="Convert a released checkpoint into a tbps checkpoint that tbps eval, index build, search, "
        "serve and train --init accept. The architecture is read from the tensor shapes; the source code's "
        "preprocessing (input size, resize, interpolation, mean/std, caption cleaning, tokenizer, context "
        "length, truncation) is recorded and used wherever the model encodes. The file is read without running "
        "code from it; a wrong key, missing tensor or misfit shape is refused and nothing is written.",
        epilog=_formats_help() + "\n\nexamples:\n"
        "  tbps convert irra irra_cuhk/best.pth irra-cuhk.pt\n"
        "  tbps eval irra-cuhk.pt --data /data/CUHK-PEDES\n"
        "  tbps convert openai ViT-B-16.pt clip-b16.pt\n"
        "  tbps convert open_clip laion2b_s34b_b88k clip-laion.pt --arch ViT-B-16\n"
        "  tbps index build photos.idx --checkpoint clip-laion.pt --images photos/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", choices=list(FORMATS), metavar="FORMAT", help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("src", metavar="SRC", help="the released file (open_clip: a file or a pretrained tag)")
    p.add_argument("out", metavar="OUT", help="the tbps checkpoint to write (.pt)")
    p.add_argument("--arch", help="open_clip: the architecture name (e.g. ViT-B-16, ViT-B-16-quickgelu, RN50)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="irra, rde: the input size the model was trained at (default 384 128; must fit the "
                   "file's positional embedding)")
    p.add_argument("--select-ratio", type=float, help="rde: the fraction of tokens TSE selects (default 0.3, "
                   "RDE's --select_ratio)")
    p.add_argument("--resize", choices=["squash", "shortest"],
                   help="override the source's image resize: squash (to HxW) or shortest (short side, centre "
                   "crop; OpenAI/open_clip's own, which crops tall person images)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from tbps.models.convert import convert

    options = {"arch": args.arch, "select_ratio": args.select_ratio, "resize": args.resize,
               "image_size": tuple(args.image_size) if args.image_size else None}
    summary = convert(args.format, args.src, args.out, overwrite=args.overwrite, **options)
    seconds = summary.pop("seconds")
    print(f"wrote {summary['out']} ({summary['format']}, {summary['arch']}, input {summary['image_size'][0]}x"
          f"{summary['image_size'][1]}, {summary['embed_dim']}-d features) in {seconds:.1f} s")
    print("preprocessing: " + json.dumps(summary["preprocess"]))
    return 0
