"""``push_to_hub`` for Analytic Subspace Routing (Any-SSR) banks: our model card, one commit, no stale files.

``PeftModel.push_to_hub`` comes from transformers' ``PushToHubMixin``. As of transformers 5.x it saves the adapter
into a temporary folder and then *replaces* ``README.md`` with the card already on the Hub, or with a template whose
metadata says ``library_name: transformers``: the bank's own card (``library_name: peft``, ``base_model``, the
``peft-asr`` tag, the task table, how to load) would be lost. This module uploads what ``save_pretrained`` writes,
card included, and nothing else:

1. ``create_repo(repo_id, exist_ok=True)`` (and ``create_branch`` when ``revision`` names a branch);
2. ``save_pretrained`` into a temporary folder (PEFT's files, the router statistics when kept, the card);
3. one ``HfApi.upload_folder`` commit that adds every file and, through ``delete_patterns``, deletes a
   ``router_statistics.safetensors`` left on the Hub by an earlier push when this save has none (a stale statistics
   file would not match the new router weight, and loading the bank would refuse it). Files the Hub already holds
   unchanged are left out of the commit; a push that changes nothing makes no commit. (``upload_folder`` splits
   only folders of hundreds of files into several commits; a bank is a handful.)

``import peft_asr`` makes ``PeftModel.push_to_hub`` take this path for ASR banks (the wrapper lives in
``peft_asr._registry``, the one module that touches PEFT internals); other PEFT methods are untouched.

Example:
    >>> import peft_asr
    >>> from peft import PeftModel
    >>> getattr(PeftModel.push_to_hub, "__peft_asr_wrapped__", False)
    True
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Optional, Union

from .._version import __version__
from .files import CARD_FILE, STATISTICS_FILE, adapter_folder, is_asr_model

__all__ = ["push_bank_to_hub"]

DEFAULT_COMMIT_MESSAGE = "Upload Analytic Subspace Routing bank"


def push_bank_to_hub(
    peft_model,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[bool, str, None] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    endpoint: Optional[str] = None,
    max_shard_size=None,
    **save_kwargs,
):
    """Upload an ASR bank to the Hub in one commit, keeping the bank's model card.

    Args:
        peft_model (`PeftModel`):
            A model whose adapter is an ASR bank (``get_peft_model(..., ASRConfig(...))`` or
            ``PeftModel.from_pretrained`` of a bank).
        repo_id (`str`):
            ``"org/name"`` (or ``"name"`` for your own namespace). Created if it does not exist.
        commit_message (`str`, *optional*, defaults to ``"Upload Analytic Subspace Routing bank"``):
            The commit title.
        commit_description (`str`, *optional*):
            The commit description.
        private (`bool`, *optional*):
            Visibility of a repository created by this call; ignored when it exists already.
        token (`str` or `bool`, *optional*):
            Hub token; default: the saved login (``hf auth login``) or ``HF_TOKEN``.
        revision (`str`, *optional*):
            Branch to commit to (created if missing), or ``"refs/pr/N"`` to add to an open pull request; default the
            repository's main branch.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request against the main branch instead of committing to it (the Hub client opens pull
            requests against the main branch only: ``revision`` naming another branch is refused).
        tags (`list[str]`, *optional*):
            Extra tags for the card; the card always carries ``peft``, ``peft-asr``, ``lora``,
            ``continual-learning`` and ``analytic-subspace-routing``.
        endpoint (`str`, *optional*):
            Hub endpoint; default ``HF_ENDPOINT`` or ``https://huggingface.co``.
        max_shard_size:
            Accepted for compatibility with transformers' ``push_to_hub`` and ignored: PEFT adapters are not sharded.
        save_kwargs:
            Passed to ``save_pretrained`` (for example ``selected_adapters``).

    Returns:
        `huggingface_hub.CommitInfo` of the commit (its ``oid`` is the new revision; the current one when nothing
        changed).

    Raises:
        TypeError: ``peft_model`` is not an ASR bank.
        ValueError: a bad ``repo_id``, or ``create_pr`` with a ``revision`` other than the main branch (refused before
            any request to the Hub).
    """
    from huggingface_hub import HfApi, ModelCard

    if not is_asr_model(peft_model):
        raise TypeError(
            f"`push_bank_to_hub` uploads ASR banks only, got {type(getattr(peft_model, 'base_model', peft_model)).__name__}; "
            "use `push_to_hub` for other PEFT methods."
        )
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise ValueError(f"`repo_id` must be 'org/name' or 'name', got {repo_id!r}.")
    if create_pr and revision not in (None, "main"):
        # `upload_folder` would refuse it too, but only after the repository and the branch were created
        raise ValueError(f"`create_pr=True` opens a pull request against the main branch; it cannot target "
                         f"revision={revision!r}. Push to the branch (without `create_pr`), or drop `revision`.")
    api = HfApi(endpoint=endpoint, token=token, library_name="peft-asr", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, **save_kwargs)
        if tags:
            card_path = os.path.join(tmp, CARD_FILE)
            card = ModelCard.load(card_path)
            card.data.tags = sorted(set(card.data.tags or []) | set(tags))
            card.save(card_path)
        # a statistics file from an earlier push would not match this router weight: it goes in the same commit
        # (`upload_folder` keeps a file that this upload adds, so a fresh statistics file replaces the old one).
        # The pattern is matched with fnmatch: `*`, `?` and `[` of an adapter name are escaped to match themselves.
        statistics = os.path.relpath(adapter_folder(tmp, peft_model.base_model._adapter), tmp).replace(os.sep, "/")
        statistics = STATISTICS_FILE if statistics == "." else f"{_escape_pattern(statistics)}/{STATISTICS_FILE}"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=[statistics],
        )


def _escape_pattern(path: str) -> str:
    """``path`` as an fnmatch pattern that matches it alone (``[*]``, ``[?]``, ``[[]``, as ``glob.escape`` writes)."""
    return re.sub(r"([*?[])", r"[\1]", path)
