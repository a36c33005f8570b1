import signal

import pytest

from psearch.engine.stopping import StopFlag, StopRequested, is_escalation


def test_only_a_later_second_ctrl_c_escalates():
    assert is_escalation(signal.SIGINT, 2.0)
    assert not is_escalation(signal.SIGINT, 0.1)      # the same keypress delivered twice
    assert not is_escalation(signal.SIGTERM, 5.0)     # scancel + forwarded SIGTERM, pdeathsig


def test_first_signal_only_flags_unless_the_code_cannot_poll():
    flag = StopFlag()
    flag.handle(signal.SIGTERM, None)
    assert flag.requested and flag.exit_code == 143
    flag.handle(signal.SIGTERM, None)                 # a burst of SIGTERMs: still just a flag
    with pytest.raises(StopRequested):
        flag.check()
    raising = StopFlag()
    raising.raise_now = True
    with pytest.raises(StopRequested):
        raising.handle(signal.SIGINT, None)
    assert raising.exit_code == 130
