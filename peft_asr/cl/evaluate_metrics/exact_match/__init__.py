"""Folder of the ``exact_match`` metric script; a package so that the script ships with ``peft_asr``."""
