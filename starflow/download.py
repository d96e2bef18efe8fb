"""Fetching the released weights and the models they need through ``huggingface_hub``.

``starflow download {t2i,t2v,all} --local-dir ckpts`` puts everything under one folder, each model in a
subfolder named like its Hub id, which is where sampling looks first (see
:func:`starflow.assets.asset_search_dirs`)::

    ckpts/starflow_3B_t2i_256x256.pth                      apple/starflow
    ckpts/starflow-v_7B_t2v_caus_480p_v3.pth               apple/starflow
    ckpts/google/flan-t5-xl/...                            T5 text encoder (both models)
    ckpts/stabilityai/sd-vae-ft-ema/...                    SD-VAE (text-to-image)
    ckpts/Wan-AI/Wan2.2-TI2V-5B-Diffusers/vae/...          WAN2.2 VAE (text-to-video)

Downloads resume where they stopped (``huggingface_hub`` keeps partial files), show progress bars, and
every file's size is checked against the Hub's record afterwards. Each repository is fetched at one commit, which
``--local-dir``'s ``downloads.json`` records (``--revision REPO=COMMIT`` repeats it). Without network access (or with
``HF_HUB_OFFLINE=1``) the command fails at once and lists the files and where to put them by hand.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Asset", "RELEASES", "DownloadError", "MANIFEST", "download", "manual_instructions", "read_manifest",
           "release_assets", "write_manifest"]

HUB = "https://huggingface.co"


@dataclass(frozen=True)
class Asset:
    """Files of one Hub repository that a release needs.

    Attributes:
        what: what they are, for messages.
        repo: Hub repository id.
        patterns: file names or glob patterns inside the repository.
        folder: subfolder of ``--local-dir`` that receives them ("" = the folder itself).
    """

    what: str
    repo: str
    patterns: tuple[str, ...]
    folder: str

    def target(self, local_dir: Path) -> Path:
        """Where this asset goes under ``local_dir``."""
        return local_dir / self.folder if self.folder else local_dir

    def present(self, local_dir: Path) -> bool:
        """Whether the files look present: every exact name is a non-empty file, every pattern matches some file,
        and none of them is empty."""
        root = self.target(local_dir)
        return all(any(root.glob(p)) if _is_glob(p) else _non_empty(root / p) for p in self.patterns) \
            and not self.empty_files(local_dir)

    def empty_files(self, local_dir: Path) -> list[Path]:
        """The files of this asset under ``local_dir`` that are empty (a download that never got its bytes)."""
        root = self.target(local_dir)
        found = [f for p in self.patterns for f in (root.glob(p) if _is_glob(p) else [root / p])]
        return [f for f in found if f.is_file() and f.stat().st_size == 0]


def _non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


T5_XL = Asset("T5 text encoder (google/flan-t5-xl)", "google/flan-t5-xl",
              ("config.json", "*.safetensors", "model.safetensors.index.json", "spiece.model", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"), "google/flan-t5-xl")
RELEASES: dict[str, tuple[Asset, ...]] = {
    "t2i": (Asset("STARFlow 3B text-to-image checkpoint", "apple/starflow", ("starflow_3B_t2i_256x256.pth",), ""),
            T5_XL,
            Asset("SD-VAE (stabilityai/sd-vae-ft-ema)", "stabilityai/sd-vae-ft-ema",
                  ("config.json", "diffusion_pytorch_model.safetensors"), "stabilityai/sd-vae-ft-ema")),
    "t2v": (Asset("STARFlow-V 7B text-to-video checkpoint", "apple/starflow", ("starflow-v_7B_t2v_caus_480p_v3.pth",), ""),
            T5_XL,
            Asset("WAN2.2 VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers, subfolder vae)", "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                  ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"), "Wan-AI/Wan2.2-TI2V-5B-Diffusers")),
}
"""What each release needs: its checkpoint, the T5 encoder and its VAE."""


class DownloadError(OSError):
    """A download cannot start or its result is incomplete; the message says what to do."""


def release_assets(which: str) -> list[Asset]:
    """The assets of ``t2i``, ``t2v`` or ``all`` (shared ones once).

    Raises:
        ValueError: unknown release name.
    """
    if which not in (*RELEASES, "all"):
        raise ValueError(f"unknown release {which!r}: choose one of {', '.join(RELEASES)} or all")
    assets: list[Asset] = []
    for name in RELEASES if which == "all" else (which,):
        assets += [a for a in RELEASES[name] if a not in assets]
    return assets


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def manual_instructions(assets: list[Asset], local_dir: Path, revisions: dict[str, str] | None = None) -> str:
    """Where to get each file in a browser (at the revision ``revisions`` names for its repository, else ``main``)
    and where to put it, for machines without Hub access."""
    lines = []
    for a in assets:
        lines.append(f"  {a.what}:")
        root, rev = a.target(local_dir), (revisions or {}).get(a.repo, "main")
        for p in a.patterns:
            if _is_glob(p):
                lines.append(f"    {HUB}/{a.repo}/tree/{rev}: every file matching {p} -> {root / Path(p).parent}/")
            else:
                lines.append(f"    {HUB}/{a.repo}/resolve/{rev}/{p} -> {root / p}")
    return "\n".join(lines)


def _offline_error(assets: list[Asset], local_dir: Path, cause: BaseException | None,
                   revisions: dict[str, str] | None = None) -> DownloadError:
    why = "HF_HUB_OFFLINE is set" if cause is None else f"the Hub cannot be reached ({type(cause).__name__}: {cause})"
    fix = "unset HF_HUB_OFFLINE, or use a mirror through HF_ENDPOINT" if cause is None else \
        "or use a mirror through HF_ENDPOINT"
    empty = [str(f) for a in assets for f in a.empty_files(local_dir)]
    return DownloadError(
        f"cannot download: {why}. Fetch these files on a machine with access and place them as shown "
        f"({fix}):\n{manual_instructions(assets, local_dir, revisions)}"
        + (f"\n  empty now (0 bytes): {', '.join(empty)}" if empty else ""))


def _recorded(local_dir: Path, asset: Asset) -> dict[str, tuple[str | None, int | None]]:
    """The files of ``asset`` that ``downloads.json`` records: name -> (commit, bytes)."""
    entry = read_manifest(local_dir).get(asset.repo, {})
    commits = entry.get("commits") or {}
    return {name: (commits.get(name, entry.get("commit")), size) for name, size in (entry.get("files") or {}).items()
            if any(fnmatch.fnmatch(name, p) for p in asset.patterns)}


def _check_in_place(assets: list[Asset], local_dir: Path, revisions: dict[str, str], why: str) -> None:
    """Without the Hub (``why``): refuse files of another size than ``downloads.json`` records, and a ``revisions``
    entry the record does not show the files to be; else say that every file is in place.

    Raises:
        DownloadError: as above.
    """
    for asset in assets:
        recorded = _recorded(local_dir, asset)
        bad = _wrong_sizes(asset.target(local_dir), {name: size for name, (_, size) in recorded.items()})
        if bad:
            raise DownloadError(f"{bad[0]} (as {local_dir / MANIFEST} records): download it again (with network "
                                "access)")
        revision = revisions.get(asset.repo)
        commits = {commit for commit, _ in recorded.values()}
        if revision and not (commits and all(c and c.startswith(revision) for c in commits)):
            raise DownloadError(
                f"--revision {asset.repo}={revision}: {why}, and {local_dir / MANIFEST} records "
                + (f"commit {', '.join(sorted(c or '?' for c in commits))} for its files" if commits
                   else "no commit for its files")
                + ": the files in place cannot be shown to be that revision (offline, give the commit hash "
                "recorded, or download again with network access)")
    checked = all(_recorded(local_dir, a) for a in assets)
    print(f"every file is already in {local_dir} ({why}; sizes "
          + ("checked against its downloads.json)" if checked else "not checked: no downloads.json records them)"))


def _wrong_sizes(root: Path, expected: dict[str, int | None]) -> list[str]:
    """``"PATH: N bytes, expected M"`` for each file under ``root`` whose size is not the one ``expected`` gives."""
    bad = []
    for name, want in expected.items():
        path = root / name
        have = path.stat().st_size if path.is_file() else None
        if want is not None and have != want:
            bad.append(f"{path}: {have if have is not None else 'missing'} bytes, expected {want}")
    return bad


def _check_sizes(infos, root: Path, asset: Asset) -> None:
    bad = _wrong_sizes(root, {info.filename: info.file_size for info in infos})
    if bad:
        raise DownloadError(f"{asset.what}: incomplete download ({'; '.join(bad)}); run the command again "
                            "to resume, or delete the file to start over")


def _refused_access(error: BaseException) -> bool:
    """Whether ``error`` or an error it wraps (``huggingface_hub`` wraps the dry run's in a ``DryRunError``) is the
    Hub refusing access: a gated repository, or HTTP 401/403."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, GatedRepoError):
            return True
        response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
        if getattr(response, "status_code", None) in (401, 403):
            return True
        error = error.__cause__ or error.__context__
    return False


def download(which: str, local_dir: str | os.PathLike = "ckpts", *, token: str | None = None,
             revisions: dict[str, str] | None = None) -> list[Path]:
    """Download a release's checkpoint, T5 and VAE into ``local_dir``, resuming partial files.

    Each repository is fetched at one commit: the one ``revisions`` names (a commit hash, branch or tag), else the
    newest of its main branch when the download starts. The commits are recorded in ``local_dir/downloads.json``
    (:func:`write_manifest`), so that a download can be repeated exactly (``starflow download --revision``).

    Args:
        which: ``t2i``, ``t2v`` or ``all``.
        local_dir: destination folder (created); models go to subfolders named like their Hub ids.
        token: Hugging Face token (default: the logged-in one / ``HF_TOKEN``).
        revisions: Hub repository id -> revision, for some of the release's repositories.

    Returns:
        The folders (or the checkpoint files) written.

    Raises:
        ValueError: unknown release, or ``revisions`` names a repository the release does not use.
        DownloadError: offline (with manual instructions), or a file's size differs from the Hub's.
    """
    import huggingface_hub
    from huggingface_hub.errors import DryRunError

    from starflow.adapters.hub import hub_offline

    local_dir = Path(local_dir)
    assets = release_assets(which)
    revisions = dict(revisions or {})
    unknown = sorted(set(revisions) - {a.repo for a in assets})
    if unknown:
        raise ValueError(f"--revision {unknown[0]}=...: the {which} release does not download {unknown[0]}; its "
                         f"repositories are {', '.join(dict.fromkeys(a.repo for a in assets))}")
    if hub_offline():
        missing = [a for a in assets if not a.present(local_dir)]
        if missing:
            raise _offline_error(missing, local_dir, None, revisions)
        _check_in_place(assets, local_dir, revisions, "HF_HUB_OFFLINE is set")
        return [a.target(local_dir) for a in assets]
    written = []
    for asset in assets:
        root = asset.target(local_dir)
        try:  # plan first: file list and sizes, without downloading
            infos = huggingface_hub.snapshot_download(asset.repo, allow_patterns=list(asset.patterns), local_dir=root,
                                                      token=token, revision=revisions.get(asset.repo), dry_run=True)
        except (DryRunError, huggingface_hub.errors.HfHubHTTPError) as e:
            if _refused_access(e):  # (the Hub answered: it is reachable, it said no)
                raise DownloadError(f"{asset.repo} is gated or needs a login: accept its licence on {HUB}/{asset.repo} "
                                    "and log in (`hf auth login`) or set HF_TOKEN") from e
            if isinstance(e, DryRunError):
                if all(a.present(local_dir) for a in assets):
                    _check_in_place(assets, local_dir, revisions, f"the Hub cannot be reached ({type(e).__name__})")
                    return [a.target(local_dir) for a in assets]
                raise _offline_error([a for a in assets if not a.present(local_dir)], local_dir, e, revisions) from e
            raise
        if not infos:
            raise DownloadError(f"{asset.repo} has no files matching {asset.patterns}; the release layout changed?")
        commit = infos[0].commit_hash  # the files planned: fetched from that commit, whatever is pushed meanwhile
        todo = sum(i.file_size or 0 for i in infos if i.will_download)
        print(f"{asset.what}: {len(infos)} file(s), {sum(i.file_size or 0 for i in infos) / 2**30:.2f} GiB "
              f"({todo / 2**30:.2f} GiB to fetch) at commit {commit} -> {root}")
        huggingface_hub.snapshot_download(asset.repo, allow_patterns=list(asset.patterns), local_dir=root, token=token,
                                          revision=commit)
        _check_sizes(infos, root, asset)
        write_manifest(local_dir, asset.repo, commit, {i.filename: i.file_size for i in infos})
        written.append(root / asset.patterns[0] if not asset.folder else root)
    return written


MANIFEST = "downloads.json"
"""The file of ``--local-dir`` that records what :func:`download` fetched."""


def write_manifest(local_dir: Path, repo: str, commit: str, files: dict[str, int | None]) -> Path:
    """Record in ``local_dir/downloads.json`` (JSON, ``{repo: {"commit": the latest hash, "files": {name: bytes},
    "commits": {name: hash}}}``) that ``files`` of Hub repository ``repo`` were downloaded at ``commit``; the files
    recorded before (another release's, from the same repository) and other repositories' entries are kept.
    Returns the file. ``starflow download RELEASE --revision REPO=COMMIT`` (one per entry) repeats the download."""
    from starflow.files import write_text_atomic

    path = Path(local_dir) / MANIFEST
    entries = read_manifest(local_dir)  # (none yet, or unreadable: rewritten whole)
    old = entries.get(repo, {})
    commits = {name: (old.get("commits") or {}).get(name, old.get("commit")) for name in old.get("files") or {}}
    commits.update(dict.fromkeys(files, commit))  # (each file's own: releases share a repository, fetched apart)
    entries[repo] = {"commit": commit, "files": dict(sorted({**(old.get("files") or {}), **files}.items())),
                     "commits": dict(sorted(commits.items()))}
    write_text_atomic(path, json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
    return path


def read_manifest(local_dir: str | os.PathLike) -> dict[str, dict]:
    """The entries of ``local_dir/downloads.json`` (:func:`write_manifest`); ``{}`` if it is missing or unreadable."""
    try:
        entries = json.loads((Path(local_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}
