#!/usr/bin/env python
"""Put the ImageNet weights a profile asks for into this machine's caches (a cluster setup step).

    python scripts/fetch_weights.py --profile paper                    # download (node has internet)
    python scripts/fetch_weights.py --profile paper --export /mnt/nfs/ldct-weights   # make a share
    python scripts/fetch_weights.py --profile paper --from /mnt/nfs/ldct-weights     # no internet

The training code never downloads (a missing file is an error, docs/DESIGN.md §4); this is the one
place that does, and only when asked. The caches are the ones the loaders read: the Hugging Face
hub cache (timm encoders; HF_HOME) and torch's hub checkpoints (torchvision VGG; TORCH_HOME).
A share made with --export holds the same layout: huggingface/hub/models--.../ and
torch/hub/checkpoints/<file>. Files already in the cache are left alone. Exit 1 if anything is
still missing afterwards, naming it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def _hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _torch_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_dir(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def _copy_tree(src: Path, dst: Path) -> None:
    # symlinks=True: a hub cache's snapshots/ are links into blobs/, kept as links.
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def fetch(profile: str, source: Path | None, export: Path | None) -> int:
    from ldct.config import load_config
    from ldct.study.preflight import required_weights

    cfg = load_config(profile)
    needed = required_weights(cfg)
    if not needed:
        print(f"fetch_weights: the {profile} profile needs no ImageNet weights")
        return 0
    for w in needed:
        if w.found is not None:
            print(f"  present: {w.what}: {w.found}")
            continue
        if source is not None:
            if w.hf_repo and (source / "huggingface" / "hub" / _hf_dir(w.hf_repo)).is_dir():
                _copy_tree(
                    source / "huggingface" / "hub" / _hf_dir(w.hf_repo), _hf_cache() / _hf_dir(w.hf_repo)
                )
            elif w.url and (source / "torch" / "hub" / "checkpoints" / w.url.rsplit("/", 1)[-1]).is_file():
                _torch_checkpoints().mkdir(parents=True, exist_ok=True)
                name = w.url.rsplit("/", 1)[-1]
                shutil.copy2(source / "torch" / "hub" / "checkpoints" / name, _torch_checkpoints() / name)
            else:
                print(f"  not in {source}: {w.what}", file=sys.stderr)
                continue
            print(f"  copied from {source}: {w.what}")
        elif w.hf_repo:
            from huggingface_hub import hf_hub_download

            print(f"  downloading {w.what} from the Hugging Face hub ({w.hf_repo})", flush=True)
            hf_hub_download(w.hf_repo, w.hf_filename or "model.safetensors")
        elif w.url:
            import torch

            name = w.url.rsplit("/", 1)[-1]
            _torch_checkpoints().mkdir(parents=True, exist_ok=True)
            print(f"  downloading {w.what} from {w.url}", flush=True)
            # torchvision names its files <name>-<sha256 prefix>.pth: the prefix is checked.
            prefix = name.rsplit("-", 1)[-1].split(".")[0]
            torch.hub.download_url_to_file(w.url, str(_torch_checkpoints() / name), hash_prefix=prefix)
    missing = [w for w in required_weights(cfg) if w.found is None]
    for w in missing:
        print(f"fetch_weights: still missing: {w.what} (looked in {'; '.join(w.looked)})", file=sys.stderr)
    if missing:
        return 1
    if export is not None:
        for w in required_weights(cfg):
            assert w.found is not None
            if w.hf_repo and _hf_cache() in w.found.parents:
                _copy_tree(
                    _hf_cache() / _hf_dir(w.hf_repo), export / "huggingface" / "hub" / _hf_dir(w.hf_repo)
                )
            else:
                (export / "torch" / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
                shutil.copy2(w.found, export / "torch" / "hub" / "checkpoints" / w.found.name)
        print(f"fetch_weights: exported to {export} (use --from {export} on the nodes)")
    print(f"fetch_weights: every ImageNet file of the {profile} profile is in place")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", required=True, help="studies/<name>.toml or a .toml path")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--from", dest="source", type=Path, help="copy from a share (no download)")
    where.add_argument("--export", type=Path, help="after fetching, copy the files into a share")
    args = parser.parse_args(argv)
    if args.source is not None and not args.source.is_dir():
        print(f"fetch_weights: --from {args.source}: no such directory (mount the share?)", file=sys.stderr)
        return 2
    return fetch(args.profile, args.source, args.export)


if __name__ == "__main__":
    sys.exit(main())
