"""``push_to_hub`` for Analytic Subspace Routing (Any-SSR) banks: our model card, one commit, no stale files, and
the team flow of the Hub (a branch, a pull request against any branch, more commits to an open pull request).

``PeftModel.push_to_hub`` comes from transformers' ``PushToHubMixin``. As of transformers 5.x it saves the adapter
into a temporary folder and then *replaces* ``README.md`` with the card already on the Hub, or with a template whose
metadata says ``library_name: transformers``: the bank's own card (``library_name: peft``, ``base_model``, the
``peft-asr`` tag, the task table, how to load) would be lost. This module uploads what ``save_pretrained`` writes,
card included, and nothing else:

1. ``create_repo(repo_id, exist_ok=True)``, and ``create_branch`` when ``revision`` names a branch to commit to
   (a pull request's base branch and ``refs/pr/N`` must exist: they are checked with ``list_repo_refs`` before the
   repository is touched);
2. ``save_pretrained`` into a temporary folder (PEFT's files, the router statistics when kept, the card);
3. one ``HfApi.create_commit`` that adds every file and deletes a ``router_statistics.safetensors`` that the target
   revision holds when this save has none (a stale statistics file would not match the new router weight, and
   loading the bank would refuse it). Files the Hub already holds unchanged are left out of the commit; a push that
   changes nothing makes no commit (and opens no pull request).

``create_commit`` rather than ``HfApi.upload_folder``: ``upload_folder`` opens pull requests against the main branch
only (it refuses ``create_pr=True`` with a ``revision``) and, with ``hf_xet`` installed, may split an upload into
several commits; ``create_commit(create_pr=True, revision=branch)`` opens the pull request against that branch, and
a bank (a handful of files) is always one commit.

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
import tempfile
from pathlib import Path
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
            Where the commit goes: a branch (created from the main branch if missing), or ``"refs/pr/N"`` to add a
            commit to the open pull request N; with ``create_pr=True``, the branch the pull request is opened
            against (it must exist). Default: the main branch.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request with this commit instead of committing to the branch, e.g. to propose a task added to
            a shared bank. The returned ``CommitInfo`` has ``pr_url``, ``pr_num`` and ``pr_revision``
            (``"refs/pr/N"``): push with ``revision=info.pr_revision`` to add commits to the same pull request.
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
        changed, and then no pull request is opened).

    Raises:
        TypeError: ``peft_model`` is not an ASR bank.
        ValueError: a bad ``repo_id``; ``create_pr`` with ``revision="refs/pr/N"`` (refused before any request); a
            pull request against a branch the repository lacks, or a ``refs/pr/N`` that is not one of its pull
            requests (refused before the repository is touched).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard

    if not is_asr_model(peft_model):
        raise TypeError(
            f"`push_bank_to_hub` uploads ASR banks only, got {type(getattr(peft_model, 'base_model', peft_model)).__name__}; "
            "use `push_to_hub` for other PEFT methods."
        )
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise ValueError(f"`repo_id` must be 'org/name' or 'name', got {repo_id!r}.")
    if revision is not None and (not isinstance(revision, str) or not revision.strip("/")):
        raise ValueError(f"`revision` must be a branch name or 'refs/pr/N', got {revision!r}.")
    if create_pr and revision is not None and revision.startswith("refs/pr/"):
        raise ValueError(f"`create_pr=True` opens a new pull request; to add a commit to the open one, push with "
                         f"revision={revision!r} and without `create_pr`.")
    api = HfApi(endpoint=endpoint, token=token, library_name="peft-asr", library_version=__version__)
    if (create_pr and revision not in (None, "main")) or (revision or "").startswith("refs/pr/"):
        _check_ref_exists(api, repo_id, revision, create_pr)  # before the repository is created or changed
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision not in (None, "main") and not create_pr and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, **save_kwargs)
        if tags:
            card_path = os.path.join(tmp, CARD_FILE)
            card = ModelCard.load(card_path)
            card.data.tags = sorted(set(card.data.tags or []) | set(tags))
            card.save(card_path)
        files = sorted(path.relative_to(tmp).as_posix() for path in Path(tmp).rglob("*") if path.is_file())
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(tmp, name)) for name in files]
        # a statistics file left by an earlier push would not match this router weight: deleted in the same commit
        # (a pull request starts from its base branch, so that is where the file is looked for)
        statistics = os.path.relpath(adapter_folder(tmp, peft_model.base_model._adapter), tmp).replace(os.sep, "/")
        statistics = STATISTICS_FILE if statistics == "." else f"{statistics}/{STATISTICS_FILE}"
        if statistics not in files and api.file_exists(repo_id, statistics, revision=revision):
            operations.append(CommitOperationDelete(path_in_repo=statistics))
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def _check_ref_exists(api, repo_id: str, revision: str, create_pr: bool) -> None:
    """A pull request's base branch, or the ``refs/pr/N`` a push adds to, must exist: say so before any change."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id!r} is not a repository on the Hub (or not one you can read), so it has no "
                         f"{revision!r} to push to; check the id (a full 'org/name').") from None
    if create_pr:
        branches = sorted(ref.name for ref in refs.branches)
        if revision not in branches:
            raise ValueError(f"`create_pr=True` opens a pull request against branch {revision!r}, which {repo_id} does "
                             f"not have (branches: {branches}). Push to it first (`revision={revision!r}` without "
                             "`create_pr`), or drop `revision` for a pull request against main.")
    elif revision not in {ref.ref for ref in refs.pull_requests or []}:
        raise ValueError(f"{repo_id} has no pull request {revision!r}; open one with `create_pr=True` (its "
                         "`CommitInfo.pr_revision` names it).")
