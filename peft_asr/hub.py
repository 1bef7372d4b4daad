"""Banks on disk and on the Hub: atomic saving, safe loading, the router-statistics file and the model card.

A bank is an ordinary PEFT adapter folder:

* ``adapter_config.json``: the `ASRConfig`, including the task list (it fixes every tensor shape);
* ``adapter_model.safetensors``: every task's LoRA subspace, the solved router weight and its class counts;
* ``router_statistics.safetensors`` (optional, ``E*E*8`` bytes): the router's sufficient statistics, needed only to
  keep learning tasks after a reload;
* ``README.md``: the model card (``library_name: peft``, base model, tasks, how to load).

**Loading reads safetensors and JSON only.** No pickle is ever opened: a bank whose weights exist only as
``adapter_model.bin`` is refused (PEFT would otherwise fall back to it), and files such as ``*.pt``/``*.pkl`` are
never looked at. Every file is checked (JSON keys and values, safetensors headers, statistics shapes and their
agreement with the saved router weight) *before* anything is loaded into the model, so a bad bank leaves the model as
it was.

**Saving is atomic.** ``save_pretrained`` writes the whole bank into a hidden sibling folder
``.<name>.tmp-<host>-<pid>-<random>`` (``<host>``: a short hash of this machine's name), fsyncs every file and the
folder, then swaps it into place:

* on Linux with one ``renameat2(RENAME_EXCHANGE)`` call: the destination always holds a complete bank, old or new.
  The old bank, now under the temporary name, is deleted afterwards; a crash before that leaves a hidden
  ``.tmp-`` sibling that the next save or load deletes.
* elsewhere (or where the filesystem refuses the exchange) with two renames: ``<name>`` -> ``.<name>.old-<token>``,
  then ``.<name>.tmp-<token>`` -> ``<name>``. A crash between them leaves no ``<name>``, but two complete banks;
  :func:`recover_bank` (run by every save and load of that path) renames the new one into place: the temporary folder
  is complete and fsynced before the first rename, and both siblings share the token.

Recovery touches ASR banks only: a folder (or a leftover) whose ``adapter_config.json`` is not an ASR bank's is left
alone, and a leftover is deleted only when it was written on this machine by a process that is gone (a process id
means nothing on another host sharing the filesystem). Leftovers of another host, or without a host (earlier
versions), are never deleted.

Files in the destination that the bank does not own (a tokenizer, a Trainer checkpoint's other files) are carried
over into the new folder as hard links, so they survive the swap.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import hashlib
import secrets
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ASRConfig, read_config_json
from .errors import BankError

__all__ = ["STATISTICS_FILE", "WEIGHTS_FILE", "is_asr_model", "save_bank", "load_bank", "check_bank", "recover_bank",
           "atomic_save", "write_model_card"]

STATISTICS_FILE = "router_statistics.safetensors"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
CONFIG_FILE = "adapter_config.json"
ROUTER_WEIGHT_KEY = "base_model.asr_router.weight"
ROUTER_COUNTS_KEY = "base_model.asr_router.class_counts"

# False forces the two-rename swap (used on systems without renameat2, and by the tests of that path)
USE_EXCHANGE = sys.platform.startswith("linux")


def is_asr_model(peft_model) -> bool:
    from .model import ASRModel

    return isinstance(getattr(peft_model, "base_model", None), ASRModel)


def _bank_dir(save_directory: str, adapter_name: str) -> str:
    # PEFT saves the adapter called "default" at the top of the folder, others in a sub-folder
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


# ---------------------------------------------------------------------------------------------------- atomic saving
def _host_id() -> str:
    """This machine, in a form a folder name can carry: ``h`` + 8 hex digits of a hash of the host name."""
    return "h" + hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _sibling_pattern(target: Path) -> re.Pattern:
    # the host part is absent in leftovers of earlier versions
    return re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(?:(h[0-9a-f]{{8}})-)?(\d+)-([0-9a-f]+)$")


def _siblings(target: Path) -> list[tuple[str, Optional[str], int, str, Path]]:
    """Leftovers of interrupted saves of ``target``: (kind, host or None, pid, token, path)."""
    pattern = _sibling_pattern(target)
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = pattern.match(name)
        if match:
            token = "-".join(part for part in (match[2], match[3], match[4]) if part)  # never split the folder name
            found.append((match[1], match[2], int(match[3]), token, target.parent / name))
    return found


def _is_asr_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an ASR bank's config (``peft_type: ASR``); unreadable or other configs: no."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        data = read_config_json(str(path))
    except (OSError, ValueError):  # unreadable, half-written or not JSON (ASRConfigError is a ValueError): not ours
        return False
    return isinstance(data, dict) and data.get("peft_type") == "ASR"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be saving right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # directories cannot be opened on some platforms (Windows): nothing to sync there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first), so the data is on disk before the swap renames it."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def recover_bank(path) -> bool:
    """Finish a save of ``path`` that was interrupted between its two renames; returns True when it did.

    Only the two-rename swap (see the module docstring) can leave ``path`` missing, and only then do
    ``.<name>.old-<token>`` (the previous bank) and ``.<name>.tmp-<token>`` (the new one) exist together: the
    temporary folder is complete and fsynced before the first rename, so it is renamed into place, provided it is an
    ASR bank. Any other leftover (a half-written or half-deleted folder) is never promoted; those written on this
    machine by processes that are gone are deleted, and only next to an ASR bank. Folders that are not ASR banks,
    and leftovers of other hosts, are left alone.
    """
    target = Path(os.path.abspath(os.fspath(path)))
    recovered = False
    if not os.path.lexists(target):
        leftovers = _siblings(target)
        olds = {token for kind, _, _, token, _ in leftovers if kind == "old"}
        pairs = sorted((p.stat().st_mtime_ns, p) for kind, _, _, token, p in leftovers
                       if kind == "tmp" and token in olds and _is_asr_folder(p))
        if pairs:
            os.rename(pairs[-1][1], target)
            _fsync_dir(target.parent)
            recovered = True
    if os.path.isdir(target) and _is_asr_folder(target):
        here = _host_id()
        for _, host, pid, _, leftover in _siblings(target):
            if host == here and not _alive(pid):
                shutil.rmtree(leftover, ignore_errors=True)
    return recovered


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False when the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _carry_over(old: Path, new: Path, dropped: set[str]) -> None:
    """Hard-link into ``new`` every entry of ``old`` that the new save did not write (files the bank does not own)."""
    for entry in os.scandir(old):
        dest = new / entry.name
        if entry.name in dropped:
            continue
        if entry.is_dir(follow_symlinks=False):
            if not dest.exists():
                dest.mkdir()
            if dest.is_dir() and not dest.is_symlink():
                _carry_over(Path(entry.path), dest, set())
        elif not os.path.lexists(dest):
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), dest)
                continue
            try:
                os.link(entry.path, dest)
            except OSError:
                shutil.copy2(entry.path, dest)


def _swappable(target: Path) -> bool:
    """False for folders that cannot be renamed away: a mount point, or the working directory (or a parent of it)."""
    if not target.is_dir():
        return True
    if os.path.ismount(target):
        return False
    cwd = Path(os.getcwd()).resolve()
    resolved = target.resolve()
    return not (cwd == resolved or resolved in cwd.parents)


def atomic_save(save_directory, write: Callable[[str], Any], dropped: Optional[set[str]] = None) -> Any:
    """Run ``write(folder)`` into a fresh hidden sibling of ``save_directory``, then swap it into place atomically.

    ``dropped``: names at the top of ``save_directory`` that must not be carried over from the previous content (bank
    files this save deliberately leaves out). Returns what ``write`` returned. See the module docstring.
    """
    if not isinstance(save_directory, (str, os.PathLike)):
        raise BankError(f"`save_directory` must be a path (str or os.PathLike), got {type(save_directory).__name__}.")
    target = Path(os.path.abspath(os.fspath(save_directory)))
    if os.path.lexists(target) and not target.is_dir():
        raise BankError(f"{target} exists and is not a folder; choose a folder to save the bank in.")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_bank(target)
    if not _swappable(target):
        warnings.warn(f"{target} is a mount point or the working directory: the bank is written in place, not "
                      "atomically. Save into a sub-folder to get atomic saves.", stacklevel=3)
        return write(str(target))
    token = f"{_host_id()}-{os.getpid()}-{secrets.token_hex(6)}"
    tmp = target.parent / f".{target.name}.tmp-{token}"
    old = target.parent / f".{target.name}.old-{token}"
    tmp.mkdir()
    swapped = False
    try:
        if target.is_dir() and (target / "README.md").is_file():
            shutil.copy2(target / "README.md", tmp / "README.md")  # PEFT and `write_card` update the card, as before
        result = write(str(tmp))
        if target.is_dir():
            _carry_over(target, tmp, dropped or set())
            os.chmod(tmp, target.stat().st_mode & 0o7777)  # an existing bank keeps its permissions
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # what a plain mkdir would give, not mkdtemp's 0o700
        _fsync_tree(tmp)
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif USE_EXCHANGE and _exchange(tmp, target):
            os.rename(tmp, old)  # `tmp` held the previous bank since the exchange
        else:
            os.rename(target, old)
            os.rename(tmp, target)  # a crash right before this line is what `recover_bank` repairs
        swapped = True
        _fsync_dir(target.parent)
    finally:
        if not swapped:
            if not os.path.lexists(target) and os.path.isdir(old):
                os.rename(old, target)  # the second rename failed: put the previous bank back
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return result


def save_bank(peft_model, original_save, save_directory, *args, **kwargs):
    """``PeftModel.save_pretrained`` for ASR banks: PEFT's files, the statistics and the model card, saved atomically."""
    safe = kwargs.get("safe_serialization", args[0] if args else True)
    if not safe:
        raise BankError("ASR banks are saved as safetensors only (pickle files can run code when read); drop "
                        "`safe_serialization=False`.")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise BankError(f"`save_directory` must be a path (str or os.PathLike), got {type(save_directory).__name__}.")
    tuner = peft_model.base_model
    tuner.router.solve()  # the saved weight must match the statistics
    if not kwargs.get("is_main_process", True):
        return original_save(peft_model, save_directory, *args, **kwargs)
    adapter = tuner._adapter
    config: ASRConfig = tuner.bank_config
    keep_statistics = config.save_router_statistics and tuner.router.has_statistics

    def write(folder: str):
        result = original_save(peft_model, folder, *args, **kwargs)
        if keep_statistics:
            save_file(tuner.router.statistics_state_dict(), os.path.join(_bank_dir(folder, adapter), STATISTICS_FILE),
                      metadata={"format": "pt"})  # one key: safetensors writes metadata in hash order
        write_model_card(peft_model, folder)
        return result

    # statistics that belong to an older state of the bank must not survive a save without them
    dropped = set() if keep_statistics else {STATISTICS_FILE if adapter == "default" else adapter}
    return atomic_save(save_directory, write, dropped)


