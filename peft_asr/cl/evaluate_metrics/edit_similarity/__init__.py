"""Folder of the ``edit_similarity`` metric script; a package so that the script ships with ``peft_asr``."""
