"""``peft-asr demo``: the built-in task stream (``stream``) and the run that trains and reports (``run``), on the
embedded default model (:mod:`peft_asr.cl.default_model`). Built on :mod:`peft_asr.cl`."""

from .stream import demo_stream, general_prompts

__all__ = ["run_demo", "format_tables", "demo_stream", "general_prompts"]


def __getattr__(name: str):
    if not name.startswith("__"):  # the run imports the whole toolkit: only when asked for (run_demo, SETTINGS)
        import importlib

        run = importlib.import_module(f"{__name__}.run")
        if hasattr(run, name):
            return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
