"""Interval schedules: the scheduler child's loop, the rules a schedule must meet, the built-in cleanup."""
