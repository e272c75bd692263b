"""What makes a ScheduledTask runnable: the one set of rules that the model's clean() (the admin, the
monitor's form), the scheduler and `create_scheduled_task` all apply.

A schedule is runnable when its task is registered, its arguments can be read (JSON, or 1.x's
"a, b, c"; at most `arguments.MAX_TEXT` characters and `arguments.MAX_DEPTH` levels per field) and fit
the task's signature, its interval is a whole number of seconds, minutes, hours or days from 1 second to
MAX_INTERVAL, its queue is configured, and its next run falls inside the calendar.
`schedule_problems()` names every problem by field; `check_schedule()` raises the first.
"""
from __future__ import annotations

from datetime import timedelta

from carrot import registry
from carrot.config import get_config
from carrot.exceptions import (CarrotConfigException, InvalidArguments, InvalidCall, InvalidSchedule,
                               TaskNotRegistered)
from carrot.names import check_name
from carrot.publish import arguments

SECONDS_PER = {'seconds': 1, 'minutes': 60, 'hours': 3600, 'days': 86400}
MAX_INTERVAL = timedelta(days=3650)  # a longer interval is a typo, not a schedule


def interval_problem(unit, count) -> str | None:
    """What is wrong with an interval of `count` `unit` (one sentence), or None."""
    if unit not in SECONDS_PER:
        return f'the interval unit {unit!r} is not one of {", ".join(SECONDS_PER)}'
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return f'the interval must be a whole number of {unit}, at least 1 (got {count!r})'
    if count * SECONDS_PER[unit] > MAX_INTERVAL.total_seconds():
        most = int(MAX_INTERVAL.total_seconds()) // SECONDS_PER[unit]
        return (f'the interval of {count} {unit} is longer than the longest allowed: at most {most} {unit} '
                f'({MAX_INTERVAL.days} days)')
    return None


def schedule_problems(schedule) -> dict[str, str]:
    """Field name -> what is wrong with it (a sentence), for one ScheduledTask; empty when it can run."""
    problems: dict[str, str] = {}
    func = None
    try:
        func = registry.get_task(schedule.task)
    except TaskNotRegistered as exc:
        problems['task'] = str(exc)

    problems.update(arguments.scheduled_problems(schedule.task_args, schedule.content))
    if func is not None and not problems:  # a known task and arguments that read: do they fit it?
        args, kwargs = arguments.load_scheduled(schedule.task_args, schedule.content)
        problem = registry.call_problem(func, args, kwargs)
        if problem:
            problems['task_args'] = problem

    problem = interval_problem(schedule.interval_type, schedule.interval_count)  # checked whatever else is wrong
    if problem:
        problems['interval_type' if schedule.interval_type not in SECONDS_PER else 'interval_count'] = problem
    elif schedule.last_run_time is not None:
        try:
            schedule.last_run_time + timedelta(seconds=schedule.interval_count * SECONDS_PER[schedule.interval_type])
        except OverflowError:
            problems['last_run_time'] = (f'the last run time {schedule.last_run_time} plus the interval is past '
                                         f'the end of the calendar')

    if schedule.queue:
        try:
            get_config().queue(schedule.queue)
        except CarrotConfigException as exc:
            problems['queue'] = str(exc)
    for field in ('exchange', 'routing_key'):  # the column holds what AMQP may not carry (255 bytes)
        value = getattr(schedule, field, None)  # a schedule being checked may not name them
        if value:
            try:
                check_name(f"the {field.replace('_', ' ')}", value)
            except InvalidCall as exc:
                problems[field] = str(exc)
    return problems


def check_schedule(schedule) -> None:
    """Raise the first of `schedule_problems()`: TaskNotRegistered, InvalidArguments, InvalidSchedule,
    or UnknownQueue (a CarrotConfigException)."""
    problems = schedule_problems(schedule)
    if not problems:
        return
    field, message = next(iter(problems.items()))
    if field == 'task':
        raise TaskNotRegistered(message)
    if field in (arguments.POSITIONAL, arguments.KEYWORD):
        raise InvalidArguments(message, field)
    if field == 'queue':
        get_config().queue(schedule.queue)  # raises UnknownQueue with its own text
    raise InvalidSchedule(message)
