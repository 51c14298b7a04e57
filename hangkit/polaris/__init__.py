"""Polaris specifics that run in a shell on a login or compute node: the PBS job script
(`hangkit polaris job`, in jobscript.py)."""
