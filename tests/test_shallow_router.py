"""`ShallowRouter`: the router of a bank on the blocks below ``router_layer`` only. Its scores equal the full
model's (``PeftModel.from_pretrained(base, bank)``) on tiny Llama and GPT-2 checkpoints (left padding, labels, packed
rows, a batch of mixed prompts); the deep blocks and the LM head are never built; a loaded model is used as it is; a
router-only folder round-trips; bad input fails before the model is read."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, right_pad, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import peft_asr
from peft_asr import ASRConfig, BankError, ShallowRouter
from peft_asr.deploy.shallow_router import ROUTER_FILE, save_router


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster

FAMILIES = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "gpt2": (tiny_gpt2, ["c_attn"])}


def make_bank(family: str, root, router_layer: int = 2, **config):
    """A saved base checkpoint and a saved two-task bank on it (router fitted on left-padded prompts)."""
    build, targets = FAMILIES[family]
    base_dir, bank_dir = root / "base", root / "bank"
    base = build()
    base.save_pretrained(base_dir)
    base.name_or_path = str(base_dir)  # as `from_pretrained(base_dir)` sets it: the bank records it
    model = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets,
                                           router_layer=router_layer, **config))
    for name, ids, seed in (("alpha", ALPHA_IDS, 1), ("beta", BETA_IDS, 2)):
        model.add_task(name)
        model.fit_router([left_pad(prompts(*ids, 32, seed=seed))], task=name, progress=False)
    model.fit_router([left_pad(prompts(90, 120, 16, seed=3))], task=None, progress=False)  # the base route
    model.save_pretrained(bank_dir)
    return base_dir, bank_dir


ROUTERS = {"default": {}, "paper": {"router_head": "ridge", "router_pooling": "mean"}}  # the config's and the paper's


@pytest.fixture(scope="module", params=[(f, r) for f in sorted(FAMILIES) for r in ROUTERS], ids="-".join)
def saved(request, tmp_path_factory):
    family, settings = request.param
    base_dir, bank_dir = make_bank(family, tmp_path_factory.mktemp(family), **ROUTERS[settings])
    full = PeftModel.from_pretrained(FAMILIES[family][0](), str(bank_dir)).eval()
    return family, base_dir, bank_dir, full


MIXED = prompts(*ALPHA_IDS, 3, seed=11) + prompts(*BETA_IDS, 3, seed=12, min_len=2) + prompts(90, 120, 2, seed=13)


def _batches():
    rows = MIXED
    labelled = right_pad([r + [5, 6, 2] for r in rows])
    labelled["labels"] = torch.full_like(labelled["input_ids"], -100)
    for i, r in enumerate(rows):  # the answer (3 tokens after each prompt) must not reach the router
        labelled["labels"][i, len(r):len(r) + 3] = torch.tensor([5, 6, 2])
    a, b = rows[0], rows[3]
    packed = {"input_ids": torch.tensor([a + b]), "position_ids": torch.tensor([list(range(len(a))) + list(range(len(b)))])}
    return {"left": left_pad(rows), "right": right_pad(rows), "labels": labelled, "packed": packed}


@pytest.mark.parametrize("kind", ["left", "right", "labels", "packed"])
def test_scores_and_routes_equal_the_full_models(saved, kind):
    family, base_dir, bank_dir, full = saved
    router = ShallowRouter.from_pretrained(bank_dir, base_dir)
    batch = _batches()[kind]
    ours, theirs = router.route_scores(**batch, include_base=True), full.route_scores(**batch, include_base=True)
    assert ours.dtype == torch.float64 and ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-10), (ours - theirs).abs().max()
    assert router.route(**batch) == full.route(**batch)
    assert torch.equal(router.route_scores(**batch), theirs[:, 1:])  # columns in `tasks` order, base route dropped


def test_a_mixed_batch_goes_to_every_route(saved):
    family, base_dir, bank_dir, full = saved
    router = ShallowRouter.from_pretrained(bank_dir, base_dir)
    routes = router.route(**left_pad(MIXED))
    assert routes == full.route(**left_pad(MIXED))
    assert set(routes) == {"alpha", "beta", "__base__"} and routes[:3] == ["alpha"] * 3
    assert router.tasks == ["alpha", "beta"]


def test_left_padding_does_not_change_a_rows_scores(saved):
    family, base_dir, bank_dir, _ = saved  # GPT-2: absolute positions, taken from the mask as `generate` does
    router = ShallowRouter.from_pretrained(bank_dir, base_dir)
    padded = router.route_scores(**left_pad(MIXED))
    alone = torch.cat([router.route_scores(**left_pad([row])) for row in MIXED])
    assert torch.allclose(padded, alone, rtol=0, atol=1e-5)


def _param_names(module):
    return {n for n, _ in module.named_parameters()}


def test_deep_blocks_and_lm_head_are_never_built(saved):
    family, base_dir, bank_dir, full = saved
    router = ShallowRouter.from_pretrained(bank_dir, base_dir)
    base = full.get_base_model()
    inner = base.base_model  # LlamaModel / GPT2Model: what the shallow router's model is a cut of
    blocks = inner.layers if family == "llama" else inner.h
    shallow_blocks = router.model.layers if family == "llama" else router.model.h
    assert type(router.model) is type(inner) and len(shallow_blocks) == 2 < len(blocks)
    assert not any("lm_head" in n for n, _ in router.named_modules())
    # exactly the embeddings, blocks 0 and 1 and the final norm of the checkpoint
    wanted = {n for n, p in inner.named_parameters() if not any(f".{i}." in f".{n}" for i in range(2, len(blocks)))
              and ".asr_" not in n and ".base_layer." not in n}
    wanted |= {n.replace(".base_layer.", ".") for n, _ in inner.named_parameters() if ".base_layer." in n
               and not any(f".{i}." in f".{n}" for i in range(2, len(blocks)))}
    assert {n.removeprefix("model.") for n in _param_names(router) if n.startswith("model.")} == wanted
    full_count = sum(p.numel() for p in FAMILIES[family][0]().parameters())
    ours = sum(p.numel() for p in router.model.parameters())
    assert ours < full_count * 0.75, (ours, full_count)


def test_a_loaded_model_is_used_without_a_copy(saved):
    family, base_dir, bank_dir, full = saved
    base = FAMILIES[family][0]()
    was_training = base.train().training
    router = ShallowRouter.from_pretrained(bank_dir, base)
    assert router.model is base and base.training == was_training  # its mode is the caller's, too
    assert {p.data_ptr() for p in router.model.parameters()} == {p.data_ptr() for p in base.parameters()}
    batch = left_pad(MIXED)
    assert torch.allclose(router.route_scores(**batch), full.route_scores(**batch), rtol=0, atol=1e-10)
    # the full PeftModel itself: its inner model is used, the router stops before the ASR layers
    again = ShallowRouter.from_pretrained(bank_dir, full)
    assert again.model is full.get_base_model()
    assert torch.equal(again.route_scores(**batch), full.route_scores(**batch))


def test_router_only_folder_round_trip(saved, tmp_path):
    family, base_dir, bank_dir, full = saved
    folder = tmp_path / "router"
    save_router(folder, full.peft_config["default"], full.base_model.router)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", ROUTER_FILE]
    with safe_open(str(bank_dir / "adapter_model.safetensors"), framework="pt") as handle:
        bank_keys = {k: handle.get_tensor(k) for k in handle.keys()}
    router_keys = {k for k in bank_keys if k.startswith("base_model.asr_router.")}
    assert {"base_model.asr_router.weight", "base_model.asr_router.class_counts"} <= router_keys < set(bank_keys)
    with safe_open(str(folder / ROUTER_FILE), framework="pt") as handle:  # the router's tensors, nothing else
        assert set(handle.keys()) == router_keys
        assert all(torch.equal(handle.get_tensor(k), bank_keys[k]) for k in router_keys)
    assert json.loads((folder / "adapter_config.json").read_text())["tasks"] == ["alpha", "beta"]
    router = ShallowRouter.from_pretrained(folder, base_dir)
    batch = left_pad(MIXED)
    assert torch.equal(router.route_scores(**batch, include_base=True), full.route_scores(**batch, include_base=True))
    with pytest.raises(BankError, match="adapter_model.safetensors"):  # never taken for a bank with no task weights
        PeftModel.from_pretrained(FAMILIES[family][0](), str(folder))
    with pytest.raises(FileExistsError, match="not empty"):
        save_router(folder, full.peft_config["default"], full.base_model.router)


def test_router_layer_zero_reads_the_embeddings(tmp_path):
    base_dir, bank_dir = make_bank("gpt2", tmp_path, router_layer=0)
    full = PeftModel.from_pretrained(tiny_gpt2(), str(bank_dir)).eval()
    router = ShallowRouter.from_pretrained(bank_dir, base_dir)
    assert len(router.model.h) == 0
    batch = left_pad(MIXED)
    assert torch.allclose(router.route_scores(**batch), full.route_scores(**batch), rtol=0, atol=1e-10)


def test_the_statistics_file_is_never_read(tmp_path):
    base_dir, bank_dir = make_bank("llama", tmp_path)
    (bank_dir / "router_statistics.safetensors").write_bytes(b"not a safetensors file")
    router = ShallowRouter.from_pretrained(bank_dir, base_dir)  # the bank loader would refuse this file
    assert router.route(**left_pad(MIXED[:1])) == ["alpha"]
    with pytest.raises(BankError):
        PeftModel.from_pretrained(tiny_llama(), str(bank_dir))
    with pytest.raises(RuntimeError, match="without its statistics"):
        router.router.partial_fit(torch.zeros(1, 32, dtype=torch.float64), 1)


@pytest.fixture(scope="module")
def llama_bank(tmp_path_factory):
    return make_bank("llama", tmp_path_factory.mktemp("errors"))


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_banks_fail_clearly(llama_bank, tmp_path):
    base_dir, bank_dir = llama_bank
    with pytest.raises(BankError, match="does not exist|neither a folder"):
        ShallowRouter.from_pretrained(tmp_path / "nothing", base_dir)
    with pytest.raises(BankError, match="is a file"):
        (tmp_path / "file").write_text("x")
        ShallowRouter.from_pretrained(tmp_path / "file", base_dir)
    with pytest.raises(BankError, match="no adapter_config.json"):
        ShallowRouter.from_pretrained(base_dir, base_dir)
    pickled = _copy(bank_dir, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(BankError, match="pickle"):
        ShallowRouter.from_pretrained(pickled, base_dir)
    truncated = _copy(bank_dir, tmp_path / "truncated")
    (truncated / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(BankError, match="not a readable safetensors"):
        ShallowRouter.from_pretrained(truncated, base_dir)
    with pytest.raises(TypeError, match="`bank` must be a folder"):
        ShallowRouter.from_pretrained(3, base_dir)


def test_an_unfitted_router_is_refused(tmp_path):
    base = tiny_llama()
    model = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], router_layer=2))
    model.add_task("alpha")
    model.save_pretrained(tmp_path / "bank")
    with pytest.raises(BankError, match="never fitted"):
        ShallowRouter.from_pretrained(tmp_path / "bank", base)


def test_a_base_model_that_does_not_fit_fails_before_loading(llama_bank, tmp_path):
    base_dir, bank_dir = llama_bank
    tiny_llama(hidden=64).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden size 32, but .* has hidden size 64"):
        ShallowRouter.from_pretrained(bank_dir, tmp_path / "wide")
    tiny_llama(layers=6).save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match="with 4 blocks, but .* has 6"):
        ShallowRouter.from_pretrained(bank_dir, tmp_path / "deep")
    with pytest.raises(ValueError, match="has 6 blocks in `model.layers`; the bank needs 4 .* or 2"):
        ShallowRouter.from_pretrained(bank_dir, tiny_llama(layers=6))
    with pytest.raises(ValueError, match="hidden size 64"):
        ShallowRouter.from_pretrained(bank_dir, tiny_llama(hidden=64))
    with pytest.raises(TypeError, match="apply to loading a checkpoint"):
        ShallowRouter.from_pretrained(bank_dir, tiny_llama(), dtype=torch.float16)
    config = json.loads((bank_dir / "adapter_config.json").read_text())
    anonymous = _copy(bank_dir, tmp_path / "anonymous")
    (anonymous / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=None)))
    with pytest.raises(ValueError, match="records no base model"):
        ShallowRouter.from_pretrained(anonymous)
    assert ShallowRouter.from_pretrained(bank_dir).route(**left_pad(MIXED[:1])) == ["alpha"]  # the bank's own base


def test_a_checkpoint_missing_shallow_weights_is_refused(llama_bank, tmp_path):
    from safetensors.torch import load_file, save_file

    base_dir, bank_dir = llama_bank
    broken = _copy(base_dir, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]  # a shallow block's weight
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights the router's blocks need: .*layers.1.mlp.up_proj"):
        ShallowRouter.from_pretrained(bank_dir, broken)
    del state["model.layers.3.mlp.up_proj.weight"]  # a deep block's weight: not needed, not read
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    ShallowRouter.from_pretrained(bank_dir, broken)


def test_no_load_report_of_the_skipped_blocks(llama_bank, caplog):
    base_dir, bank_dir = llama_bank
    with caplog.at_level("WARNING"):
        ShallowRouter.from_pretrained(bank_dir, base_dir)
    assert not any("LOAD REPORT" in r.getMessage() for r in caplog.records)
    assert peft_asr.ShallowRouter is ShallowRouter and "ShallowRouter" in peft_asr.__all__


def test_a_hub_bank_goes_through_the_bank_download(llama_bank, monkeypatch):
    from peft_asr.deploy import shallow_router

    base_dir, bank_dir = llama_bank
    calls = []

    def fake_preflight(model_id, kwargs):
        calls.append((model_id, kwargs))
        return str(bank_dir)

    monkeypatch.setattr(shallow_router, "preflight", fake_preflight)
    router = ShallowRouter.from_pretrained("org/bank", base_dir, bank_kwargs={"revision": "v1"})
    assert calls == [("org/bank", {"revision": "v1"})] and router.tasks == ["alpha", "beta"]
    monkeypatch.setattr(shallow_router, "preflight", lambda model_id, kwargs: None)
    with pytest.raises(BankError, match="neither a folder here nor an ASR bank on the Hub"):
        ShallowRouter.from_pretrained("org/other", base_dir)