# ---------------------------------------------------------------------------------------------------- safe loading
def _check_safetensors(path: str) -> None:
    try:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise BankError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from None


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    _check_safetensors(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise BankError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from None


def check_bank(folder: str) -> tuple[ASRConfig, Optional[dict[str, torch.Tensor]]]:
    """Check a bank folder without loading it into a model; returns its config and router statistics (or None).

    Reads only ``adapter_config.json`` and safetensors files. Raises :class:`~peft_asr.ASRConfigError` for a bad config
    and :class:`~peft_asr.BankError` for missing, pickle-only, truncated or mismatched files.
    """
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise BankError(f"{folder} has no {CONFIG_FILE}; it is not a saved bank.")
    config = ASRConfig.from_pretrained(folder)
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_FILE)):
            raise BankError(
                f"{folder} holds only {PICKLE_WEIGHTS_FILE} (a pickle file, which can run code when read); ASR banks "
                "load from safetensors only. Re-save the bank with `save_pretrained` (safetensors)."
            )
        raise BankError(f"{folder} has no {WEIGHTS_FILE}; it is not a saved bank.")
    _check_safetensors(weights)
    with safe_open(weights, framework="pt") as handle:
        keys = set(handle.keys())
        if ROUTER_WEIGHT_KEY not in keys or ROUTER_COUNTS_KEY not in keys:
            raise BankError(f"{weights} has no router weight ({ROUTER_WEIGHT_KEY}); it is not an ASR bank's weights file.")
        weight = handle.get_tensor(ROUTER_WEIGHT_KEY)
        counts = handle.get_tensor(ROUTER_COUNTS_KEY)
    dim = config.feature_dim or config.base_hidden_size
    classes = config.num_tasks + 1
    if dim is not None and (tuple(weight.shape) != (dim, classes) or weight.dtype != torch.float64):
        raise BankError(
            f"{weights}: the router weight has shape {tuple(weight.shape)} ({weight.dtype}), but the config's "
            f"{config.num_tasks} tasks and feature size {dim} need ({dim}, {classes}) float64: the files come from "
            "different banks."
        )
    path = os.path.join(folder, STATISTICS_FILE)
    if not os.path.isfile(path):
        return config, None
    stats = _read_safetensors(path)
    _check_statistics(path, stats, config, weight, counts)
    return config, stats


