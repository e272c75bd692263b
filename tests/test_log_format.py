"""The supervisor's log formatter: no raw control character, no forged log line, tracebacks intact."""
import logging

from carrot.text import LogFormatter


def test_control_characters_are_escaped_and_a_line_break_cannot_start_a_fake_log_line():
    formatter = LogFormatter('%(levelname)s %(name)s: %(message)s')
    record = logging.LogRecord('carrot.schedule.scheduler', logging.ERROR, __file__, 1,
                               'skipped %s', ('tasks.add\x1b[2J\nINFO carrot: FAKE LOG LINE\x00',), None)
    line = formatter.format(record)
    assert '\x1b' not in line and '\x00' not in line
    assert line.splitlines() == ['ERROR carrot.schedule.scheduler: skipped tasks.add\\x1b[2J',
                                 '    INFO carrot: FAKE LOG LINE\\x00']


def test_a_traceback_keeps_its_lines():
    formatter = LogFormatter('%(message)s')
    try:
        raise ValueError('boom')
    except ValueError:
        import sys
        record = logging.LogRecord('carrot', logging.ERROR, __file__, 1, 'failed', (), sys.exc_info())
    text = formatter.format(record)
    assert text.startswith('failed\nTraceback (most recent call last):\n') and 'ValueError: boom' in text
