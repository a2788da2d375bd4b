"""Benchmark CodeFormer face restoration: the network alone (seconds per face at several batch sizes)
and the whole pipeline on a generated picture with N faces, stage by stage.

    python bench/codeformer.py --device cuda --dtype fp16 --batch 1 4 8 --faces 6 --size 1920 1080

Weights are random (timings do not depend on them): ``--config full`` is the released network
(94 M parameters), ``--config tiny`` the test-sized one. Random detector weights find nothing, so
the pipeline run injects N detections (a face grid with proper 5-point landmarks) and times the
real detector separately on the same picture. Peak memory: CUDA allocator peak on GPUs, the
process's peak resident set on the CPU.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from checkout import import_pack


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat=1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA peak)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"


class InjectedDetector:
    """Hands out given detections (scaled to the working frame) and remembers nothing else."""

    def __init__(self, dets_for_hw):
        self.dets_for_hw = dets_for_hw

    def detect(self, image, *args, **kwargs):
        return self.dets_for_hw(image.shape[:2])


def face_grid(hw, n, face_px):
    """``n`` frontal faces of crop side ``face_px`` on a grid, as RetinaFace rows."""
    from photo_restoration.codeformer.faces import FFHQ_TEMPLATE_512

    h, w = hw
    cols = int(np.ceil(np.sqrt(n * w / h)))
    rows = int(np.ceil(n / cols))
    rows_out = []
    for k in range(n):
        r, c = divmod(k, cols)
        cx, cy = (c + 0.5) * w / cols, (r + 0.5) * h / rows
        s = face_px / 512.0
        lm = (FFHQ_TEMPLATE_512 - 256.0) * s + (cx, cy)
        box = [cx - face_px / 3, cy - face_px / 3, cx + face_px / 3, cy + face_px / 3]
        rows_out.append(box + [0.99] + lm.reshape(-1).tolist())
    return np.array(rows_out, np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--config", choices=["full", "tiny"], default="full")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--faces", type=int, default=4, help="faces in the pipeline picture (0: skip the pipeline)")
    p.add_argument("--face-px", type=int, default=200, help="face crop side in the picture")
    p.add_argument("--size", type=int, nargs=2, default=(1920, 1080), metavar=("W", "H"))
    p.add_argument("--upscale", type=int, default=1)
    p.add_argument("--detector", choices=["mobilenet0.25", "resnet50"], default="resnet50")
    p.add_argument("--parser", choices=["parsenet", "bisenet", "none"], default="parsenet")
    p.add_argument("--parser-config", choices=["full", "tiny"], default="full")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import_pack()
    from photo_restoration.codeformer import faces as F
    from photo_restoration.codeformer.detection import load_retinaface
    from photo_restoration.codeformer.loader import load_codeformer
    from photo_restoration.codeformer.parsing import load_parser
    from photo_restoration.codeformer.pipeline import FaceSettings, restore_faces, run_network
    from photo_restoration.testing import tiny_codeformer, tiny_faces

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    full = {"nf": 64, "ch_mult": [1, 2, 2, 4, 4, 8], "dim_embd": 512, "n_head": 8, "n_layers": 9, "dim_mlp": 1024,
            "codebook_size": 1024, "emb_dim": 256}
    cfg = full if args.config == "full" else {}
    sd = tiny_codeformer.tiny_codeformer_state_dict(0, **cfg)
    net = load_codeformer(sd, device=device, dtype=dtype, n_head=8)
    n_params = sum(v.numel() for v in sd.values())
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype {args.dtype}, CodeFormer {args.config} ({n_params / 1e6:.1f} M values), torch threads "
          f"{torch.get_num_threads()}")

    # ---- the network alone ---------------------------------------------------------------------------
    for bs in args.batch:
        crops = np.random.default_rng(0).integers(0, 256, (bs, 512, 512, 3), dtype=np.uint8)
        run_network(net, crops[:1], 0.5, True, 1)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t, _ = _timed(lambda: run_network(net, crops, 0.5, True, bs), device, args.repeat)
        print(f"network batch {bs}: {t:.3f} s, {t / bs:.3f} s/face, peak {_peak(device)}")

    if args.faces <= 0:
        return 0

    # ---- the pipeline on a generated picture ---------------------------------------------------------
    w, h = args.size
    rng = np.random.default_rng(1)
    picture = torch.from_numpy(rng.random((1, h, w, 3), dtype=np.float32))
    det_sd = tiny_faces.retinaface_state_dict(args.detector, 0, faces=False)
    detector = load_retinaface(det_sd, device=device)
    parser = None
    if args.parser != "none":
        psd = (tiny_faces.parsenet_state_dict(0) if args.parser_config == "tiny" and args.parser == "parsenet" else
               tiny_faces.bisenet_state_dict(0) if args.parser == "bisenet" else _full_parsenet_sd())
        parser = load_parser(psd, device=device)
    u8 = np.clip(np.round(picture[0].numpy() * 255), 0, 255).astype(np.uint8)
    t_det, _ = _timed(lambda: detector.detect(u8, 0.8, 0.4, 640), device, args.repeat)
    print(f"detection ({args.detector}, short side 640) on {w}x{h}: {t_det:.3f} s")

    dets = face_grid((h, w), args.faces, args.face_px)
    affines = [F.estimate_affine(d[5:].reshape(5, 2)) for d in dets]
    t_align, crops = _timed(lambda: np.stack([F.align_face(u8, a) for a in affines]), device)
    print(f"alignment of {args.faces} faces: {t_align:.3f} s")
    bs = max(args.batch)
    t_net, restored = _timed(lambda: run_network(net, crops, 0.5, True, bs), device)
    print(f"network, {args.faces} faces in batches of {bs}: {t_net:.3f} s ({t_net / args.faces:.3f} s/face)")
    if parser is not None:
        t_parse, masks = _timed(lambda: [F.parse_mask_512(parser.keep_mask(l)) for l in parser.labels(restored, bs)], device)
        print(f"parsing ({args.parser}) + mask blur, {args.faces} faces: {t_parse:.3f} s")
    else:
        masks = [None] * args.faces
    up = args.upscale
    bg = F.resize_background(u8.astype(np.float32), (w * up, h * up))
    faces = [F.PasteFace(r, F.paste_affine(a, up), m) for r, a, m in zip(restored, affines, masks)]
    t_roi, _ = _timed(lambda: F.paste_faces(bg, faces, up, roi=True), device, args.repeat)
    t_full, _ = _timed(lambda: F.paste_faces(bg, faces, up, roi=False), device)
    print(f"paste-back of {args.faces} faces at upscale {up}: ROI {t_roi:.3f} s, full canvas (reference) {t_full:.3f} s")

    settings = FaceSettings(upscale=up, batch_size=bs, use_parse=parser is not None, upsize_small=False)
    injected = InjectedDetector(lambda hw: dets)
    t_all, res = _timed(lambda: restore_faces(picture, net, injected, parser, settings), device)
    print(f"whole pipeline (injected detections; add detection {t_det:.3f} s): {t_all:.3f} s for "
          f"{len(res.faces)} faces = {t_all / max(len(res.faces), 1):.3f} s/face, peak {_peak(device)}")
    return 0


def _full_parsenet_sd():
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(0)
    return ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict()


if __name__ == "__main__":
    raise SystemExit(main())