def _check_statistics(path: str, stats: dict, config: ASRConfig, weight: torch.Tensor, counts: torch.Tensor) -> None:
    """The statistics file must have the bank's shapes and be the one the saved router weight was solved from."""
    dim, classes = weight.shape
    grams = classes if config.per_task_statistics else 1
    expected = {"class_gram": (grams, dim, dim), "cross": (dim, classes), "class_counts": (classes,)}
    for name, shape in expected.items():
        tensor = stats.get(name)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != torch.float64:
            got = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise BankError(
                f"{path}: `{name}` is {got}, expected {shape} float64: the statistics file does not belong to this "
                "bank. Delete it to load the bank for routing only."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise BankError(f"{path}: `{name}` holds NaN or inf values; the file is corrupt. Delete it to route only.")
    if not torch.equal(stats["class_counts"], counts):
        raise BankError(
            f"{path} does not match the router saved in the bank (class counts {stats['class_counts'].tolist()} vs "
            f"{counts.tolist()}): they come from different saves. Delete the statistics file to load the bank for "
            "routing only."
        )
    # the saved weight solves (G + ridge I) W = C: check the residual instead of re-solving (O(E^2 K), not O(E^3))
    gram = stats["class_gram"].sum(0)
    residual = gram @ weight + config.ridge * weight - stats["cross"]  # (E, K)
    scale = (gram.norm() + config.ridge) * weight.norm() + stats["cross"].norm()
    if not float(residual.norm()) <= 1e-8 * float(scale):
        raise BankError(
            f"{path} does not match the router weight saved in the bank (they come from different saves); "
            "delete the statistics file to load the bank for routing only."
        )


def _hub_file(model_id: str, filename: str, subfolder: Optional[str], hub_kwargs: dict) -> Optional[str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    keys = ("revision", "cache_dir", "token", "local_files_only", "repo_type")
    try:
        return hf_hub_download(
            model_id, filename, subfolder=subfolder, **{k: hub_kwargs[k] for k in keys if k in hub_kwargs}
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _local_bank(model_id, subfolder: Optional[str], hub_kwargs: dict) -> str:
    """The local folder holding the bank: the folder itself, or the Hub cache folder its files were downloaded to."""
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    recover_bank(local)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise BankError(f"{local} is a file; a bank is a folder.")
    if os.path.isabs(model_id) or model_id.startswith(".") or os.sep + os.sep in model_id:
        raise BankError(f"{local} does not exist.")
    try:
        found = _hub_file(model_id, CONFIG_FILE, subfolder, hub_kwargs)
    except Exception as err:  # the Hub client raises many types (bad id, offline, no access): one clear error
        raise BankError(f"cannot load {model_id!r}: no such folder, and the Hub download failed ({err}).") from err
    if found is None:
        raise BankError(f"{model_id!r} is neither a local folder nor a Hub repo with {CONFIG_FILE}.")
    weights = _hub_file(model_id, WEIGHTS_FILE, subfolder, hub_kwargs)
    if weights is None:
        raise BankError(
            f"{model_id} has no {WEIGHTS_FILE}; ASR banks load from safetensors only (a pickle file is never read)."
        )
    _hub_file(model_id, STATISTICS_FILE, subfolder, hub_kwargs)  # optional: into the same cache folder
    return os.path.dirname(weights)


def preflight(model_id, subfolder: Optional[str] = None, hub_kwargs: Optional[dict] = None) -> None:
    """Before ``PeftModel.from_pretrained`` changes the base model: finish an interrupted save and check the bank.

    Does nothing for adapters of other PEFT methods and for Hub ids (checked by :func:`load_bank` once downloaded).
    """
    if not isinstance(model_id, (str, os.PathLike)):
        return
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    recover_bank(local)
    if not os.path.isfile(os.path.join(local, CONFIG_FILE)):
        return
    data = read_config_json(os.path.join(local, CONFIG_FILE))
    if isinstance(data, dict) and data.get("peft_type") == "ASR":
        check_bank(local)


def load_bank(peft_model, original_load, model_id, adapter_name, *args, **kwargs):
    """``PeftModel.load_adapter`` for ASR banks: check every file first, load with PEFT, then restore the statistics."""
    if not isinstance(model_id, (str, os.PathLike)):
        raise BankError(f"`model_id` must be a folder or a Hub repo id (str), got {type(model_id).__name__}.")
    model_id = os.fspath(model_id)
    _, stats = check_bank(_local_bank(model_id, kwargs.get("subfolder"), kwargs))
    result = original_load(peft_model, model_id, adapter_name, *args, **kwargs)
    router = peft_model.base_model.router
    if stats is None:
        router.mark_loaded_without_statistics()
    else:
        router.load_statistics(stats, solved=True)  # `check_bank` showed the saved weight solves them
    return result


def write_model_card(peft_model, save_directory: str) -> None:
    """Rewrite ``README.md`` (already created by PEFT) with the bank's description, keeping PEFT's metadata."""
    tuner = peft_model.base_model
    write_card(save_directory, tuner.bank_config, tuner.router.class_counts.tolist(),
               os.path.exists(os.path.join(_bank_dir(save_directory, tuner._adapter), STATISTICS_FILE)))


def write_card(save_directory: str, config: ASRConfig, counts: list[float], has_statistics: bool) -> None:
    """Write the model card of a bank from its config and its router's class counts (merged banks use this too)."""
    from huggingface_hub import ModelCard

    path = os.path.join(save_directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("---\nlibrary_name: peft\n---\n")
    data = card.data
    data.library_name = "peft"
    tags = set(data.tags or []) | {"peft", "peft-asr", "continual-learning", "lora", "analytic-subspace-routing"}
    data.tags = sorted(tags)
    if config.base_model_name_or_path and not data.base_model:
        data.base_model = config.base_model_name_or_path
    rows = "\n".join(
        f"| {i + 1} | `{task}` | {int(counts[i + 1])} |" for i, task in enumerate(config.tasks)
    ) or "| - | (no task yet) | - |"
    stats = "included" if has_statistics else "not included (routing only)"
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    body = f"""
# Analytic Subspace Routing bank

This is a bank of per-task LoRA subspaces trained with **Analytic Subspace Routing** (Any-SSR, arXiv 2503.13575)
using [peft-asr](https://pypi.org/project/peft-asr/). A router, fitted in closed form on frozen features of the first
{config.router_layer} blocks of the base model, sends every input to the subspace of its task, so earlier tasks are
never forgotten.

- Base model: `{config.base_model_name_or_path}`
- Tasks: {len(config.tasks)}; LoRA rank {config.r}, alpha {config.lora_alpha}, targets {targets}
- Router: layer {config.router_layer}, feature dim {config.feature_dim or config.base_hidden_size}, activation `{config.activation}`, ridge {config.ridge}
- Base route (general data) fitted: {"yes" if counts and counts[0] > 0 else "no"}; router statistics: {stats}

| # | task | router samples |
|---|---|---|
{rows}

## How to load

```python
import peft_asr  # registers the ASR method with PEFT; must come before loading
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{config.base_model_name_or_path}")
model = PeftModel.from_pretrained(base, "<this repo or folder>")
print(model.route(**batch))  # the task chosen for each prompt
```
"""
    card.text = body
    card.save(path)



def _pct(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def write_results_to_card(bank_dir, results: dict) -> None:
    """Append a stream run's scores (per task after the last stage, OP/BWT/FWT, routing accuracy) to a bank's card."""
    from huggingface_hub import ModelCard

    path = os.path.join(str(bank_dir), "README.md")
    card = ModelCard.load(path)
    tasks = results["tasks"]
    last = results["matrix"][-1] if results.get("matrix") else [None] * len(tasks)
    steps = {t["task"]: t.get("steps") for t in results.get("timings", [])}
    rows = "\n".join(f"| `{t}` | {steps.get(t, '-')} | {_pct(s)} |" for t, s in zip(tasks, last))
    names = {"op": "OP (average score)", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting",
             "routing_accuracy": "routing accuracy"}
    summary = "\n".join(
        f"- {names.get(k, k)}: {_pct(v, signed=k in ('bwt', 'fwt', 'forgetting'))}"
        for k, v in results.get("summary", {}).items()
    )
    card.text += f"""
## Evaluation (after the last task, greedy decoding, scores in %)

| task | training steps | score |
|---|---|---|
{rows}

{summary}
"""
    card.save(path)
