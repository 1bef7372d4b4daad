"""0.1.0's module paths still import, every public name from where it was, with a DeprecationWarning; the modules
that hold the names now keep their own identity."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

# `__all__` of every module of 0.1.0 (commit 025eff0's layout), less the three names removed on purpose
# (CHANGELOG "Removed": `layer.grouped_delta` / `layer.ROUTED_KERNELS`, `data.shard_batches`)
OLD = {
    "config": "ASRConfig BASE_ROUTE validate_task_name FORMAT_VERSION read_config_json check_config_dict",
    "layer": "ASRLayer Linear gathered_delta",
    "model": "ASRModel",
    "routing": "RoutingCall plan_call routing_hooks task_ids_from_names generate_prompt",
    "features": "prompt_mask masked_mean positions_from_mask is_packed unpack_rows IGNORE_INDEX",
    "router": "AnalyticRouter BASE_CLASS",
    "rls": "RouterNumericalError accumulate ridge_solve woodbury_init woodbury_update joint_solve one_hot",
    "validation": "check_batch check_batches check_features",
    "callback": "ASRCallback",
    "errors": "ASRError ASRConfigError ASRConfigTypeError BankError RouterNumericalError",
    "hub": "STATISTICS_FILE WEIGHTS_FILE is_asr_model save_bank load_bank check_bank recover_bank atomic_save "
           "write_model_card CONFIG_FILE PICKLE_WEIGHTS_FILE ROUTER_WEIGHT_KEY ROUTER_COUNTS_KEY USE_EXCHANGE "
           "preflight write_card write_results_to_card",
    "hub_upload": "push_bank_to_hub",
    "merge": "merge_banks",
    "data": "IGNORE_INDEX METRICS TRACE_METRICS Task load_prompt_answer_json load_trace_task load_olora_task "
            "olora_prompt load_hf_task format_prompt tokenize_examples PromptAnswerCollator prompt_batches",
    "metrics": "average_performance backward_transfer forward_transfer forgetting cl_summary routing_confusion "
               "routing_accuracy exact_match first_letter_accuracy rouge_l sari edit_similarity SCORERS get_scorer",
    "continual": "StreamResults run_stream generate_answers evaluate_tasks evaluate_routing METHODS DEFAULT_TRAINING",
    "plots": "plot_accuracy_matrices plot_routing_confusion",
    "demo": "run_demo format_tables SETTINGS",
    "demo_stream": "demo_stream general_prompts",
    "default_model": "DEFAULT_MODEL INSTALL_HINT default_model_path load_model_and_tokenizer",
}


def test_every_name_of_an_old_path_imports_from_it():
    """In a fresh interpreter (so each old path is imported for the first time), with ImportWarning an error."""
    code = f"""
import warnings
warnings.simplefilter("error", ImportWarning)
failures = []
for module, names in {OLD!r}.items():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            exec(f"from peft_asr.{{module}} import {{', '.join(names.split())}}")
        except Exception as err:
            failures.append(f"{{module}}: {{type(err).__name__}}: {{err}}")
            continue
    moved = [w for w in seen if issubclass(w.category, DeprecationWarning) and "moved to" in str(w.message)]
    if module != "demo" and not moved:  # `peft_asr.demo` is still a module path: no warning
        failures.append(f"{{module}}: no DeprecationWarning")
assert not failures, failures
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_new_modules_keep_their_spec_and_writes_go_where_the_name_lives(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_hub = importlib.import_module("peft_asr.hub")
        old_data = importlib.import_module("peft_asr.data")
    import peft_asr
    import peft_asr.bank as bank
    import peft_asr.bank.atomic as atomic
    import peft_asr.cl as cl

    assert bank.__spec__.name == "peft_asr.bank" and cl.__spec__.name == "peft_asr.cl"
    assert old_hub.check_bank is bank.check_bank and old_data.Task is cl.Task
    assert peft_asr.hub is old_hub  # an attribute of the package, as in 0.1.0
    monkeypatch.setattr(atomic, "USE_EXCHANGE", atomic.USE_EXCHANGE)  # restored after the test
    old_hub.USE_EXCHANGE = not atomic.USE_EXCHANGE
    assert atomic.USE_EXCHANGE == old_hub.USE_EXCHANGE


def test_a_removed_name_says_where_to_look():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_layer = importlib.import_module("peft_asr.layer")
    with pytest.raises(AttributeError, match="docs/architecture.md"):
        old_layer.grouped_delta
