"""Bring a model trained on a lent GPU back through the device tool's return limit (files of 16 MiB, 64 MiB in all).

The aligned MiniLM's fp32 weights (91 MB) do not fit; their difference from the start weights the GPU machine
loaded (``.gpu/model``, fp16, made by ``bench/gpu_prepare.sh`` and remade identically here) does, in fp16: 45 MB in
15 MiB parts. ``unpack`` adds it back to the same start weights. The error this leaves is fp16's rounding of the
*difference* (its largest value is measured at ``pack`` time and recorded in ``delta.json``), not of the weights.

- ``pack --base .gpu/model --model RUN --out OUT``: ``OUT/delta.safetensors.partNN``, ``OUT/delta.json`` and
  ``OUT/meta.tar.gz`` (every small file of RUN: config, tokenizer, card, ``pretrain_info.json``, loss plot).
- ``unpack --base .gpu/model --parts DIR --dest MODEL``: checks the start weights' and the delta's sha256, writes
  ``MODEL`` (a BERT directory that ``model:`` in a recipe can name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

WEIGHTS = "model.safetensors"
PART_BYTES = 15 * 2**20
LEFT_BEHIND = {WEIGHTS, "checkpoints", "snapshots", "pairs.tsv.gz"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(base: Path, model: Path, out: Path) -> dict:
    start = load_file(base / WEIGHTS)
    final = load_file(model / WEIGHTS)
    missing = sorted(set(final) - set(start))
    if missing:
        raise SystemExit(
            f"{model / WEIGHTS}: tensors absent from the start weights {base / WEIGHTS}: {missing}"
        )
    delta, err, largest = {}, 0.0, 0.0
    for name, w in final.items():
        d = (w.float() - start[name].float()).to(torch.float16)
        if not torch.isfinite(d).all():
            raise SystemExit(f"{name}: the difference overflows fp16")
        delta[name] = d
        back = start[name].float() + d.float()
        err = max(err, (back - w.float()).abs().max().item())
        largest = max(largest, d.abs().max().item())
    blob = save(delta)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(blob), PART_BYTES):
        name = f"delta.safetensors.part{i // PART_BYTES:02d}"
        (out / name).write_bytes(blob[i : i + PART_BYTES])
        parts.append(name)
    record = {
        "start_sha256": sha256((base / WEIGHTS).read_bytes()),
        "final_sha256": sha256((model / WEIGHTS).read_bytes()),
        "delta_sha256": sha256(blob),
        "parts": parts,
        "tensors": len(delta),
        "max_abs_reconstruction_error": err,
        "max_abs_difference": largest,
    }
    (out / "delta.json").write_text(json.dumps(record, indent=2))
    with tarfile.open(out / "meta.tar.gz", "w:gz") as tar:
        for f in sorted(model.iterdir()):
            if f.name not in LEFT_BEHIND and f.is_file():
                tar.add(f, arcname=f.name)
    return record


def unpack(base: Path, parts_dir: Path, dest: Path) -> dict:
    record = json.loads((parts_dir / "delta.json").read_text())
    if sha256((base / WEIGHTS).read_bytes()) != record["start_sha256"]:
        raise SystemExit(f"{base / WEIGHTS} is not the start the GPU machine trained from (sha256 differs)")
    blob = b"".join((parts_dir / p).read_bytes() for p in record["parts"])
    if sha256(blob) != record["delta_sha256"]:
        raise SystemExit(f"{parts_dir}: the delta parts do not join to the packed file (sha256 differs)")
    delta = load(blob)
    start = load_file(base / WEIGHTS)
    weights = {n: (start[n].float() + d.float()).contiguous() for n, d in delta.items()}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(parts_dir / "meta.tar.gz", "r:gz") as tar:
        tar.extractall(tmp, filter="data")
    save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / "delta.json").write_text(json.dumps(record, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("unpack")
    u.add_argument("--base", type=Path, required=True)
    u.add_argument("--parts", type=Path, required=True)
    u.add_argument("--dest", type=Path, required=True)
    ns = ap.parse_args()
    if ns.cmd == "pack":
        print(json.dumps(pack(ns.base, ns.model, ns.out)))
    else:
        print(json.dumps(unpack(ns.base, ns.parts, ns.dest)))


if __name__ == "__main__":
    main()
