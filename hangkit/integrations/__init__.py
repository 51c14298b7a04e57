"""Progress beats from the training frameworks, in one line of the user's code.

- `hangkit.integrations.lightning.HangkitCallback`: a PyTorch Lightning callback
  (`Trainer(callbacks=[HangkitCallback()])`), for `lightning.pytorch` or `pytorch_lightning`.
- `hangkit.integrations.transformers.HangkitCallback`: a transformers `TrainerCallback`
  (`Trainer(..., callbacks=[HangkitCallback()])`).

Each calls `hangkit.progress(step=, phase=, epoch=)` at the points the framework's loop passes
through, so `hangkit watch --progress-timeout auto` works with no loop of the user's own.

Importing this package imports neither framework (nor does `import hangkit` import this
package): a framework is imported only with the module that needs it, and a missing one is an
ImportError that says what to install.
"""
