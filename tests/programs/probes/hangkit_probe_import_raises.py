"""A module whose import raises, like a package built against a library that is not there: for
the imports probe's HANGKIT_DOCTOR_IMPORTS."""

raise ImportError("libhangkit_probe.so.3: cannot open shared object file: No such file or "
                  "directory")
