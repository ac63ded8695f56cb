"""A Hugging Face hub name (`Qwen/Qwen2.5-0.5B`) where a model folder is expected, resolved to its
snapshot in the local `huggingface_hub` cache (HF_HOME / HF_HUB_CACHE, as every HF tool finds it).

Only the cache is read: lmforge never downloads at run time (HF_HUB_OFFLINE or not), so a model is
fetched once beforehand (`hf download NAME`, or any transformers/vLLM run that used it).
`huggingface_hub` is the optional `hub` extra (transformers brings it too), imported only when a
name is not a folder.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.common import LmforgeError


def resolve_model_path(path: str | Path) -> Path:
    """`path` itself if it exists (or cannot be a hub name), else the cached snapshot of the hub
    model of that name (`org/name` or `org/name@revision`). LmforgeError when it is neither."""
    path_obj = Path(path)
    name = str(path)
    if path_obj.exists() or not _could_be_repo_id(name):
        return path_obj
    repo_id, _, revision = name.partition("@")
    try:
        import huggingface_hub
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise LmforgeError(
            f"model path not found: {name} (not a folder; to read it as a Hugging Face hub name from the "
            "local cache, install huggingface_hub: pip install 'lmforge[hub]')"
        ) from None
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise LmforgeError(
            f"model path not found: {name} is not a folder, nor a model in the Hugging Face cache ({cache}); "
            f"lmforge does not download at run time: fetch it first (`hf download {repo_id}`)"
        ) from None
    return Path(folder)


def _could_be_repo_id(name: str) -> bool:
    """`org/name` (one slash, no leading `.`, `/` or `~`): a missing relative folder of that shape is
    looked up in the cache too, and the error then names both readings."""
    repo_id = name.partition("@")[0]
    parts = repo_id.split("/")
    return len(parts) == 2 and all(parts) and not repo_id.startswith((".", "~")) and "\\" not in repo_id
