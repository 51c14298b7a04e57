"""The monitor: runs where the person is (a shell running `hangkit watch`, later a notebook kernel).

It finds a job's processes, captures their stacks, merges and diagnoses them, and writes reports.
"""
