# The user's own sitecustomize (tests copy it into a directory of theirs as sitecustomize.py):
# it must still run under hangkit's hook.
import os

with open(os.environ["USER_SITECUSTOMIZE_MARK"], "a") as f:
    f.write(f"ran in {os.getpid()}\n")
