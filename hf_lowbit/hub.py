"""Saving and pushing hf_lowbit checkpoints with their model card.

`install_save_hooks(model)` (run by the quantizer on every hf_lowbit model) gives the model instance its own
`save_pretrained`, which writes the checkpoint as transformers does and then the model card (README.md) and the
loading guard (see `guard`), and its own `push_to_hub`, which goes through `push`: transformers' version would
replace the README with its generic card. `push_folder` uploads a saved folder. Upload failures raise
`HubPushError`, which says what failed and where the local copy is; the local copy is never deleted on failure.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

from torch import nn

from . import guard
from .model_card import is_hf_lowbit_card, lowbit_config, write_model_card
from .save_layout import resolve_save_original_format

logger = logging.getLogger(__name__)

_PUSH_KEYS = ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision", "tags")


class HubPushError(RuntimeError):
    """An upload to the Hub failed; `local_dir` holds the complete checkpoint that was to be uploaded."""

    def __init__(self, message: str, local_dir: str | os.PathLike, status: int | None = None) -> None:
        super().__init__(message)
        self.local_dir = Path(local_dir)
        self.status = status


def check_repo_id(repo_id: Any, field: str = "repo_id") -> str:
    """Validate a Hub repo id early, with a message naming the field, the value and what is allowed."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or not repo_id:
            raise HFValidationError("empty")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{field}={repo_id!r} is not a valid Hub repo id; allowed: 'name' or 'namespace/name' made "
                         "of letters, digits, '-', '_' and '.' (no '--' or '..', at most 96 characters)") from None
    return repo_id


# -- saving ---------------------------------------------------------------------------------------------------------

def save_with_card(model: nn.Module, save_directory: str | os.PathLike, *args: Any, card: dict | None = None,
                   **kwargs: Any) -> None:
    """`save_pretrained` as transformers does it, then the model card and the loading guard (main process only).

    `card` holds extra `render_model_card` arguments (repo_id, tags, metrics, ...). A model that is no longer an
    hf_lowbit model (e.g. after `dequantize()`) is saved plainly and any stale guard is removed.
    """
    resolve_save_original_format(model, kwargs)
    type(model).save_pretrained(model, save_directory, *args, **kwargs)
    is_main = kwargs.get("is_main_process", args[0] if args else True)
    should_save = getattr(model, "should_save_on_this_rank", None)
    if not (should_save(is_main) if callable(should_save) else is_main):
        return
    if lowbit_config(model) is None:
        guard.unprotect(save_directory)
        return
    guard.protect(save_directory)
    try:
        write_model_card(model, save_directory, **(card or {}))
    except Exception as err:  # the weights are saved; a card problem must not turn that into a failure
        logger.warning("hf_lowbit: could not write the model card in %s: %s", save_directory, err)


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """Instance `save_pretrained` of hf_lowbit models: card + guard; ``push_to_hub=True`` uploads them too."""
    push = kwargs.pop("push_to_hub", False)
    hub = {k: kwargs.pop(k) for k in _PUSH_KEYS if k in kwargs}
    repo_id = hub.pop("repo_id", None) or Path(save_directory).name
    card = {"repo_id": repo_id, "tags": hub.pop("tags", None)} if push else None
    save_with_card(self, save_directory, *args, card=card, **kwargs)
    if push and kwargs.get("is_main_process", args[0] if args else True):
        push_folder(save_directory, repo_id, token=kwargs.get("token"), **hub)


def _push_to_hub(self: nn.Module, repo_id: str, **kwargs: Any) -> Any:
    """Instance `push_to_hub` of hf_lowbit models (transformers' signature), routed through `push`."""
    return push(self, repo_id, **kwargs)


