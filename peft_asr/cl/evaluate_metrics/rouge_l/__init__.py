"""Folder of the ``rouge_l`` metric script; a package so that the script ships with ``peft_asr``."""
