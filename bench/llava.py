"""Seconds per LLaVA caption and peak memory, on a random model of a chosen size or a real folder.

    python bench/llava.py                                   # tiny test model
    python bench/llava.py --hidden 1024 --layers 8 --image-size 336 --patch 14 --vocab 32064
    python bench/llava.py --folder /path/to/models/LLM/llava-1.5-7b-hf --dtype fp16 --tokens 128
    python bench/llava.py --tile 512 --stride 256 --size 1024 768 --batch-size 4   # one caption per tile

The random model goes through the same save -> ``load_llava`` -> ``caption_*`` path the nodes use.
Peak memory is the process's peak resident memory on the CPU, and torch's peak allocation on CUDA.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from checkout import import_pack



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", help="a Hugging Face-format LLaVA folder (default: a random model)")
    p.add_argument("--family", default="llava", choices=["llava", "llava_next"], help="random model family")
    p.add_argument("--hidden", type=int, default=32, help="random model hidden size (vision and text)")
    p.add_argument("--layers", type=int, default=2, help="random model layers (vision and text)")
    p.add_argument("--image-size", type=int, default=32, help="random model vision input size")
    p.add_argument("--patch", type=int, default=8, help="random model vision patch size")
    p.add_argument("--vocab", type=int, default=0, help="random model vocabulary rows (0: the tiny tokenizer's)")
    p.add_argument("--size", type=int, nargs=2, default=(512, 384), metavar=("W", "H"), help="picture size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32, help="max_new_tokens")
    p.add_argument("--tile", type=int, default=0, help="tile size in pixels (0: whole picture)")
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1, help="pictures/tiles per generate call")
    p.add_argument("--preprocess", default="crop", choices=["crop", "pad"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs after one warm-up")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import_pack()
    from photo_restoration.supir.caption import CaptionSettings, caption_images, caption_tiles, load_llava
    from photo_restoration.testing.tiny_llava import save_llava

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "llava-bench"
            save_llava(folder, args.family, 0, hidden=args.hidden, layers=args.layers, image_size=args.image_size,
                       patch=args.patch, vocab_size=args.vocab)
        t = time.perf_counter()
        llava = load_llava(folder, dtype, "none", device)
        load_s = time.perf_counter() - t
    params = sum(p.numel() for p in llava.model.parameters())
    w, h = args.size
    pictures = torch.rand(args.batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    settings = CaptionSettings(max_new_tokens=args.tokens, preprocess=args.preprocess, batch_size=args.batch_size)

    def run() -> list[str]:
        with torch.inference_mode():
            if args.tile:
                return caption_tiles(llava, pictures, args.tile, args.stride, settings)
            return caption_images(llava, pictures, settings)

    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        captions = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    per_caption = min(times) / len(captions)
    words = sum(len(c.split()) for c in captions) / len(captions)
    if device.type == "cuda":
        peak = f"peak CUDA allocated {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB"
    else:
        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB"
    print(f"model {'folder ' + str(args.folder) if args.folder else args.family} {params / 1e6:.2f} M params, "
          f"{args.dtype} on {device}, load {load_s:.2f} s")
    print(f"{len(captions)} caption(s) of {w}x{h} ({'tiles ' + str(args.tile) + '/' + str(args.stride) if args.tile else 'whole'}),"
          f" batch size {args.batch_size}, up to {args.tokens} tokens (mean {words:.1f} words; a random model's "
          f"ids beyond the tiny tokenizer's words decode to nothing): {per_caption:.3f} s per caption; {peak}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
