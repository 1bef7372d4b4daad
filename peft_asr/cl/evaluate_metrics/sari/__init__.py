"""Folder of the ``sari`` metric script; a package so that the script ships with ``peft_asr``."""