class _ModelMethod:
    """`func` bound to one model instance, kept in the instance dict (where it shadows the class method).

    Unlike a `types.MethodType`, it pickles (`torch.save(model)`) and deep-copies (`finalize(inplace=False)`)
    together with its model: the copy's method is bound to the copy.
    """

    def __init__(self, model: nn.Module, func: Any, name: str) -> None:
        self.model, self.func = model, func
        self.__name__ = name
        self.__doc__ = getattr(type(model), name).__doc__
        self.__signature__ = inspect.signature(types.MethodType(getattr(type(model), name), model))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(self.model, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "func": self.func, "__name__": self.__name__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def install_save_hooks(model: nn.Module) -> None:
    """Give this model instance the card-writing `save_pretrained` and `push_to_hub` (idempotent).

    They live in the instance dict and shadow the class methods, so Trainer saves, `finalize(inplace=False)` copies
    and `push_to_hub` all write the card; other models of the same class are not affected.
    """
    model.__dict__["save_pretrained"] = _ModelMethod(model, _save_pretrained, "save_pretrained")
    model.__dict__["push_to_hub"] = _ModelMethod(model, _push_to_hub, "push_to_hub")


# -- pushing --------------------------------------------------------------------------------------------------------

def _is_network_error(err: BaseException) -> bool:
    if isinstance(err, (OSError, TimeoutError)):
        return True
    return any(c.__name__ in ("TransportError", "RequestError", "ConnectionError")
               and c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
               for c in type(err).__mro__)


def _explain(err: BaseException, step: str, repo_id: str, endpoint: str, local_dir: Path) -> HubPushError:
    from huggingface_hub.errors import HfHubHTTPError

    keep = f"The checkpoint is complete on disk at {local_dir}; push it again with hf_lowbit.push_folder()."
    status = getattr(getattr(err, "response", None), "status_code", None) if isinstance(err, HfHubHTTPError) \
        else None
    if status in (401, 403):
        why = (f"the Hub at {endpoint} refused the credentials (HTTP {status}): log in with `hf auth login`, set "
               "HF_TOKEN, or pass token= with write access to this namespace")
    elif status == 404:
        why = f"the repository was not found at {endpoint} (HTTP 404) or the token cannot see it"
    elif status is not None and status >= 500:
        why = (f"the Hub at {endpoint} failed (HTTP {status}); commits are atomic, so nothing partial is visible "
               "in the repo: retry later")
    elif status is not None:
        why = f"the Hub at {endpoint} answered HTTP {status}: {err}"
    elif _is_network_error(err):
        why = f"cannot reach {endpoint} ({type(err).__name__}: {err}): check the network, proxies and HF_ENDPOINT"
    else:
        why = f"{type(err).__name__}: {err}"
    return HubPushError(f"push to {repo_id!r} failed while trying to {step}: {why}. {keep}", local_dir, status)


def _foreign_remote_readme(api: Any, repo_id: str, revision: str | None, scratch: str) -> bool:
    """True if the repo already has a README.md that hf_lowbit did not write (it is then left as it is)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=scratch)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return False
    return not is_hf_lowbit_card(Path(path).read_text(errors="replace"))


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None,
                private: bool | None = None, revision: str | None = None, create_pr: bool = False,
                commit_message: str | None = None, commit_description: str | None = None,
                endpoint: str | None = None) -> Any:
    """Create `repo_id` if needed and upload a saved checkpoint folder as one commit; returns the `CommitInfo`.

    A README.md already in the repo that hf_lowbit did not write is kept (ours is not uploaded over it).
    Raises `HubPushError` (naming the step, the cause and the local folder, which is left untouched).
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder={str(folder)!r} is not a saved checkpoint (no config.json); allowed: a folder "
                         "written by save_pretrained, hf_lowbit.export or hf-lowbit quantize")
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repository"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        step = "read the repository's README.md"
        with tempfile.TemporaryDirectory(prefix="hf_lowbit_card_") as scratch:
            ignore = ["README.md"] if _foreign_remote_readme(api, repo_id, revision, scratch) else []
        if ignore:
            logger.warning("hf_lowbit: %s already has a README.md not written by hf_lowbit; it is kept", repo_id)
        step = "upload the files and commit"
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload hf_lowbit checkpoint",
                                 commit_description=commit_description, ignore_patterns=ignore or None)
    except Exception as err:
        raise _explain(err, step, repo_id, api.endpoint, folder) from err


def push(model: nn.Module, repo_id: str, *, save_dir: str | os.PathLike | None = None,
         token: str | bool | None = None, private: bool | None = None, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, commit_description: str | None = None,
         max_shard_size: int | str = "50GB", tags: list[str] | None = None, endpoint: str | None = None,
         metrics: dict[str, float] | None = None) -> Any:
    """Save an hf_lowbit model with its model card and upload it to `repo_id` (both modes); returns the `CommitInfo`.

    The checkpoint is written to `save_dir` (kept) or to a temporary folder that is removed after a successful
    upload and kept, and named in the error, after a failed one. `model.push_to_hub(...)` calls this.
    """
    check_repo_id(repo_id)
    if lowbit_config(model) is None:
        raise ValueError("push: the model is not an hf_lowbit model (config.quantization_config is "
                         f"{type(getattr(model.config, 'quantization_config', None)).__name__}); allowed: a model "
                         "loaded or converted with hf_lowbit.LowBitConfig")
    temporary = save_dir is None
    folder = Path(tempfile.mkdtemp(prefix="hf_lowbit_push_")) if temporary else Path(save_dir)
    save_with_card(model, folder, max_shard_size=max_shard_size,
                   card={"repo_id": repo_id, "tags": tags, "metrics": metrics})
    info = push_folder(folder, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                       commit_message=commit_message, commit_description=commit_description, endpoint=endpoint)
    if temporary:
        shutil.rmtree(folder, ignore_errors=True)
    return info
