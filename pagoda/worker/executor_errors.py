"""Worker layer: the error an executor raises once its workers cannot serve, importable without torch.

The engine process catches it to end itself (`pagoda.engine.core_proc`),
so it must not drag the model code into a front end that only names it.
"""


class ExecutorFailedError(RuntimeError):
    """A worker died, stopped, or failed a call: the executor serves nothing more."""
