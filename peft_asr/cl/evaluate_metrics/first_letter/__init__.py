"""Folder of the ``first_letter`` metric script; a package so that the script ships with ``peft_asr``."""
