"""Publish a quantized checkpoint to the Hugging Face hub, with the model card its records give.

    python -m autoround_exp.publish RUN_OR_KEY --repo ORG/NAME [--private] [--dry-run] [--results DIR]

RUN_OR_KEY: a run's name (``tiny_llama-w4a16-autoround-iters200``), its key, or the
quantization key of its checkpoint (a unique prefix of six or more characters will do). Before
anything is sent, the folder is checked: the run's verification passed, the card
(``README.md``, written by the report) is there and is what the records give now, and no file
is there that a checkpoint does not hold (a ``.partial`` left by a killed save, a lock, an
editor's backup). ``--dry-run`` prints the card and the files and sends nothing. The upload
uses ``huggingface_hub`` (``HfApi.create_repo``, ``upload_folder``) with the token of
``hf auth login`` or ``HF_TOKEN``; without one, or offline, it stops before sending anything
and says how to log in.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

from autoround_exp.report import card, runs
from autoround_exp.report.runs import Run

# What a compressed-tensors checkpoint folder of the harness holds, the card included.
CHECKPOINT_FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "recipe.yaml",
    "quantization_config.json",  # auto-round's own API writes its settings beside the weights
    "quantization.json",  # the harness's: how it was made and verified
    "calibration_tokens.json",  # the harness's: the exact calibration tokens (their SHA-256 is on the card)
)


class PublishError(RuntimeError):
    """Why nothing was sent, and what to do."""


def find(loaded: list[Run], what: str) -> list[Run]:
    """The runs of the checkpoint ``what`` names (a run name, a run key, a quantization key)."""
    quantized = [r for r in runs.latest(loaded) if r.record.method != "none"]
    for match in (
        lambda r: what in (r.record.name, r.record.key, r.record.quant_key),
        lambda r: len(what) >= 6 and (r.record.key.startswith(what) or r.record.quant_key.startswith(what)),
    ):
        found = [r for r in quantized if match(r)]
        if found:
            break
    folders = sorted({r.record.checkpoint for r in found})
    if not folders:
        names = sorted({r.record.name for r in quantized})
        raise PublishError(f"no quantized run is named or keyed {what!r} here; runs: {', '.join(names) or 'none'}")
    if len(folders) > 1:
        raise PublishError(f"{what!r} names {len(folders)} checkpoints ({', '.join(folders)}); give its key")
    return card.by_checkpoint(loaded)[folders[0]]


def check_folder(mine: list[Run], text: str) -> list[Path]:
    """The files to upload, once the folder is what it should be."""
    rec = mine[0].record
    folder = Path(rec.checkpoint)
    if not folder.is_dir():
        raise PublishError(f"{folder} is gone: quantize it again (python run.py ... with the same settings)")
    v = rec.quantization.verification if rec.quantization else None
    if v is None or v.quantized == 0:
        raise PublishError(f"{rec.name}: no verification of its checkpoint is on record; quantize it again")
    path = folder / card.CARD
    if not path.is_file():
        raise PublishError(f"{path} is missing: run `python -m autoround_exp.report` to write the cards")
    if path.read_text() != text:
        raise PublishError(f"{path} is not what the records give now: run `python -m autoround_exp.report`")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stray = [p.relative_to(folder).as_posix() for p in files if not expected(p.relative_to(folder).as_posix())]
    if stray:
        raise PublishError(f"{folder} holds files a checkpoint does not: {', '.join(stray)}; remove them first")
    return files


def expected(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILES)


def token() -> str:
    """The hub token, or a PublishError that says how to get one (checked before anything is sent)."""
    from huggingface_hub import constants, get_token

    found = get_token()
    if not found:
        raise PublishError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN), then publish again")
    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set: publishing needs the hub; unset it where the hub is reachable")
    return found


def upload(folder: Path, repo: str, private: bool, api=None) -> str:
    """Create the repo (if new) and upload the folder in one commit; the commit's URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token())
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=f"{folder.name} (autoround-exp)"
    )
    return getattr(info, "commit_url", str(info))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autoround_exp.publish", description=__doc__.splitlines()[0])
    ap.add_argument("run", metavar="RUN_OR_KEY")
    ap.add_argument("--repo", required=True, help="the hub repo to create or update: ORG/NAME")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the card and the files; send nothing")
    ap.add_argument("--results", type=Path, default=Path("results"), help="the results store (paths.results)")
    args = ap.parse_args(argv)
    try:
        if not card.HUB_ID.match(args.repo):
            raise PublishError(f"--repo {args.repo} is not ORG/NAME")
        loaded = runs.from_store(args.results)
        mine = find(loaded, args.run)
        sections = runs.sections(runs.latest(loaded))
        text = card.render_card(mine, sections)
        files = check_folder(mine, text)
        folder = Path(mine[0].record.checkpoint)
        if args.dry_run:
            print(text)
            access = "private" if args.private else "public"
            print(f"dry run: would upload {len(files)} files of {folder} to {args.repo} ({access}); nothing sent:")
            for f in files:
                print(f"  {f.relative_to(folder).as_posix()}  {f.stat().st_size / 2**20:.2f} MiB")
            return 0
        token()  # before anything is sent
        print(f"published: {upload(folder, args.repo, args.private)}")
    except PublishError as e:
        print(f"publish: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
