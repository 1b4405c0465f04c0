"""Child processes that Ctrl-C reaches however the test run itself was started."""

import signal


def default_sigint() -> None:
    """Popen's preexec_fn: a shell without job control starts background jobs with SIGINT ignored, children
    inherit that, and Python then installs no KeyboardInterrupt handler; a user's Ctrl-C always arrives."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
